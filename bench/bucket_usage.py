"""Which step buckets a workload uses: the scheduler and the runner's input packing run for real, the
model step does not (every step "samples" token 7, so requests end at their max_tokens).

    python3 bench/bucket_usage.py --model MODEL_DIR --workload ../shared/workloads/poisson-200.json \
        [--max-num-seqs 64 --max-num-batched-tokens 512 --max-model-len 2048]

Prints, per (decode rows, prefill tokens) bucket, how many steps used it and how many tokens those
steps padded, and which of the engine's buckets no step used.  Arrival workloads (``arrival_s``)
are replayed on a simulated clock where a step takes ``--step-s-base + --step-s-per-token * bucket
tokens`` seconds (default: a guess at a small model on a CPU; only the arrival pattern depends on it).
"""

from __future__ import annotations

import argparse
import collections
import json
import sys

import numpy as np


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--workload", nargs="+", required=True)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--max-num-batched-tokens", type=int, default=512)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--step-s-base", type=float, default=0.03)
    ap.add_argument("--step-s-per-token", type=float, default=0.0002)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    from jaxserve import Engine, SamplingParams
    from jaxserve.model_runner import StepResult

    results = {}
    for path in args.workload:
        engine = Engine.from_pretrained(args.model, max_num_seqs=args.max_num_seqs, page_size=args.page_size,
                                        max_num_batched_tokens=args.max_num_batched_tokens,
                                        max_model_len=args.max_model_len, compile_cache_dir=None,
                                        async_scheduling=False)  # steps through execute, replaced below
        runner = engine.runner
        used: collections.Counter = collections.Counter()
        padded: collections.Counter = collections.Counter()
        clock = [0.0]

        def fake_execute(out, runner=runner, used=used, padded=padded, clock=clock):
            host = runner.prepare(out)
            key, arrays = host.key, host.arrays
            used[key] += 1
            real = len(out.decodes) + sum(s.num_tokens for s in out.prefills)
            padded[key] += key[0] + key[1] - real
            clock[0] += args.step_s_base + args.step_s_per_token * (key[0] + key[1])
            tokens = np.full(len(arrays["seq_lens"]), 7, np.int32)
            return StepResult(tokens, None, None, None, host)

        runner.execute = fake_execute
        with open(path) as f:
            reqs = json.load(f)["requests"]
        pending = sorted(reqs, key=lambda r: r.get("arrival_s", 0.0))
        i = 0
        while i < len(pending) or engine.has_unfinished():
            while i < len(pending) and pending[i].get("arrival_s", 0.0) <= clock[0]:
                r = pending[i]
                engine.add_request(r["prompt_token_ids"],
                                   SamplingParams(temperature=0, max_tokens=r["max_tokens"], ignore_eos=True))
                i += 1
            if not engine.has_unfinished():
                clock[0] = pending[i]["arrival_s"]
                continue
            engine.step()
        all_keys = runner.buckets
        steps = sum(used.values())
        print(f"{path}: {steps} steps, {len(used)} of {len(all_keys)} buckets used")
        for key in sorted(used):
            print(f"  decode={key[0]:3d} prefill_tokens={key[1]:4d}: {used[key]:5d} steps, "
                  f"{padded[key]:7d} padded tokens")
        unused = [k for k in all_keys if k not in used]
        print(f"  unused: {unused}")
        results[path] = {"steps": steps, "used": {f"{k[0]}x{k[1]}": used[k] for k in sorted(used)},
                         "unused": [f"{k[0]}x{k[1]}" for k in unused]}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
