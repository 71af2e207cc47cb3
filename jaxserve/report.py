"""``jaxserve report``: merge benchmark records from any number of machines into tables and plots."""

from __future__ import annotations

import collections
import glob
import json
import os
from typing import Any


def load_records(paths: list[str]) -> list[dict[str, Any]]:
    files: list[str] = []
    for p in paths:
        files += sorted(glob.glob(os.path.join(p, "*.jsonl"))) if os.path.isdir(p) else [p]
    if not files:
        raise ValueError(f"results: no *.jsonl file in {', '.join(paths)}")
    records = []
    for path in files:
        with open(path) as f:
            records += [json.loads(line) for line in f if line.strip()]
    return records


def _latest(records: list[dict]) -> dict[tuple, dict]:
    """The newest record per (device, model, workload, mode, max_num_seqs, dtype)."""
    out: dict[tuple, dict] = {}
    for r in sorted(records, key=lambda r: r.get("time", "")):
        out[(r["device"], r["model"], r["workload"], r["mode"], r["max_num_seqs"], r["dtype"])] = r
    return out


def _cost_per_mtok(record: dict, prices: dict[str, float]) -> float | None:
    price = prices.get(record["device"])
    if price is None:
        return None
    return price / 3600 / record["tok_s"] * 1e6


_SHORT_DTYPE = {"bfloat16": "bf16", "float32": "f32", "float16": "f16"}


def _blank_none(value) -> str:
    return "" if value is None else f"{value:,.0f}"


def write_report(records: list[dict], out_dir: str, prices: dict[str, float] | None = None) -> str:
    """Write ``report.md`` and PNG plots into ``out_dir``; returns the markdown path."""
    prices = prices or {}
    os.makedirs(out_dir, exist_ok=True)
    latest = _latest(records)
    rows = sorted(latest.values(), key=lambda r: (r["device"], r["model"], r["workload"], r["dtype"],
                                                  r["max_num_seqs"], r["mode"]))
    lines = ["# jaxserve benchmark report", "",
             f"{len(rows)} runs from {len({r['device'] for r in rows})} device kind(s).", "",
             "## Throughput", "",
             "| device | model | workload | dtype | max_num_seqs | mode | tok/s | TTFT p50 ms | TPOT p50 ms "
             "| % of roofline | $ / M output tokens | warm-up s | host peak MiB | device peak MiB |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        frac = r.get("roofline_fraction")
        cost = _cost_per_mtok(r, prices)
        lines.append(f"| {r['device']} | {r['model']} | {r['workload']} | {r['dtype']} | {r['max_num_seqs']} | "
                     f"{r['mode']} | {r['tok_s']:.1f} | {r.get('ttft_ms', {}).get('p50', '')} | "
                     f"{r.get('tpot_ms', {}).get('p50', '')} | "
                     f"{'' if frac is None else f'{100 * frac:.1f}%'} | {'' if cost is None else f'{cost:.3f}'} | "
                     f"{r.get('warmup_s', '')} | {_blank_none(r.get('peak_host_rss_mb'))} | "
                     f"{_blank_none(r.get('device_peak_mb'))} |")
    lines += ["", "## Continuous over static batching", "",
              "| device | model | workload | dtype | max_num_seqs | continuous tok/s | static tok/s | speed-up |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for key, r in sorted(latest.items()):
        if key[3] != "continuous":
            continue
        static = latest.get(key[:3] + ("static",) + key[4:])
        if static:
            lines.append(f"| {r['device']} | {r['model']} | {r['workload']} | {r['dtype']} | {r['max_num_seqs']} | "
                         f"{r['tok_s']:.1f} | {static['tok_s']:.1f} | {r['tok_s'] / static['tok_s']:.2f}x |")
    lines += ["", "## Plots", ""]
    for name in _plots(rows, out_dir):
        lines.append(f"![{name}]({name})")
    path = os.path.join(out_dir, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def _label(r: dict, with_mode: bool) -> str:
    """A short axis label for a run: device, workload, then (mode,) max_num_seqs and dtype."""
    mode = f"{r['mode']} " if with_mode else ""
    dtype = _SHORT_DTYPE.get(r["dtype"], r["dtype"])
    return f"{r['device'][:18]} {r['workload']}\n{mode}{r['max_num_seqs']} seqs {dtype}"


def _plots(rows: list[dict], out_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    series = collections.defaultdict(list)
    for r in rows:
        series[(r["device"], r["workload"], r["mode"], r["dtype"])].append((r["max_num_seqs"], r["tok_s"]))
    for (device, workload, mode, dtype), pts in sorted(series.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{device} {workload} {mode} {dtype}")
    ax.set_xlabel("max_num_seqs")
    ax.set_ylabel("output tok/s")
    ax.set_xscale("log", base=2)
    ax.set_title("Throughput vs max_num_seqs")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "tok_s_vs_max_num_seqs.png"), dpi=100)
    plt.close(fig)
    written.append("tok_s_vs_max_num_seqs.png")

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    labels = [_label(r, with_mode=True) for r in rows]
    width = 0.27
    for ax, field, title in ((axes[0], "ttft_ms", "TTFT (ms, log scale)"),
                             (axes[1], "tpot_ms", "TPOT (ms, log scale)")):
        for k, p in enumerate(("p50", "p90", "p99")):
            ax.bar([i + (k - 1) * width for i in range(len(rows))], [r.get(field, {}).get(p, 0) for r in rows],
                   width=width, label=p)
        ax.set_yscale("log")
        ax.set_xticks(range(len(rows)), labels, rotation=90, fontsize=6)
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "latency_percentiles.png"), dpi=100)
    plt.close(fig)
    written.append("latency_percentiles.png")

    fig, ax = plt.subplots(figsize=(7, 4))
    pairs = [(r, s) for r in rows if r["mode"] == "continuous"
             for s in rows if s["mode"] == "static" and all(s[k] == r[k] for k in
                                                            ("device", "model", "workload", "max_num_seqs", "dtype"))]
    ax.bar(range(len(pairs)), [r["tok_s"] / s["tok_s"] for r, s in pairs])
    ax.set_xticks(range(len(pairs)), [_label(r, with_mode=False) for r, _ in pairs], rotation=60, fontsize=7)
    ax.axhline(1.0, color="k", linewidth=0.8)
    ax.set_ylabel("continuous / static tok/s")
    ax.set_title("Continuous vs static batching")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "continuous_vs_static.png"), dpi=100)
    plt.close(fig)
    written.append("continuous_vs_static.png")
    return written
