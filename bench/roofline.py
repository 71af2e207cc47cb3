"""How far a workload's run is from this machine's roofline: each engine step's time against the least
time its work can take here, per bucket and in total.  Prints one JSON line.

    python bench/roofline.py --model /work/models/56m --workload ../shared/workloads/longtail-256.json \
        --max-num-seqs 64 [--mode static]

The floor of a step is the sum of two phases, each bounded by the slower of compute and memory:

* matmuls: ``rows x 2 x (layer weights)`` + ``sampled rows x 2 x hidden x vocab`` FLOPs at the peak
  matmul rate, or reading every weight once at the memory read rate;
* attention: reading the K/V of every token each sequence attends over (once per KV head: the GQA group
  shares it), or ``2 x 2 x head_dim`` FLOPs per (query head, row, key) at the peak rate.

Rows are the real ones (a padded bucket's extra rows count as waste, not as work), so the floor is what
a perfect engine would need for this schedule.  The FLOP and byte accounting is
``jaxserve.benchmark.roofline``'s, and the rates are ``measure_cpu_peaks``' (XLA's float32 matmul of
1024 x 1024 and a jitted sum over 256 MiB), unless ``--peak-gflops`` and ``--read-gbs`` give them.  Dense
models, weights as stored (no quantization).  Another engine's run time on the same workload compares
against the same ``floor_s`` (it runs the same requests; jaxserve's own is ``step_s``).

``--mode static`` floors static batching's schedule the same way (a finished member's idle slot is padding,
not work).  The two floors' ratio is the continuous/static ratio of a perfect engine on this machine: both
modes read the same K/V and compute the same prompt tokens, and only the number of steps differs.  On the
56m model, longtail-256 at 32 slots (2026-12-06, 2-core Xeon; ``--max-num-seqs 32``, each mode): at the
measured rates (about 265 GFLOP/s, 29.5 GB/s) the floors are 16.24 s continuous and 28.29 s static, 1.74x;
with compute free (``--peak-gflops 1e9 --read-gbs 29.5``: every step only reads the weights, every decode row
its K/V) 8.01 s and 21.39 s, 2.67x, whatever the read rate, since then both floors are bytes over one rate.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax.numpy as jnp  # noqa: E402

from jaxserve import Engine  # noqa: E402
from jaxserve.benchmark import attention_costs, load_workload, matmul_params, measure_cpu_peaks, run_workload  # noqa: E402


def step_costs(engine: Engine) -> dict[str, float]:
    """FLOPs per row and per sampled row, weight bytes, K/V bytes per cached token, attention FLOPs per
    (row, key) pair: the accounting of ``jaxserve.benchmark.roofline``, per step."""
    cfg = engine.model_config
    if cfg.is_moe:
        raise SystemExit("roofline.py: dense models only (a step reads the weights of the experts it routes to)")
    body, head = matmul_params(cfg)
    pair_flops, kv_bytes_per_token = attention_costs(cfg, jnp.dtype(engine.kv_dtype).itemsize)
    weight_bytes = (body + head) * jnp.dtype(engine.dtype_name).itemsize
    return {"row_flops": 2.0 * body, "sampled_row_flops": 2.0 * head, "weight_bytes": float(weight_bytes),
            "kv_bytes_per_token": float(kv_bytes_per_token), "pair_flops": float(pair_flops)}


def _sig(x: float) -> float:
    """Four significant digits (a small model's floors are microseconds)."""
    return float(f"{x:.4g}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--workload", required=True)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--mode", default="continuous", choices=["continuous", "static"], help="scheduling")
    ap.add_argument("--max-num-batched-tokens", type=int, default=512)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--limit", type=int, default=None, help="run only the first N requests")
    ap.add_argument("--peak-gflops", type=float, default=None, help="matmul peak (default: measured)")
    ap.add_argument("--read-gbs", type=float, default=None, help="memory read rate (default: measured)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    requests = load_workload(args.workload)["requests"][:args.limit]
    engine = Engine.from_pretrained(args.model, max_num_seqs=args.max_num_seqs,
                                    max_num_batched_tokens=args.max_num_batched_tokens,
                                    max_model_len=args.max_model_len, dtype="float32", scheduling=args.mode,
                                    async_scheduling=False)  # each step timed alone, through execute (below)
    costs = step_costs(engine)
    peak, read = (None, None) if args.peak_gflops and args.read_gbs else measure_cpu_peaks()
    peak = args.peak_gflops * 1e9 if args.peak_gflops else peak  # a rate given replaces the measured one
    read = args.read_gbs * 1e9 if args.read_gbs else read
    engine.warmup()

    steps = []
    execute = engine.runner.execute

    def timed_execute(out):
        t0 = time.perf_counter()
        result = execute(out)
        seconds = time.perf_counter() - t0
        work = {"rows": 0, "kv_tokens": 0, "pairs": 0}
        for sch in out.decodes + out.prefills:
            start, n = sch.seq.num_computed_tokens, sch.num_tokens
            work["rows"] += n
            work["kv_tokens"] += start + n
            work["pairs"] += n * start + n * (n + 1) // 2  # causal: row i of the chunk sees start + i + 1 keys
        work["sampled"] = len(out.decodes) + len(out.prefills)
        steps.append((engine.runner.last_bucket, seconds, work))
        return result

    engine.runner.execute = timed_execute
    run = run_workload(engine, requests)

    def floor(w) -> tuple[float, float]:
        matmuls = max((w["rows"] * costs["row_flops"] + w["sampled"] * costs["sampled_row_flops"]) / peak,
                      costs["weight_bytes"] / read)
        attention = max(w["kv_tokens"] * costs["kv_bytes_per_token"] / read, w["pairs"] * costs["pair_flops"] / peak)
        return matmuls, attention

    buckets = collections.defaultdict(lambda: {"steps": 0, "seconds": 0.0, "floor_s": 0.0})
    total = {"seconds": 0.0, "matmuls_floor_s": 0.0, "attention_floor_s": 0.0}
    for key, seconds, work in steps:
        mm, att = floor(work)
        b = buckets[f"{key[0]}+{key[1]}"]
        b["steps"] += 1
        b["seconds"] += seconds
        b["floor_s"] += mm + att
        total["seconds"] += seconds
        total["matmuls_floor_s"] += mm
        total["attention_floor_s"] += att
    floor_s = total["matmuls_floor_s"] + total["attention_floor_s"]
    print(json.dumps({
        "workload": os.path.basename(args.workload), "mode": args.mode, "max_num_seqs": args.max_num_seqs,
        "output_tokens": run["output_tokens"], "wall_s": round(run["seconds"], 3),
        "step_s": _sig(total["seconds"]), "floor_s": _sig(floor_s),
        "matmuls_floor_s": _sig(total["matmuls_floor_s"]), "attention_floor_s": _sig(total["attention_floor_s"]),
        "efficiency": round(floor_s / total["seconds"], 3), "peak_gflops": round(peak / 1e9, 1),
        "read_gbs": round(read / 1e9, 1), "steps": len(steps),
        "buckets": {k: {"steps": v["steps"], "seconds": round(v["seconds"], 3), "floor_s": _sig(v["floor_s"])}
                    for k, v in sorted(buckets.items(), key=lambda kv: -kv[1]["seconds"])},
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
