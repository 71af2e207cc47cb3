"""Write a shared-prefix workload file (the format of ../shared/workloads/README.md).

    python bench/make_prefix_workload.py --out /tmp/prefix-200.json

``--requests`` requests, each a random choice of ``--prefixes`` system prompts of
``--prefix-len`` tokens followed by a random user part, with Poisson arrivals at
``--rate`` requests per second; token ids in 3..31999 (a vocabulary of 32,000).
"""

from __future__ import annotations

import argparse
import json

import numpy as np


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--prefixes", type=int, default=4)
    ap.add_argument("--prefix-len", type=int, default=200)
    ap.add_argument("--rate", type=float, default=4.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    prefixes = [rng.integers(3, 32000, args.prefix_len).tolist() for _ in range(args.prefixes)]
    arrival = np.cumsum(rng.exponential(1.0 / args.rate, args.requests))
    requests = [{"prompt_token_ids": prefixes[rng.integers(args.prefixes)] + rng.integers(3, 32000, int(rng.integers(8, 64))).tolist(),
                 "max_tokens": int(rng.integers(16, 128)), "arrival_s": round(float(t), 3)} for t in arrival]
    workload = {"name": f"prefix{args.prefixes}x{args.prefix_len}-{args.requests}", "vocab_size": 32000,
                "description": f"{args.requests} requests sharing {args.prefixes} system prompts of "
                               f"{args.prefix_len} tokens, Poisson arrivals at {args.rate}/s (seed {args.seed})",
                "requests": requests}
    with open(args.out, "w") as f:
        json.dump(workload, f)
    print(f"wrote {args.out}: {workload['description']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
