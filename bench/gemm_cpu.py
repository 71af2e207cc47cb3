"""The layers' matmuls on CPU: XLA's dot against the C++ kernel (``kernels_pallas/gemm_cpu.py``).

A jitted stack of a model's layers without attention (the fused QKV projection, the output projection, the
gate/up projection with SiLU, the down projection, residual adds), with every layer's weights its own
buffers as in the engine's CPU layer loop, so that the weights stream from memory as in a step, timed at
several row counts with each matmul implementation; then the LM head ([rows, hidden] x [hidden, vocab], one
jitted call), and with float32 weights a greedy step's tokens from it: the kernel's head and its argmax
(``cpu_argmax_head_ms``) against ``gemm_cpu.argmax_head`` (``greedy_head_ms``).  Prints one JSON line per row count:

    python bench/gemm_cpu.py --model /work/models/56m [--rows 4,8,16,32,48,64] [--isa auto] [--num-threads 0]
        [--weights bfloat16]

(``--model``: a checkpoint directory, only its config.json is read; the weights are random.)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxserve.sampling import argmax_rows  # noqa: E402
from kernels_pallas import gemm_cpu as gemm_cpu_mod  # noqa: E402
from kernels_pallas.gemm_cpu import ISAS, available_isas, gemm_cpu, pack  # noqa: E402


def layer_shapes(config: dict) -> list[tuple[int, int]]:
    """(K, N) of the four matmuls of one layer."""
    h, inter = config["hidden_size"], config["intermediate_size"]
    heads, kv = config["num_attention_heads"], config.get("num_key_value_heads", config["num_attention_heads"])
    d = config.get("head_dim") or h // heads
    return [(h, (heads + 2 * kv) * d), (heads * d, h), (h, 2 * inter), (inter, h)]


def stack(matmul, num_layers: int, heads_dim: int, inter: int, ns: list[int]):
    """``matmul(x, w, n)``: x [rows, K] times the weight w (of N = n columns)."""
    def layer(x, w):
        qkv = matmul(x, w[0], ns[0])
        x = x + matmul(qkv[:, :heads_dim], w[1], ns[1])
        gate_up = matmul(x, w[2], ns[2])
        return x + matmul(jax.nn.silu(gate_up[:, :inter]) * gate_up[:, inter:], w[3], ns[3])

    def run(x, weights):
        for i in range(num_layers):
            x = layer(x, weights[i])
        return x

    return jax.jit(run)


def timed(f, *args, reps: int) -> float:
    f(*args).block_until_ready()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        f(*args).block_until_ready()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="checkpoint directory (its config.json)")
    ap.add_argument("--rows", default="4,8,16,32,48,64")
    ap.add_argument("--isa", default="auto", choices=[i for i in ISAS if i != "dpbf16"])  # (dpbf16: the head only)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--weights", default="float32", choices=["float32", "bfloat16"],
                    help="how the kernel holds the weights: bfloat16 is what the engine does for a checkpoint "
                         "whose values are bfloat16 (the same float32 arithmetic, half the bytes)")
    ap.add_argument("--num-threads", type=int, default=0,
                    help="the kernel's threads (0: every core; 1 against 0 shows how it scales)")
    args = ap.parse_args()
    with open(os.path.join(args.model, "config.json")) as f:
        config = json.load(f)
    shapes = layer_shapes(config)
    layers = config["num_hidden_layers"]
    rng = np.random.default_rng(0)
    weights = [[jnp.asarray(rng.standard_normal(s, dtype=np.float32) * 0.02) for s in shapes] for _ in range(layers)]
    heads_dim, inter = shapes[1][0], config["intermediate_size"]
    ns = [n for _, n in shapes]
    impls = {
        "xla": stack(lambda a, b, n: jnp.dot(a, b, preferred_element_type=jnp.float32), layers, heads_dim, inter, ns),
        "cpu": stack(lambda a, b, n: gemm_cpu(a, b, n, isa=args.isa, num_threads=args.num_threads), layers, heads_dim, inter, ns),
    }
    held = jnp.dtype(args.weights)  # the kernel's copy; XLA's dot gets the same values in float32
    weights = [[w.astype(held).astype(jnp.float32) for w in ws] for ws in weights]
    packed = [[jnp.asarray(pack(np.asarray(w), held)) for w in ws] for ws in weights]  # once, as at load
    head = jnp.asarray(rng.standard_normal((config["hidden_size"], config["vocab_size"]), dtype=np.float32) * 0.02)
    heads = {"xla": jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32)),
             "cpu": jax.jit(lambda a, b: gemm_cpu(a, b, config["vocab_size"], isa=args.isa,
                                                   num_threads=args.num_threads))}
    head = head.astype(held).astype(jnp.float32)
    head_packed = jnp.asarray(pack(np.asarray(head), held))
    if held == jnp.float32:  # a greedy step's tokens: the head and its argmax, against gemm_cpu.argmax_head
        vocab = config["vocab_size"]
        hi, slack = jnp.asarray(gemm_cpu_mod.greedy_hi(head)), jnp.asarray(gemm_cpu_mod.greedy_slack(head))
        heads["cpu_argmax"] = jax.jit(lambda a, b: argmax_rows(gemm_cpu(a, b, vocab, isa=args.isa,
                                                                           num_threads=args.num_threads)))
        heads["greedy"] = jax.jit(lambda a, b: gemm_cpu_mod.argmax_head(a, b, hi, slack, vocab, isa=args.isa)[0])
    flops_per_row = 2 * layers * sum(k * n for k, n in shapes)
    for rows in (int(r) for r in args.rows.split(",")):
        x = jnp.asarray(rng.standard_normal((rows, config["hidden_size"]), dtype=np.float32))
        out = {"rows": rows, "layers": layers, "isa": args.isa if args.isa != "auto" else available_isas()[0],
               "weights": args.weights}
        for name, f in impls.items():
            seconds = timed(f, x, packed if name == "cpu" else weights, reps=args.reps)
            out[f"{name}_ms"] = round(seconds * 1e3, 2)
            out[f"{name}_gflops"] = round(flops_per_row * rows / seconds / 1e9, 1)
        out["xla_over_cpu"] = round(out["xla_ms"] / out["cpu_ms"], 2)
        for name, f in heads.items():
            out[f"{name}_head_ms"] = round(timed(f, x, head if name == "xla" else head_packed, reps=args.reps) * 1e3, 2)
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
