"""Throughput benchmarks that compare accelerators: one workload run, a grid of runs, and the roofline.

``run_workload`` is the measurement (used by ``bench/throughput.py`` and ``jaxserve bench``):
every request of a workload file, greedy with EOS ignored, added at once; the clock starts after
the warm-up that compiles every bucket.  ``roofline`` turns a run's token counts into FLOPs and
bytes moved, using the model's shapes, and compares them with the device's peak (on CPU the
measured float32 peak, which bfloat16 runs are compared against as well).  ``run_grid`` (``jaxserve
bench``) runs each point of its grid in a fresh process (``python -m jaxserve.benchmark SPEC``).
"""

from __future__ import annotations

import dataclasses
import datetime
import itertools
import json
import logging
import os
import resource
import subprocess
import sys
import time
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.config import ModelConfig
from jaxserve.engine import Engine
from jaxserve.sampling import SamplingParams

logger = logging.getLogger(__name__)

# Peak dense matmul FLOP/s (bf16 unless noted) and memory bandwidth (bytes/s) per device kind, from
# the vendors' data sheets.  CPU peaks are measured at start-up (measure_cpu_peaks).
DEVICE_PEAKS: dict[str, tuple[float, float]] = {
    "NVIDIA H100 80GB HBM3": (989e12, 3.35e12),
    "NVIDIA H100 PCIe": (756e12, 2.0e12),
    "NVIDIA H200": (989e12, 4.8e12),
    "NVIDIA A100-SXM4-80GB": (312e12, 2.04e12),
    "NVIDIA A100-SXM4-40GB": (312e12, 1.56e12),
    "NVIDIA L4": (121e12, 0.3e12),
    "TPU v4": (275e12, 1.2e12),
    "TPU v5 lite": (197e12, 0.819e12),
    "TPU v5e": (197e12, 0.819e12),
    "TPU v5p": (459e12, 2.765e12),
    "TPU v6 lite": (918e12, 1.64e12),
    "TPU v6e": (918e12, 1.64e12),
}


def load_workload(path: str) -> dict:
    """A workload file's dict; its ``name`` defaults to the file's base name."""
    with open(path) as f:
        workload = json.load(f)
    if not isinstance(workload.get("requests"), list) or not workload["requests"]:
        raise ValueError(f"workload: {path} has no 'requests' list")
    workload.setdefault("name", os.path.splitext(os.path.basename(path))[0])
    return workload


def run_workload(engine: Engine, requests: list[dict], progress: bool = False) -> dict[str, Any]:
    """Run every request to completion; returns seconds, token counts and per-request latencies."""
    for r in requests:
        engine.add_request(r["prompt_token_ids"], SamplingParams(
            temperature=0.0, max_tokens=r["max_tokens"], ignore_eos=True, detokenize=False))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(requests), desc="requests", unit="req", leave=False)
    finished = []
    t0 = time.perf_counter()
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                finished.append(out)
                if bar is not None:
                    bar.update(1)
    seconds = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    ttft = [o.first_token_time - o.arrival_time for o in finished]
    tpot = [(o.finish_time - o.first_token_time) / (len(o.token_ids) - 1) for o in finished if len(o.token_ids) > 1]
    return {
        "seconds": seconds,
        "output_tokens": sum(len(o.token_ids) for o in finished),
        "prompt_tokens": sum(len(o.prompt_token_ids) for o in finished),
        "ttft_ms": percentiles(ttft),
        "tpot_ms": percentiles(tpot),
        "kv_token_reads": sum(_kv_reads(len(o.prompt_token_ids), len(o.token_ids)) for o in finished),
    }


def _kv_reads(prompt: int, output: int) -> int:
    """Cached tokens read by attention over a request's decode steps (prefill reads its own chunk)."""
    # Decode step i (0-based, i >= 1) attends over prompt + i tokens; the first token comes from prefill.
    return sum(prompt + i for i in range(1, output))


def percentiles(values: list[float], with_mean: bool = False) -> dict[str, float]:
    """p50/p90/p99 (and optionally the mean) of durations in seconds, in milliseconds."""
    if not values:
        return {}
    arr = np.asarray(values) * 1e3
    out = {f"p{p}": round(float(np.percentile(arr, p)), 2) for p in (50, 90, 99)}
    if with_mean:
        out["mean"] = round(float(arr.mean()), 2)
    return out


@dataclasses.dataclass
class Roofline:
    flops: float  # floating-point operations of the whole run
    bytes: float  # bytes moved between memory and compute units
    achieved_flop_s: float
    achieved_bytes_s: float
    peak_flop_s: float | None
    peak_bytes_s: float | None

    @property
    def fraction(self) -> float | None:
        """The larger of the compute and bandwidth fractions of peak (the bound that binds)."""
        if not self.peak_flop_s or not self.peak_bytes_s:
            return None
        return max(self.achieved_flop_s / self.peak_flop_s, self.achieved_bytes_s / self.peak_bytes_s)


