"""Attention micro-benchmark: Pallas kernel vs reference ragged paged attention; one JSON line per case.

    python bench/attention.py                       # decode (batch 64 x 1k context) and prefill (2k tokens)
    python bench/attention.py --cases decode --batch 64 --context 1024,4096,16384   # one row per context
    python bench/attention.py --cases decode,prefill --batch 2 --context 64 --prefill-tokens 64 \
        --num-q-heads 4 --num-kv-heads 2 --head-dim 16 --iters 1   # tiny: runs on CPU in seconds

The cache has the engine's layout (``jaxserve/kv_cache.py``): one array of
``--num-layers`` layers, ``[L, Hkv, pages, page_size, 2 * head_dim]``, and the
step reads its last layer through the traced ``layer`` argument, as the model
does (only that layer's bytes are counted).

For each case and implementation it prints the median time of ``--iters`` runs
(after one compiling run), the bytes the attention must move at least (q, the
K/V of every sequence's context once, the output) and the FLOPs it must do
(QK^T and PV; causal prefill counts only the unmasked half), the achieved GB/s
and FLOP/s, and ``roofline_fraction`` = (time the roofline allows) / (time
taken), where the roofline time is max(bytes / HBM bandwidth, FLOPs / peak
FLOP/s) from the ``PEAKS`` table below (``null`` for a device not in it).

On TPU it times the TPU kernel, on GPU the GPU kernel, both against the
reference.  On CPU it times the reference only: the kernels run there only in
Pallas interpret mode, which says nothing about their speed
(``--interpret`` times them anyway, at your own risk: far slower).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxserve.kv_cache import kv_cache_shape  # noqa: E402
from kernels_pallas import ragged_paged_attention  # noqa: E402

# device_kind prefix -> (HBM GB/s, dense bf16 TFLOP/s, float32 TFLOP/s), vendor spec sheets.
PEAKS: dict[str, tuple[float, float, float]] = {
    "NVIDIA H100 80GB HBM3": (3350.0, 989.0, 67.0),  # SXM
    "NVIDIA H100 PCIe": (2000.0, 756.0, 51.0),
    "NVIDIA H100 NVL": (3900.0, 835.0, 60.0),
    "NVIDIA H200": (4800.0, 989.0, 67.0),
    "NVIDIA A100-SXM4-80GB": (2039.0, 312.0, 19.5),
    "NVIDIA A100-SXM4-40GB": (1555.0, 312.0, 19.5),
    "NVIDIA L4": (300.0, 121.0, 30.0),
    "TPU v4": (1200.0, 275.0, 275.0),
    "TPU v5 lite": (819.0, 197.0, 197.0),  # v5e
    "TPU v5p": (2765.0, 459.0, 459.0),
    "TPU v5": (2765.0, 459.0, 459.0),
    "TPU v6 lite": (1640.0, 918.0, 918.0),  # v6e (Trillium)
}


def peaks_for(device_kind: str) -> tuple[float, float, float] | None:
    for prefix in sorted(PEAKS, key=len, reverse=True):
        if device_kind.startswith(prefix):
            return PEAKS[prefix]
    return None


def build_case(name: str, args, dtype, context: int) -> tuple[tuple, dict, float, float]:
    """Arrays for a case, the static kwargs, and the minimum bytes moved and FLOPs done."""
    ps, hq, hkv, d = args.page_size, args.num_q_heads, args.num_kv_heads, args.head_dim
    rng = np.random.default_rng(0)
    if name == "decode":
        b, ctx = args.batch, context
        q_lens, kv_lens = [1] * b, [ctx] * b
        num_decode_rows = b
    else:
        q_lens, kv_lens = [args.prefill_tokens], [args.prefill_tokens]
        num_decode_rows = 0
    pages_per_seq = -(-max(kv_lens) // ps)
    num_pages = pages_per_seq * len(q_lens)
    page_indices = rng.permutation(num_pages).reshape(len(q_lens), pages_per_seq).astype(np.int32)
    cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    t = int(cu[-1])
    q = jnp.asarray(rng.standard_normal((t, hq, d), np.float32), dtype)
    layers = args.num_layers
    # Filled on the device (a host array of a 16k-context cache would take minutes to make).
    kv_cache = jax.random.normal(jax.random.key(0), kv_cache_shape(layers, hkv, num_pages, ps, d), dtype)
    arrays = (q, kv_cache, jnp.int32(layers - 1), jnp.asarray(kv_lens, jnp.int32), jnp.asarray(page_indices),
              jnp.asarray(cu), jnp.int32(len(q_lens)))
    itemsize = jnp.dtype(dtype).itemsize
    kv_bytes = 2 * sum(kv_lens) * hkv * d * itemsize
    bytes_moved = 2 * t * hq * d * itemsize + kv_bytes  # q in, out, K/V once
    # Query i of a sequence sees ctx + i + 1 keys; 2 matmuls x 2 FLOPs per multiply-add.
    keys_seen = sum(sum(kv - q + i + 1 for i in range(q)) for q, kv in zip(q_lens, kv_lens))
    flops = 4.0 * keys_seen * hq * d
    return arrays, dict(sm_scale=d ** -0.5, num_decode_rows=num_decode_rows), bytes_moved, flops


def time_impl(impl: str, arrays, static, iters: int) -> float:
    fn = jax.jit(lambda *a: ragged_paged_attention(*a, impl=impl, **static))
    fn(*arrays).block_until_ready()  # compile
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn(*arrays).block_until_ready()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="decode,prefill", help="comma-separated: decode, prefill")
    ap.add_argument("--batch", "--decode-batch", dest="batch", type=int, default=64,
                    help="decode sequences per step")
    ap.add_argument("--context", default="1024",
                    help="kv length of every decode sequence; comma-separated for several (e.g. 1024,4096,16384)")
    ap.add_argument("--num-layers", type=int, default=2, help="layers in the cache (the step reads the last)")
    ap.add_argument("--prefill-tokens", type=int, default=2048, help="one fresh prompt of this many tokens")
    ap.add_argument("--num-q-heads", type=int, default=32)
    ap.add_argument("--num-kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--dtype", default="auto", help="auto: bfloat16 on GPU/TPU, float32 on CPU")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--interpret", action="store_true",
                    help="on CPU, also time the kernels in interpret mode (slow, meaningless for speed)")
    args = ap.parse_args(argv)

    backend = jax.default_backend()
    device_kind = jax.devices()[0].device_kind
    dtype = args.dtype if args.dtype != "auto" else ("float32" if backend == "cpu" else "bfloat16")
    if backend in ("tpu", "gpu"):
        impls = ["pallas", "reference"]
        note = None
    else:
        impls = ["reference"] + (["pallas_gpu", "pallas_tpu"] if args.interpret else [])
        note = ("CPU: the Pallas kernels only run in interpret mode here; "
                + ("their times are the interpreter's, not the kernels'" if args.interpret
                   else "timing the reference only (--interpret to time the interpreted kernels)"))
    peaks = peaks_for(device_kind)
    contexts = [int(c) for c in args.context.split(",")]
    runs = [(case, ctx) for case in args.cases.split(",") for ctx in (contexts if case == "decode" else [0])]
    for case, ctx in runs:
        arrays, static, bytes_moved, flops = build_case(case, args, dtype, ctx)
        for impl in impls:
            try:
                seconds = time_impl(impl, arrays, static, args.iters)
            except Exception as e:  # e.g. a kernel that does not compile for this shape: report, go on
                print(json.dumps({"case": case, "impl": impl, "context": ctx or None,
                                  "error": f"{type(e).__name__}: {str(e)[:500]}"}), flush=True)
                continue
            row = {
                "case": case, "impl": impl, "backend": backend, "device": device_kind, "dtype": dtype,
                "tokens": int(arrays[0].shape[0]), "num_seqs": int(arrays[6]),
                "max_context": int(arrays[3].max()), "q_heads": args.num_q_heads, "kv_heads": args.num_kv_heads,
                "head_dim": args.head_dim, "page_size": args.page_size,
                "ms": round(seconds * 1e3, 4), "bytes": int(bytes_moved), "flops": flops,
                "gb_s": round(bytes_moved / seconds / 1e9, 2), "tflop_s": round(flops / seconds / 1e12, 4),
                "roofline_fraction": None,
            }
            if peaks is not None:
                bw, bf16, f32 = peaks
                peak_flops = (bf16 if dtype in ("bfloat16", "float16") else f32) * 1e12
                roofline_s = max(bytes_moved / (bw * 1e9), flops / peak_flops)
                row["roofline_fraction"] = round(roofline_s / seconds, 4)
                row["hbm_fraction"] = round(bytes_moved / seconds / (bw * 1e9), 4)
            if note:
                row["note"] = note
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
