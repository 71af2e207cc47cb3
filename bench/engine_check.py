"""Greedy engine tokens with the backend's Pallas kernel equal those with the reference attention.

    python3 bench/engine_check.py --model models/56m [--dtype float32,bfloat16] [--num-prompts 16]

For each dtype, two engines on the same checkpoint (``attention_impl="auto"``: the TPU/GPU kernel, and
``"reference"``) generate greedily for the same prompts (random token ids of 5-300 tokens, more prompts
than slots so slots are refilled, prompts longer than a prefill chunk).  Prints one JSON line per dtype
with the fraction of requests whose tokens are identical and the first differing position; float32
must match exactly (exit code 1 otherwise); bfloat16 is reported (rounding can flip a near-tie).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from jaxserve import Engine, SamplingParams  # noqa: E402

SLOTS, MAX_LEN, PAGE = 8, 1024, 16


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--dtype", default="float32,bfloat16")
    ap.add_argument("--num-prompts", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=32)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    ok = True
    for dtype in args.dtype.split(","):
        outs = {}
        for impl in ("auto", "reference"):
            print(f"engine_check: {dtype}, attention {impl}", file=sys.stderr, flush=True)
            # A cache of every slot at max_model_len, not one sized to the device's free memory: on a GPU
            # the two engines of a dtype are alive together for a moment.
            engine = Engine.from_pretrained(args.model, max_num_seqs=SLOTS, max_num_batched_tokens=256,
                                            max_model_len=MAX_LEN, num_pages=SLOTS * MAX_LEN // PAGE,
                                            page_size=PAGE, dtype=dtype, attention_impl=impl)
            vocab = engine.model_config.vocab_size
            if impl == "auto":
                prompts = [rng.integers(3, vocab, size=int(n)).tolist()
                           for n in rng.integers(5, 300, size=args.num_prompts)]
                used = engine.runner.attention_impl
            res = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True))
            outs[impl] = [o.token_ids for o in res]
        same = [a == b for a, b in zip(outs["auto"], outs["reference"])]
        first = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
                 for a, b in zip(outs["auto"], outs["reference"])]
        row = dict(dtype=dtype, kernel=used, requests=len(same), identical=sum(same),
                   first_difference=[f for f in first if f is not None][:8])
        print(json.dumps({"engine_check": row}), flush=True)
        if dtype == "float32" and not all(same):
            ok = False
        if used == "reference":
            ok = False  # the kernel was not used: nothing was checked
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
