"""The CPU attention kernel against the JAX reference on one decode step's attention (one layer), the
kernel with 1 thread and with every core, interleaved in one process (rounds of each, medians).

    python bench/attention_cpu.py [--seqs 32] [--context 512] [--heads 8] [--kv-heads 4] [--head-dim 64]
        [--layers 8] [--adjacent-pages] [--isa avx2] [--cache-dtype bfloat16]

The cache holds ``--layers`` layers and each round runs the step's attention on every one of them (one
layer's time is reported), so a step's pages come from memory as in the engine, not from a cache that the
rounds before left warm; ``--adjacent-pages``: each sequence's pages one after the other (the engine's
allocator keeps them so), else shuffled.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from kernels_pallas.ragged_paged_attention import ragged_paged_attention_ref  # noqa: E402
from kernels_pallas.ragged_paged_attention_cpu import best_isa, ragged_paged_attention_cpu  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqs", type=int, default=32)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--prefill", type=int, default=0, help="also a prefill chunk of this many rows (new prompt)")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--shared-pages", action="store_true",
                    help="every sequence reads the same pages (they stay in cache): the compute-only time")
    ap.add_argument("--layers", type=int, default=2, help="layers in the cache (each round runs every one)")
    ap.add_argument("--adjacent-pages", action="store_true", help="each sequence's pages in order, one after the other")
    ap.add_argument("--isa", default="auto", help="the kernel's instruction set (auto, avx512, avx2, portable)")
    ap.add_argument("--cache-dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    n, ctx, ps, d = args.seqs, args.context, args.page_size, args.head_dim
    pages_per_seq = -(-max(ctx, args.prefill) // ps)
    num_pages = (n + 1) * pages_per_seq + 1
    cache = rng.standard_normal((args.layers, args.kv_heads, num_pages, ps, 2 * d)).astype(np.float32)
    order = np.arange(num_pages) if args.adjacent_pages else rng.permutation(num_pages)
    page_indices = order[:(n + 1) * pages_per_seq].reshape(n + 1, pages_per_seq).astype(np.int32)
    if args.shared_pages:
        page_indices[:] = page_indices[0]
    q_lens = [1] * n + ([args.prefill] if args.prefill else [])
    kv_lens = np.array([ctx] * n + ([args.prefill] if args.prefill else []) + [0] * (n + 1 - len(q_lens)), np.int32)
    cu = np.zeros(n + 2, np.int32)
    cu[1:len(q_lens) + 1] = np.cumsum(q_lens)
    cu[len(q_lens) + 1:] = cu[len(q_lens)]
    t = int(cu[-1])
    q = rng.standard_normal((t, args.heads, d)).astype(np.float32)
    cache = jax.jit(lambda c: c.astype(args.cache_dtype))(cache)  # an XLA buffer, as the engine's cache
    rest = [jax.device_put(x) for x in (kv_lens, page_indices, cu, np.int32(len(q_lens)))]
    q = jax.device_put(q)
    layers = [np.int32(i) for i in range(args.layers)]
    scale = d ** -0.5
    kw = dict(sm_scale=scale, num_decode_rows=n)
    isa = dict(isa=args.isa)

    def every_layer(f, **extra):  # one round: the step's attention on each layer of the cache
        return lambda: [f(q, cache, i, *rest, **kw, **extra) for i in layers][-1]

    fns = {
        "reference": every_layer(ragged_paged_attention_ref),
        "cpu_1thread": every_layer(ragged_paged_attention_cpu, num_threads=1, **isa),
        "cpu": every_layer(ragged_paged_attention_cpu, **isa),
    }
    if args.prefill:  # the prefill rows in the reference's tiled attention, the decode rows in the kernel
        fns["cpu_prefill_in_reference"] = every_layer(ragged_paged_attention_cpu, prefill_rows="reference", **isa)
    for f in fns.values():
        jax.block_until_ready(f())
    times = {k: [] for k in fns}
    for _ in range(args.rounds):
        for k, f in fns.items():
            t0 = time.perf_counter()
            for _ in range(args.iters):
                out = f()
            jax.block_until_ready(out)
            times[k].append((time.perf_counter() - t0) / (args.iters * args.layers))
    ms = {k: round(float(np.median(v)) * 1e3, 3) for k, v in times.items()}
    print(json.dumps({"seqs": n, "context": ctx, "prefill": args.prefill, "heads": args.heads,
                      "kv_heads": args.kv_heads, "head_dim": d, "page_size": ps, "shared_pages": args.shared_pages, "layers": args.layers,
                      "adjacent_pages": args.adjacent_pages, "cache_dtype": args.cache_dtype,
                      "isa": best_isa() if args.isa == "auto" else args.isa, "ms": ms,
                      "speedup": round(ms["reference"] / ms["cpu"], 2),
                      "threads_speedup": round(ms["cpu_1thread"] / ms["cpu"], 2)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
