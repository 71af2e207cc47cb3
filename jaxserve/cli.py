"""The ``jaxserve`` command: ``make-model``, ``convert`` and ``generate``."""

from __future__ import annotations

import argparse
import logging
import sys


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="Hugging Face model directory, or a checkpoint written by 'jaxserve convert'")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=512)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--num-pages", type=int, default=None)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--scheduling", default="continuous", choices=["continuous", "static"])
    add_mesh_args(p)


def add_mesh_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("multi-device serving (jax.sharding)")
    g.add_argument("--mesh-data", type=int, default=None, metavar="D",
                   help="size of the 'data' mesh axis (token rows of the batch)")
    g.add_argument("--mesh-model", type=int, default=None, metavar="M",
                   help="size of the 'model' mesh axis (tensor parallel: heads, MLP, vocabulary)")
    g.add_argument("--distributed", action="store_true",
                   help="call jax.distributed.initialize() first (multi-host, e.g. a TPU pod slice: run the "
                        "same command on every host)")


def mesh_shape_from_args(args) -> dict[str, int] | None:
    """``{"data": D, "model": M}`` from the flags, or None (one device) when neither is given."""
    if args.distributed:
        import jax

        jax.distributed.initialize()
    if args.mesh_data is None and args.mesh_model is None:
        return None
    return {"data": args.mesh_data or 1, "model": args.mesh_model or 1}


def engine_from_args(args):
    from jaxserve import Engine

    return Engine.from_pretrained(
        args.model, max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len, page_size=args.page_size, num_pages=args.num_pages,
        dtype=args.dtype, scheduling=args.scheduling, mesh_shape=mesh_shape_from_args(args))


def cmd_convert(args) -> int:
    from jaxserve.checkpoint import convert

    out = convert(args.model, args.out, dtype=args.dtype)
    print(f"wrote an Orbax checkpoint ({args.dtype}) of {args.model} to {out}")
    return 0


def cmd_make_model(args) -> int:
    from jaxserve.make_model import make_model

    make_model(args.dir, arch=args.arch, size=args.size, seed=args.seed)
    print(f"wrote {args.arch}-{args.size} checkpoint to {args.dir}")
    return 0


def cmd_generate(args) -> int:
    import jax

    from jaxserve import SamplingParams

    engine = engine_from_args(args)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed, ignore_eos=args.ignore_eos)
    prompt = args.prompt
    if args.prompt_ids:
        prompt = [int(t) for t in args.prompt_ids.split(",")]
    elif engine.tokenizer is None:
        raise SystemExit("generate: this model has no tokenizer; pass --prompt-ids 1,2,3")
    show = jax.process_index() == 0  # every host runs the same steps; host 0 writes the text
    out = None
    for out in engine.stream(prompt, params):
        if not show:
            continue
        if out.text is not None:
            sys.stdout.write(out.text_delta)
        else:
            sys.stdout.write("".join(f" {t}" for t in out.new_token_ids))
        sys.stdout.flush()
    if show:
        sys.stdout.write("\n")
    if out is not None and show:
        logging.getLogger("jaxserve").info("%d tokens, finish_reason=%s", len(out.token_ids), out.finish_reason)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jaxserve", description="LLM inference on JAX")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("make-model", help="write a random-weight HF checkpoint + tokenizer")
    p.add_argument("dir")
    p.add_argument("--arch", default="llama", choices=["llama", "qwen2", "qwen3", "mistral"])
    p.add_argument("--size", default="tiny", choices=["tiny", "56m", "200m"])
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_make_model)

    p = sub.add_parser("convert", help="convert a Hugging Face checkpoint to an Orbax checkpoint")
    p.add_argument("--model", required=True, help="Hugging Face model directory")
    p.add_argument("--out", required=True, help="directory to write (params/ + config + tokenizer)")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("generate", help="generate a completion, streamed to the terminal")
    _add_engine_args(p)
    p.add_argument("--prompt", default="Hello")
    p.add_argument("--prompt-ids", default=None, help="comma-separated token ids instead of --prompt")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--ignore-eos", action="store_true")
    p.set_defaults(func=cmd_generate)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"jaxserve {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