def matmul_params(cfg: ModelConfig) -> tuple[int, int]:
    """(parameters every token multiplies through, LM-head parameters)."""
    h, i, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    if cfg.is_moe:  # a token goes through the router and its top-k experts only
        mlp = h * cfg.num_experts + 3 * h * cfg.moe_intermediate_size * cfg.num_experts_per_tok
    else:
        mlp = 3 * h * i
    per_layer = h * d * (2 * cfg.num_heads + 2 * cfg.num_kv_heads) + mlp
    return cfg.num_layers * per_layer, h * cfg.vocab_size


def attention_costs(cfg: ModelConfig, kv_bytes: int) -> tuple[int, int]:
    """(FLOPs per (query row, key) pair: QK^T and PV, 4 * head_dim per query head and layer; bytes of the
    cached K and V of one token over every layer and KV head, ``kv_bytes`` per value)."""
    return (4 * cfg.head_dim * cfg.num_heads * cfg.num_layers,
            2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * kv_bytes)


def roofline(cfg: ModelConfig, *, prompt_tokens: int, output_tokens: int, steps: int, kv_token_reads: int,
             seconds: float, dtype_bytes: int, peaks: tuple[float, float] | None) -> Roofline:
    """FLOPs and bytes of a run, from the model's shapes.

    FLOPs: 2 per multiply-add through the layers for every computed token (prompt + output, minus
    the last output token, which is sampled but never fed back), the LM head once per output token,
    and attention (QK^T and PV: 4 * head_dim * q_heads per (query, key) pair per layer) over the
    decode steps' contexts.  Bytes: every step reads all weights once; decode attention reads the
    cached K and V of its context.
    """
    body, head = matmul_params(cfg)
    computed = prompt_tokens + output_tokens - 1
    attn_per_pair, kv_bytes_per_token = attention_costs(cfg, dtype_bytes)
    flops = 2 * body * computed + 2 * head * output_tokens + attn_per_pair * kv_token_reads
    weight_bytes = (body + head) * dtype_bytes
    moved = steps * weight_bytes + kv_token_reads * kv_bytes_per_token
    peak_flop_s, peak_bytes_s = peaks if peaks else (None, None)
    return Roofline(flops, moved, flops / seconds, moved / seconds, peak_flop_s, peak_bytes_s)


def measure_cpu_peaks(n: int = 1024, reps: int = 10) -> tuple[float, float]:
    """Measured float32 matmul FLOP/s and memory bandwidth (bytes/s) of this CPU, through XLA."""
    a = jnp.ones((n, n), jnp.float32)
    mm = jax.jit(lambda x: x @ x)
    mm(a).block_until_ready()
    t0 = time.perf_counter()
    for _ in range(reps):
        mm(a).block_until_ready()
    flop_s = 2 * n ** 3 * reps / (time.perf_counter() - t0)
    big = jnp.ones((64 << 20,), jnp.float32)  # 256 MiB, far beyond the caches
    total = jax.jit(lambda x: jnp.sum(x))
    total(big).block_until_ready()
    t0 = time.perf_counter()
    for _ in range(3):
        total(big).block_until_ready()
    bytes_s = big.nbytes * 3 / (time.perf_counter() - t0)
    return flop_s, bytes_s


def device_peaks(kind: str) -> tuple[float, float] | None:
    if jax.default_backend() == "cpu":
        return measure_cpu_peaks()
    for name, peaks in DEVICE_PEAKS.items():
        if kind.startswith(name) or name.startswith(kind):
            return peaks
    return None


def device_memory_bytes() -> int | None:
    stats = getattr(jax.devices()[0], "memory_stats", lambda: None)()
    return (stats or {}).get("peak_bytes_in_use")


