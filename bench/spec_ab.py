"""Speculative decoding against plain decoding, interleaved in one process: one JSON line.

    python bench/spec_ab.py --model smollm2 --workload bench/workloads/copy-16.json --limit 8 \\
        --max-num-seqs 1 --speculative-config '{"method": "ngram", "num_speculative_tokens": 3}'

Two engines on the same weights file (plain, and with ``--speculative-config``), both warmed up, then
the workload through each in turn, ``--rounds`` times (plain, speculative, plain, speculative, ...).
On a shared 2-core machine the same command's tok/s moves by 15-20% from one process to the next; the
rounds of one process share its memory layout and the machine's state at that minute, so the ratio of
the summed times is steadier than a ratio of two separate ``bench/throughput.py`` runs.  Greedy with
EOS ignored, as throughput.py, so every round produces the same number of tokens.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxserve import Engine  # noqa: E402
from jaxserve.benchmark import load_workload, run_workload  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--workload", required=True)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-num-seqs", type=int, default=1)
    ap.add_argument("--max-num-batched-tokens", type=int, default=256)
    ap.add_argument("--max-num-prefill-seqs", type=int, default=8)
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--min-prefill-bucket", type=int, default=8)
    ap.add_argument("--speculative-config", type=json.loads, required=True, metavar="JSON")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    requests = load_workload(args.workload)["requests"][:args.limit]
    kw = dict(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
              max_model_len=args.max_model_len, min_prefill_bucket=args.min_prefill_bucket,
              max_num_prefill_seqs=args.max_num_prefill_seqs)
    engines = {"plain": Engine.from_pretrained(args.model, **kw),
               "spec": Engine.from_pretrained(args.model, **kw, speculative_config=args.speculative_config)}
    for e in engines.values():
        e.warmup()
    seconds = {name: 0.0 for name in engines}
    steps = {name: 0 for name in engines}
    tokens, per_round = 0, []
    for _ in range(args.rounds):
        row = {}
        for name, e in engines.items():
            before = e.runner.stats["steps"]
            run = run_workload(e, requests, progress=False)
            seconds[name] += run["seconds"]
            steps[name] += e.runner.stats["steps"] - before
            row[name] = round(run["output_tokens"] / run["seconds"], 2)
            tokens = run["output_tokens"]
        per_round.append(row)
    tok_s = {name: round(args.rounds * tokens / s, 2) for name, s in seconds.items()}
    print(json.dumps({
        "model": args.model, "workload": os.path.basename(args.workload), "requests": len(requests),
        "max_num_seqs": args.max_num_seqs, "speculative_config": args.speculative_config,
        "rounds": args.rounds, "output_tokens_per_round": tokens, "tok_s": tok_s,
        "speedup": round(tok_s["spec"] / tok_s["plain"], 3),
        "steps_per_round": {k: v // args.rounds for k, v in steps.items()},
        "per_round_tok_s": per_round, "speculative": engines["spec"].spec_metrics()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
