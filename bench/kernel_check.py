"""The backend's Pallas attention kernel, run natively (not interpreted), against the reference.

    JAX_PLATFORMS=cuda python3 bench/kernel_check.py      # on a GPU (JAX_PLATFORMS=tpu on a TPU VM)

For a covering grid of head dims (64/128/256), GQA groups (1-8, including 3, 6 and 7), page sizes
(16/32/64), dtypes (float32, bfloat16), step mixes (decode / prefill / mixed) and options (sliding
window, soft cap), it builds a ragged batch exactly as the tests do (``tests/test_attention.make_batch``:
mid-page and page-boundary kv lengths, padding rows, padded sequence slots, a 2-layer cache read at
layer 1), runs ``impl="pallas"`` (the kernel of this backend, compiled by Mosaic or Triton) and
``impl="reference"``, and compares them: max |kernel - reference| / max |reference| within 1e-5 for
float32 (3e-3 on GPU, whose float32 dots use TF32 by default, as XLA's do) and 2e-2 for bfloat16.
Prints one JSON line per case and a summary line ``{"kernel_check": {...}}``; exits 1 on a mismatch.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from kernels_pallas import ragged_paged_attention  # noqa: E402
from test_attention import make_batch  # noqa: E402

MIXES = ("decode", "prefill", "mixed")
OPTIONS = ((None, None), (24, None), (None, 30.0), (24, 30.0))  # (sliding_window, soft_cap)


def batch(mix: str, page_size: int, gqa: int, head_dim: int, seed: int):
    rng = np.random.default_rng(seed)
    n_dec = 0 if mix == "prefill" else 8
    prefills = [] if mix == "decode" else [(3 * page_size + 5, 0), (page_size, 2 * page_size), (1, 7)]
    return make_batch(rng, page_size=page_size, gqa=gqa, num_decode_rows=n_dec, num_decode_pad=1 if n_dec else 0,
                      prefills=prefills, pad_rows=3, pad_seqs=2, max_pages_per_seq=8, head_dim=head_dim,
                      num_kv_heads=2), n_dec


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--limit", type=int, default=None, help="run only the first N cases")
    ap.add_argument("--cpu-interpret", action="store_true",
                    help="on CPU, run the GPU kernel in interpret mode (checks this script, not a kernel)")
    args = ap.parse_args(argv)
    backend = jax.default_backend()
    if backend not in ("tpu", "gpu") and not args.cpu_interpret:
        print(json.dumps({"kernel_check": {"backend": backend, "skipped": "no TPU or GPU: nothing native to run"}}))
        return 0
    cases = []
    for i, (dtype, head_dim, gqa) in enumerate(itertools.product(("float32", "bfloat16"), (64, 128, 256),
                                                                   range(1, 9))):
        cases.append((dtype, head_dim, gqa, (16, 32, 64)[i % 3], MIXES[i % 3], OPTIONS[i % 4]))
    cases = cases[:args.limit]
    t0 = time.perf_counter()
    failures, worst = [], {}
    for n, (dtype, head_dim, gqa, page_size, mix, (window, cap)) in enumerate(cases):
        (q, kv_cache, layer, kv, pages, cu, num_seqs), n_dec = batch(mix, page_size, gqa, head_dim, seed=n)
        args = (jnp.asarray(q, dtype), jnp.asarray(kv_cache, dtype), layer, kv, pages, cu, num_seqs)
        opts = dict(sm_scale=head_dim ** -0.5, num_decode_rows=n_dec, sliding_window=window, soft_cap=cap)
        got = np.asarray(jax.jit(lambda *a: ragged_paged_attention(*a, impl="pallas", **opts))(*args), np.float32)
        want = np.asarray(jax.jit(lambda *a: ragged_paged_attention(*a, impl="reference", **opts))(*args),
                          np.float32)
        err = float(np.max(np.abs(got - want)) / max(float(np.max(np.abs(want))), 1e-6))
        tol = 2e-2 if dtype == "bfloat16" else (3e-3 if backend == "gpu" else 1e-5)
        row = dict(dtype=dtype, head_dim=head_dim, gqa=gqa, page_size=page_size, mix=mix, sliding_window=window,
                   soft_cap=cap, rel_err=err, ok=bool(err <= tol and np.isfinite(got).all()))
        print(json.dumps(row), flush=True)
        worst[dtype] = max(worst.get(dtype, 0.0), err)
        if not row["ok"]:
            failures.append(row)
    summary = dict(backend=backend, device=jax.devices()[0].device_kind, cases=len(cases), failures=len(failures),
                   max_rel_err=worst, seconds=round(time.perf_counter() - t0, 1))
    print(json.dumps({"kernel_check": summary}))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
