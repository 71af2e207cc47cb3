"""The ``jaxserve`` command: ``make-model``, ``generate`` and ``serve``."""

from __future__ import annotations

import argparse
import logging
import sys


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="Hugging Face model directory")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=512)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--num-pages", type=int, default=None)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--scheduling", default="continuous", choices=["continuous", "static"])
    p.add_argument("--min-prefill-bucket", type=int, default=32, help="smallest prefill-token bucket")


def engine_from_args(args):
    from jaxserve import Engine

    return Engine.from_pretrained(
        args.model, max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len, page_size=args.page_size, num_pages=args.num_pages,
        dtype=args.dtype, scheduling=args.scheduling, min_prefill_bucket=args.min_prefill_bucket)


def cmd_make_model(args) -> int:
    from jaxserve.make_model import make_model

    overrides = {"vocab_size": args.vocab_size} if args.vocab_size else {}
    make_model(args.dir, arch=args.arch, size=args.size, seed=args.seed, **overrides)
    print(f"wrote {args.arch}-{args.size} checkpoint to {args.dir}")
    return 0


def cmd_generate(args) -> int:
    from jaxserve import SamplingParams

    engine = engine_from_args(args)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed, ignore_eos=args.ignore_eos)
    prompt = args.prompt
    if args.prompt_ids:
        prompt = [int(t) for t in args.prompt_ids.split(",")]
    elif engine.tokenizer is None:
        raise SystemExit("generate: this model has no tokenizer; pass --prompt-ids 1,2,3")
    out = None
    for out in engine.stream(prompt, params):
        if out.text is not None:
            sys.stdout.write(out.text_delta)
        else:
            sys.stdout.write("".join(f" {t}" for t in out.new_token_ids))
        sys.stdout.flush()
    sys.stdout.write("\n")
    if out is not None:
        logging.getLogger("jaxserve").info("%d tokens, finish_reason=%s", len(out.token_ids), out.finish_reason)
    return 0


def cmd_serve(args) -> int:
    from jaxserve.server import default_model_name, serve

    if args.max_queue is not None and args.max_queue < 0:
        raise ValueError(f"--max-queue: must be >= 0, got {args.max_queue}")
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        logging.getLogger("jaxserve").warning("binding %s: the server is reachable from other hosts", args.host)
    engine = engine_from_args(args)
    if not args.no_warmup:
        logging.getLogger("jaxserve").info("compiled %d step programs in %.1fs", engine.num_buckets,
                                           engine.warmup())
    return serve(engine, host=args.host, port=args.port, model_name=args.served_model_name or
                 default_model_name(args.model), api_key=args.api_key, max_queue=args.max_queue,
                 drain_timeout_s=args.drain_timeout, log_level="info" if args.verbose else "warning")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jaxserve", description="LLM inference on JAX")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("make-model", help="write a random-weight HF checkpoint + tokenizer")
    p.add_argument("dir")
    p.add_argument("--arch", default="llama", choices=["llama", "qwen2", "qwen3", "mistral"])
    p.add_argument("--size", default="tiny", choices=["tiny", "56m", "200m"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab-size", type=int, default=None, help="override the size's vocabulary")
    p.set_defaults(func=cmd_make_model)

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

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions)")
    _add_engine_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/*")
    p.add_argument("--max-queue", type=int, default=None,
                   help="answer 429 when more than max_num_seqs + N requests would be in flight")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="seconds to let in-flight requests finish after SIGTERM")
    p.add_argument("--served-model-name", default=None, help="the model id in the API (default: dir name)")
    p.add_argument("--no-warmup", action="store_true", help="compile step programs lazily")
    p.set_defaults(func=cmd_serve)

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
