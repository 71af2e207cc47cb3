"""Time the mixture-of-experts FFN: the grouped matmul (``jax.lax.ragged_dot`` over token copies sorted
by expert), its loop form (``tiled``, the CPU default) and the dense reference (every expert on every
token, masked), jitted, on the current backend.

    python bench/moe_ffn.py --tokens 64 --experts 8 --top-k 2 --hidden 512 --intermediate 384
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve import moe


def timeit(fn, *args, reps: int) -> float:
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(reps):
            out = fn(*args)
        jax.block_until_ready(out)
        best = min(best, (time.perf_counter() - t0) / reps)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--intermediate", type=int, default=384)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    t, e, k, h, i = args.tokens, args.experts, args.top_k, args.hidden, args.intermediate
    dt = jnp.dtype(args.dtype)
    x = jnp.asarray(rng.standard_normal((t, h)), dt)
    gate_up = jnp.asarray(rng.standard_normal((e, h, 2, i)) * 0.02, dt)
    down = jnp.asarray(rng.standard_normal((e, i, h)) * 0.02, dt)
    logits = jnp.asarray(rng.standard_normal((t, e)), jnp.float32)
    w, ids = moe.route(logits, k, True)
    dense = jax.jit(moe.expert_ffn_dense)
    want = dense(x, w, ids, gate_up, down)
    row = {"backend": jax.default_backend(), "tokens": t, "experts": e, "top_k": k, "hidden": h,
           "intermediate": i, "dtype": args.dtype}
    for name, fn in (("ragged_dot", moe.expert_ffn_grouped), ("tiled", moe.expert_ffn_tiled), ("dense", None)):
        f = dense if fn is None else jax.jit(fn)
        row[f"{name}_ms"] = round(timeit(f, x, w, ids, gate_up, down, reps=args.reps) * 1e3, 3)
        if fn is not None:
            row[f"{name}_max_abs_diff"] = float(jnp.abs(f(x, w, ids, gate_up, down) - want).max())
    print(json.dumps(row))


if __name__ == "__main__":
    main()
