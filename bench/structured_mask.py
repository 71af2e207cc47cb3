"""Host cost of structured outputs: a batch of N requests that all follow a JSON schema, against the same
requests unconstrained (SmolLM2, temperature 1, seeded).  Prints one JSON line: per step, the host time
filling the token bitmasks (``runner.mask_stats``), the host packing time and the device time of both runs,
and the bitmask fill time of the steps in which all N rows were constrained (``fill_ms_all_rows``).

    python bench/structured_mask.py --num-requests 64
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

from jaxserve import Engine, SamplingParams  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=48)
    args = ap.parse_args(argv)
    from test_structured import SCHEMAS

    n = args.num_requests
    engine = Engine.from_pretrained(args.model, max_num_seqs=n, min_decode_bucket=n, max_num_batched_tokens=1024,
                                    min_prefill_bucket=1024, max_num_prefill_seqs=16, page_size=16,
                                    max_model_len=512, dtype="float32")
    prompts, schemas = [], []
    for i in range(n):
        schema = SCHEMAS[i % len(SCHEMAS)]
        prompts.append(engine.chat_prompt([{"role": "user", "content": f"Reply with JSON: {json.dumps(schema)}"}]))
        schemas.append(schema)
    result = {"model": args.model, "requests": n}
    backend = engine.grammar_backend()
    fills: list[tuple[int, float]] = []  # (rows, seconds) of every bitmask fill
    plain_fill = backend.fill

    def timed_fill(matchers, bitmask, rows):
        t0 = time.perf_counter()
        plain_fill(matchers, bitmask, rows)
        fills.append((len(rows), time.perf_counter() - t0))

    backend.fill = timed_fill
    for name, constrained in (("warmup", False), ("free", False), ("json", True)):
        params = [SamplingParams(temperature=1.0, seed=i, max_tokens=args.max_tokens,
                                 structured_outputs={"json": s} if constrained else None)
                  for i, s in enumerate(schemas)]
        r = engine.runner
        r.stats = dict.fromkeys(r.stats, 0)
        r.mask_stats = {"steps": 0, "rows": 0, "seconds": 0.0}
        t0 = time.perf_counter()
        outs = engine.generate(prompts, params)
        wall = time.perf_counter() - t0
        if name == "warmup":
            continue
        steps = r.stats["steps"]
        result[name] = {
            "wall_s": round(wall, 2), "steps": steps, "output_tokens": sum(len(o.token_ids) for o in outs),
            "prepare_ms_per_step": round(1e3 * r.stats["prepare_s"] / steps, 3),
            "device_ms_per_step": round(1e3 * r.stats["device_s"] / steps, 3),
            "mask_steps": r.mask_stats["steps"],
            "mask_rows_per_step": round(r.mask_stats["rows"] / max(1, r.mask_stats["steps"]), 1),
            "mask_fill_ms_per_step": round(1e3 * r.mask_stats["seconds"] / max(1, r.mask_stats["steps"]), 3),
            "finished_stop": sum(o.finish_reason == "stop" for o in outs)}
        full = [sec for rows, sec in fills if rows == n]
        if full:
            result[name]["fill_ms_all_rows"] = {"steps": len(full), "mean": round(1e3 * sum(full) / len(full), 3),
                                                "max": round(1e3 * max(full), 3)}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