def bench_one(model: str, workload: dict, *, mode: str, max_num_seqs: int, dtype: str,
              max_num_batched_tokens: int, max_model_len: int, peaks, progress: bool) -> dict[str, Any]:
    """One run of the grid: build the engine, warm it up, run the workload; returns the record.

    ``peaks`` is (FLOP/s, bytes/s) of the device; None looks them up (on CPU: measures them)."""
    if peaks is None:
        peaks = device_peaks(jax.devices()[0].device_kind)
    engine = Engine.from_pretrained(model, max_num_seqs=max_num_seqs, dtype=dtype, scheduling=mode,
                                    max_num_batched_tokens=max_num_batched_tokens, max_model_len=max_model_len)
    warmup_s = engine.warmup()
    run = run_workload(engine, workload["requests"], progress=progress)
    cfg = engine.model_config
    rl = roofline(cfg, prompt_tokens=run["prompt_tokens"], output_tokens=run["output_tokens"],
                  steps=engine.runner.stats["steps"], kv_token_reads=run["kv_token_reads"],
                  seconds=run["seconds"], dtype_bytes=np.dtype(engine.runner.dtype).itemsize, peaks=peaks)
    return {
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": jax.devices()[0].device_kind, "backend": jax.default_backend(),
        "num_devices": jax.device_count(), "jax_version": jax.__version__,
        "model": os.path.basename(os.path.normpath(model)), "model_type": cfg.model_type,
        "model_params": cfg.num_params(), "workload": workload.get("name", ""),
        "requests": len(workload["requests"]), "mode": mode, "max_num_seqs": max_num_seqs,
        "dtype": engine.dtype_name, "max_num_batched_tokens": max_num_batched_tokens,
        "warmup_s": round(warmup_s, 2), "compiles": engine.compile_count, "compile_cache_hits": engine.runner.cache_hits,
        "seconds": round(run["seconds"], 3), "output_tokens": run["output_tokens"],
        "tok_s": round(run["output_tokens"] / run["seconds"], 2),
        "steps": engine.runner.stats["steps"], "ttft_ms": run["ttft_ms"], "tpot_ms": run["tpot_ms"],
        "flops": rl.flops, "bytes": rl.bytes, "achieved_tflop_s": round(rl.achieved_flop_s / 1e12, 4),
        "achieved_gb_s": round(rl.achieved_bytes_s / 1e9, 2),
        "peak_tflop_s": None if rl.peak_flop_s is None else round(rl.peak_flop_s / 1e12, 4),
        "peak_gb_s": None if rl.peak_bytes_s is None else round(rl.peak_bytes_s / 1e9, 2),
        "roofline_fraction": None if rl.fraction is None else round(rl.fraction, 4),
        "peak_host_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "device_peak_mb": None if device_memory_bytes() is None else round(device_memory_bytes() / 2**20, 1),
    }


def _bench_one_in_subprocess(spec: dict[str, Any]) -> dict[str, Any]:
    """Run ``bench_one`` in a fresh Python process and return its record.

    One process per run, so that each record's peak host memory is that run's own (``ru_maxrss`` only
    grows within a process) and no run inherits the compiled programs, caches or heap of the runs
    before it.
    """
    proc = subprocess.run([sys.executable, "-m", "jaxserve.benchmark", json.dumps(spec)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"bench run {spec['mode']} max_num_seqs={spec['max_num_seqs']} {spec['dtype']} "
                           f"failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_grid(model: str, workload_path: str, *, modes: Iterable[str], max_num_seqs: Iterable[int],
             dtypes: Iterable[str], out_dir: str, max_num_batched_tokens: int = 512, max_model_len: int = 1024,
             progress: bool = True) -> list[dict[str, Any]]:
    """Run every combination, each in its own process, and append one JSON record per run to
    ``out_dir/<device>.jsonl``."""
    # This process never touches the accelerator: a TPU opens in one process at a time, and a GPU
    # client here would take memory from the runs.  The first run looks up (or, on CPU, measures) the
    # device's peaks; the later ones reuse them.
    load_workload(workload_path)  # fail here, with the path, before starting any run
    os.makedirs(out_dir, exist_ok=True)
    peaks = None
    grid = list(itertools.product(list(dtypes), list(max_num_seqs), list(modes)))
    records = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(grid), desc="bench runs", unit="run")
    failed = []
    for dtype, seqs, mode in grid:
        try:
            record = _bench_one_in_subprocess(dict(
                model=model, workload=workload_path, mode=mode, max_num_seqs=seqs, dtype=dtype,
                max_num_batched_tokens=max_num_batched_tokens, max_model_len=max_model_len, peaks=peaks))
        except RuntimeError as e:  # e.g. out of device memory at a large max_num_seqs: go on with the grid
            logger.error("%s", e)
            failed.append(f"{mode} max_num_seqs={seqs} {dtype}")
            if bar is not None:
                bar.update(1)
            continue
        if record["peak_tflop_s"] is not None:
            peaks = (record["peak_tflop_s"] * 1e12, record["peak_gb_s"] * 1e9)
        kind = record["device"]
        path = os.path.join(out_dir, "".join(c if c.isalnum() else "-" for c in kind).strip("-").lower() + ".jsonl")
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
        records.append(record)
        logger.info("%s %s seqs=%d %s: %.1f tok/s", kind, mode, seqs, dtype, record["tok_s"])
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(f"{mode} seqs={seqs} {dtype}: {record['tok_s']} tok/s")
    if bar is not None:
        bar.close()
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(grid)} bench runs failed (their errors are logged above; "
                           f"the other {len(records)} records were written): {', '.join(failed)}")
    return records


if __name__ == "__main__":  # one run of the grid, started by run_grid; prints its record as the last line
    spec = json.loads(sys.argv[1])
    logging.basicConfig(level=logging.WARNING)
    rec = bench_one(spec["model"], load_workload(spec["workload"]), mode=spec["mode"],
                    max_num_seqs=spec["max_num_seqs"], dtype=spec["dtype"],
                    max_num_batched_tokens=spec["max_num_batched_tokens"], max_model_len=spec["max_model_len"],
                    peaks=spec["peaks"] and tuple(spec["peaks"]), progress=False)
    print(json.dumps(rec))
