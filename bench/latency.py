"""Online latency benchmark: replay a workload's arrival times against the engine (in process, through
``add_request``/``step``) and print one JSON line with latency percentiles.

    python bench/latency.py --model models/56m --workload ../shared/workloads/poisson-200.json

Definitions (as vLLM's benchmarks): TTFT = first token time - arrival; TPOT = (e2e - TTFT) /
(output tokens - 1) per request; ITL = gaps between consecutive tokens of a request; e2e = finish
time - arrival.  Requests are greedy with EOS ignored, so each produces exactly ``max_tokens``.
``--plot FILE.png`` draws the distributions (needs matplotlib).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from jaxserve import Engine, SamplingParams  # noqa: E402
from jaxserve.benchmark import load_workload, percentiles  # noqa: E402


def replay(engine: Engine, requests: list[dict], time_scale: float = 1.0) -> dict[str, dict]:
    """Add each request at its arrival time and step the engine; returns per-request timings."""
    order = sorted(range(len(requests)), key=lambda i: requests[i].get("arrival_s", 0.0))
    timings: dict[str, dict] = {}
    next_i = 0
    start = time.monotonic()
    while next_i < len(order) or engine.has_unfinished():
        now = time.monotonic() - start
        while next_i < len(order) and requests[order[next_i]].get("arrival_s", 0.0) * time_scale <= now:
            r = requests[order[next_i]]
            rid = engine.add_request(r["prompt_token_ids"], SamplingParams(
                temperature=0.0, max_tokens=r["max_tokens"], ignore_eos=True, detokenize=False))
            timings[rid] = {"arrival": start + r.get("arrival_s", 0.0) * time_scale, "tokens": []}
            next_i += 1
        if not engine.has_unfinished():
            wait = requests[order[next_i]].get("arrival_s", 0.0) * time_scale - (time.monotonic() - start)
            time.sleep(max(0.0, wait))
            continue
        for out in engine.step():
            t = timings[out.request_id]
            t["tokens"].extend([time.monotonic()] * len(out.new_token_ids))
            if out.finished:
                t["finish"] = time.monotonic()
    return timings


def summarize(timings: dict[str, dict]) -> dict:
    ttft, tpot, itl, e2e = [], [], [], []
    for t in timings.values():
        toks = t["tokens"]
        ttft.append(toks[0] - t["arrival"])
        e2e.append(t["finish"] - t["arrival"])
        if len(toks) > 1:
            tpot.append((e2e[-1] - ttft[-1]) / (len(toks) - 1))
            itl.extend(np.diff(toks).tolist())
    return {"ttft_ms": percentiles(ttft, True), "tpot_ms": percentiles(tpot, True),
            "itl_ms": percentiles(itl, True), "e2e_ms": percentiles(e2e, True),
            "_raw": {"ttft": ttft, "tpot": tpot, "itl": itl, "e2e": e2e}}


def plot(raw: dict[str, list[float]], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(16, 3.5))
    for ax, (name, values) in zip(axes, raw.items()):
        ax.hist(np.asarray(values) * 1e3, bins=40)
        ax.set_title(f"{name} (ms)")
        for p, style in ((50, "--"), (99, ":")):
            if values:
                ax.axvline(np.percentile(np.asarray(values) * 1e3, p), color="k", linestyle=style, label=f"p{p}")
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--workload", required=True)
    ap.add_argument("--max-num-seqs", type=int, default=32)
    ap.add_argument("--max-num-batched-tokens", type=int, default=512)
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--no-chunked-prefill", action="store_true",
                    help="prefill each prompt in one step (the budget is raised to max_model_len)")
    ap.add_argument("--no-prefix-caching", action="store_true")
    ap.add_argument("--limit", type=int, default=None, help="only the first N requests")
    ap.add_argument("--time-scale", type=float, default=1.0, help="multiply arrival times (0 = all at once)")
    ap.add_argument("--plot", default=None, help="write latency histograms to this PNG")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    workload = load_workload(args.workload)
    requests = workload["requests"][:args.limit]
    budget = args.max_num_batched_tokens
    if args.no_chunked_prefill:
        budget = max(budget, args.max_model_len)
    engine = Engine.from_pretrained(
        args.model, max_num_seqs=args.max_num_seqs, max_num_batched_tokens=budget,
        max_model_len=args.max_model_len, enable_chunked_prefill=not args.no_chunked_prefill,
        enable_prefix_caching=not args.no_prefix_caching)
    warmup_s = engine.warmup()
    t0 = time.monotonic()
    timings = replay(engine, requests, args.time_scale)
    seconds = time.monotonic() - t0
    summary = summarize(timings)
    raw = summary.pop("_raw")
    output_tokens = sum(len(t["tokens"]) for t in timings.values())
    sched = engine.scheduler
    result = {
        "engine": "jaxserve", "workload": workload.get("name", os.path.basename(args.workload)),
        "requests": len(requests), "chunked_prefill": not args.no_chunked_prefill,
        "prefix_caching": not args.no_prefix_caching, "max_num_seqs": args.max_num_seqs,
        "max_num_batched_tokens": budget, **summary,
        "seconds": round(seconds, 2), "output_tok_s": round(output_tokens / seconds, 1),
        "request_s": round(len(requests) / seconds, 2), "preemptions": sched.num_preemptions,
        "prefill_tokens": sched.num_prefill_tokens, "prefix_cache_hit_tokens": sched.prefix_cache_hit_tokens,
        "prefix_cache_hit_rate": round(sched.prefix_cache_hit_tokens / max(1, sched.prefix_cache_query_tokens), 4),
        "warmup_s": round(warmup_s, 1), "compiles": engine.compile_count, "device": jax.devices()[0].device_kind,
    }
    if args.plot:
        plot(raw, args.plot, f"{result['workload']} chunked_prefill={result['chunked_prefill']}")
        result["plot"] = args.plot
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
