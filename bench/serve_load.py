"""Replay an arrival workload against a running jaxserve (or any OpenAI-compatible) server.

    jaxserve make-model models/tiny32k --size tiny --vocab-size 32000
    jaxserve serve --model models/tiny32k --port 8000 --max-model-len 1024 &
    python bench/serve_load.py --url http://127.0.0.1:8000 --workload ../shared/workloads/poisson-200.json

Each request is sent at its ``arrival_s`` (scaled by ``--time-scale``) as a streaming
``/v1/completions`` call with its token-id prompt, greedy, EOS ignored, ``max_tokens`` from
the workload.  Per request: TTFT (send -> first token), TPOT ((e2e - TTFT) / (tokens - 1)),
end-to-end latency.  Prints one JSON object: percentiles, throughput, error counts.

Bounded: at most ``--limit`` requests, each with ``--request-timeout``, the whole run
within ``--deadline`` seconds (requests still running then are cancelled and counted).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from dataclasses import dataclass
from urllib.parse import urlparse

import httpx
import numpy as np

logger = logging.getLogger("serve_load")


@dataclass
class Result:
    ok: bool = False
    error: str | None = None
    ttft_s: float | None = None
    e2e_s: float | None = None
    tokens: int = 0
    expected_tokens: int = 0


async def _stream_one(client: httpx.AsyncClient, url: str, body: dict, headers: dict, result: Result,
                      t0: float) -> None:
    async with client.stream("POST", f"{url}/v1/completions", json=body, headers=headers) as resp:
        if resp.status_code != 200:
            result.error = f"http_{resp.status_code}"
            await resp.aread()
            return
        async for line in resp.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[len("data: "):]
            if data == "[DONE]":
                result.e2e_s = time.perf_counter() - t0
                return
            chunk = json.loads(data)
            if "error" in chunk:
                result.error = "stream_error"
                return
            for choice in chunk.get("choices", []):
                n = len(choice.get("token_ids") or [])
                if n:
                    now = time.perf_counter() - t0
                    if result.ttft_s is None:
                        result.ttft_s = now
                    result.tokens += n
        result.error = "stream_incomplete"


async def one_request(client: httpx.AsyncClient, url: str, model: str | None, req: dict, timeout: float,
                      api_key: str | None) -> Result:
    body = {"prompt": req["prompt_token_ids"], "max_tokens": req["max_tokens"], "temperature": 0.0,
            "ignore_eos": True, "stream": True, "return_token_ids": True}
    if model:
        body["model"] = model
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    result = Result(expected_tokens=req["max_tokens"])
    try:
        await asyncio.wait_for(_stream_one(client, url, body, headers, result, time.perf_counter()), timeout)
    except asyncio.TimeoutError:
        result.error = "timeout"
    except httpx.HTTPError as e:
        result.error = type(e).__name__
    if result.error is None and result.tokens != result.expected_tokens:
        result.error = "wrong_token_count"
    result.ok = result.error is None and result.e2e_s is not None
    return result


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p99": None, "mean": None}
    a = np.asarray(values)
    return {"p50": round(float(np.percentile(a, 50)), 4), "p99": round(float(np.percentile(a, 99)), 4),
            "mean": round(float(a.mean()), 4)}


async def run(args) -> dict:
    with open(args.workload) as f:
        workload = json.load(f)
    requests = workload["requests"][:args.limit]
    host = urlparse(args.url).hostname
    if host not in ("127.0.0.1", "localhost", "::1") and not args.allow_remote:
        raise SystemExit(f"--url: {host} is not loopback; pass --allow-remote to load another host")
    url = args.url.rstrip("/")
    limits = httpx.Limits(max_connections=args.max_connections, max_keepalive_connections=args.max_connections)
    results: list[Result] = []
    async with httpx.AsyncClient(timeout=httpx.Timeout(args.request_timeout), limits=limits) as client:
        start = time.perf_counter()

        async def scheduled(req: dict) -> Result:
            delay = req.get("arrival_s", 0.0) * args.time_scale - (time.perf_counter() - start)
            if delay > 0:
                await asyncio.sleep(delay)
            return await one_request(client, url, args.model, req, args.request_timeout, args.api_key)

        tasks = [asyncio.create_task(scheduled(r)) for r in requests]
        done, pending = await asyncio.wait(tasks, timeout=args.deadline)
        for t in pending:
            t.cancel()
        wall = time.perf_counter() - start
        for t in tasks:
            if t in done and not t.cancelled() and t.exception() is None:
                results.append(t.result())
            else:
                results.append(Result(error="deadline" if t in pending else "exception"))
    ok = [r for r in results if r.ok]
    errors: dict[str, int] = {}
    for r in results:
        if not r.ok:
            errors[r.error or "unknown"] = errors.get(r.error or "unknown", 0) + 1
    tpot = [(r.e2e_s - r.ttft_s) / (r.tokens - 1) for r in ok if r.tokens > 1]
    out_tokens = sum(r.tokens for r in results)
    return {
        "workload": workload.get("name", args.workload), "url": url, "requests": len(requests),
        "completed": len(ok), "errors": errors, "wall_s": round(wall, 2), "time_scale": args.time_scale,
        "output_tokens": out_tokens, "output_tok_s": round(out_tokens / wall, 1),
        "requests_per_s": round(len(ok) / wall, 3),
        "ttft_s": percentiles([r.ttft_s for r in ok]), "tpot_s": percentiles(tpot),
        "e2e_s": percentiles([r.e2e_s for r in ok]),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--workload", required=True)
    ap.add_argument("--model", default=None, help="the 'model' field to send (default: none)")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--limit", type=int, default=None, help="only the first N requests")
    ap.add_argument("--time-scale", type=float, default=1.0, help="multiply arrival times (0: all at once)")
    ap.add_argument("--request-timeout", type=float, default=600.0)
    ap.add_argument("--deadline", type=float, default=1800.0, help="seconds for the whole run")
    ap.add_argument("--max-connections", type=int, default=256)
    ap.add_argument("--allow-remote", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    report = asyncio.run(run(args))
    print(json.dumps(report))
    return 0 if not report["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
