"""Where a step's time goes: device time of decode and prefill steps at several batch/context sizes,
with the real attention and with attention replaced by a no-op (so the rest is the weights' matmuls,
sampling and the cache writes).  Prints one JSON line per measurement.

    python bench/step_profile.py --model models/56m [--dtype bfloat16] [--attention-impl reference,cpu]
        [--layer-impl fused,ops]

``--attention-impl`` / ``--layer-impl`` with several implementations run each case with each, in one process:
the engines take turns, step by step for prefill and in ``--rounds`` rounds of ``--steps`` steps for decode
(the A/B of a noisy machine).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

import jaxserve.model as model_mod  # noqa: E402
from jaxserve import Engine, SamplingParams  # noqa: E402


def time_steps(engine: Engine, n: int) -> float:
    """Median seconds of the next n engine steps."""
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def decode_engine(args, batch: int, context: int, impl: str, layer: str) -> Engine:
    """An engine with ``batch`` sequences decoding at ``context`` tokens, warmed up."""
    engine = Engine.from_pretrained(args.model, max_num_seqs=max(batch, args.slots), max_model_len=1024,
                                    max_num_batched_tokens=512, dtype=args.dtype, layer_loop=args.layer_loop,
                                    attention_impl=impl, layer_impl=layer,
                                    async_scheduling=False)  # a step's time, not overlapped with the next
    rng = np.random.default_rng(0)
    vocab = engine.model_config.vocab_size
    prompt = min(args.grow_from, context) if args.grow_from else context
    for _ in range(batch):
        engine.add_request(rng.integers(3, vocab, prompt).tolist(),
                           SamplingParams(temperature=0, max_tokens=context - prompt + 200 + args.steps * args.rounds,
                                          ignore_eos=True, detokenize=False))
    # every sequence's context built by decode steps from a short prompt (--grow-from): pages taken in turn,
    # as in serving, instead of each prompt's pages at once
    while engine.scheduler.waiting or any(s.num_tokens - 1 < context for s in engine.scheduler.running):
        engine.step()
    time_steps(engine, 3)  # compile + warm
    return engine


def decode_cases(args, batch: int, context: int, attention: bool, runs: list) -> list[dict]:
    """One line per (attention impl, layer impl) of ``runs``: the median over ``--rounds`` of each round's median
    step, the runs' engines taking turns round by round (one process: the A/B of a noisy machine)."""
    engines = [decode_engine(args, batch, context, impl, layer) for impl, layer in runs]
    times = [[] for _ in runs]
    for _ in range(args.rounds):
        for engine, t in zip(engines, times):
            t.append(time_steps(engine, args.steps))
    out = []
    for engine, t in zip(engines, times):
        step = float(np.median(t))
        pages = [1 + int(np.count_nonzero(np.diff(s.page_ids) != 1)) for s in engine.scheduler.running]
        out.append({"case": "decode", "dtype": engine.dtype_name, "batch": batch, "slots": engine.config.max_num_seqs,
                    "bucket": min(b for b in engine.runner.decode_buckets if b >= batch), "context": context,
                    "grow_from": args.grow_from, "page_runs": round(float(np.mean(pages)), 2),
                    "attention": attention and engine.runner.attention_impl, "layer_loop": engine.runner.layer_loop,
                    "layer_impl": engine.runner.layer_impl, "step_ms": round(step * 1e3, 2),
                    "round_ms": [round(x * 1e3, 2) for x in t], "tok_s": round(batch / step, 1)})
    return out


def prefill_cases(args, prompts: int, length: int, attention: bool, runs: list) -> list[dict]:
    """One line per run of ``runs``: the median of ``--steps`` steps that each prefill ``prompts`` new prompts (after
    two warm-up steps), the runs' engines taking turns step by step."""
    engines = [Engine.from_pretrained(args.model, max_num_seqs=64, max_model_len=1024, max_num_batched_tokens=512,
                                      dtype=args.dtype, layer_loop=args.layer_loop, attention_impl=impl,
                                      layer_impl=layer, async_scheduling=False) for impl, layer in runs]
    rng = np.random.default_rng(0)
    vocab = engines[0].model_config.vocab_size
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True, detokenize=False)
    times = [[] for _ in runs]
    for rep in range(args.steps + 2):
        for engine, t in zip(engines, times):
            for _ in range(prompts):
                engine.add_request(rng.integers(3, vocab, length).tolist(), params)
            t0 = time.perf_counter()
            engine.step()
            t.append(time.perf_counter() - t0)
            while engine.has_unfinished():
                engine.step()
    out = []
    for engine, t in zip(engines, times):
        step = float(np.median(t[2:]))
        out.append({"case": "prefill", "dtype": engine.dtype_name, "prompts": prompts, "length": length,
                    "attention": attention and engine.runner.attention_impl, "layer_loop": engine.runner.layer_loop,
                    "layer_impl": engine.runner.layer_impl, "step_ms": round(step * 1e3, 2),
                    "prompt_tok_s": round(prompts * length / step, 1)})
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=1,
                    help="decode cases: rounds of --steps steps, the engines of several implementations in turn")
    ap.add_argument("--batches", default="16,32,64")
    ap.add_argument("--contexts", default="128,512")
    ap.add_argument("--dtype", default="auto", help="float32, bfloat16 or auto (float32 on CPU)")
    ap.add_argument("--layer-loop", default="auto", choices=["auto", "scan", "switch"])
    ap.add_argument("--slots", type=int, default=0,
                    help="decode cases: the engine's max_num_seqs when above the batch, so that the batch runs in a "
                         "larger bucket (its padding slots)")
    ap.add_argument("--no-attention-off", action="store_true", help="skip the runs with attention replaced")
    ap.add_argument("--grow-from", type=int, default=0,
                    help="decode cases: prompts of this many tokens, decoded up to the context (0: the whole "
                         "context as the prompt); page_runs is then how many runs of adjacent pages a sequence has")
    ap.add_argument("--attention-impl", default="auto",
                    help="attention implementation(s), comma-separated: each case runs with each, in turn")
    ap.add_argument("--layer-impl", default="auto",
                    help="auto, fused or ops (kernels_pallas/layer_cpu.py), comma-separated: each case runs with each, "
                         "in turn; the runs with attention replaced are op by op (the fused layer has its own)")
    args = ap.parse_args()
    real = model_mod.ragged_paged_attention
    impls = args.attention_impl.split(",")
    layers = args.layer_impl.split(",")
    for attention in (True,) if args.no_attention_off else (True, False):
        model_mod.ragged_paged_attention = real if attention else (lambda q, *a, **k: q)
        runs = [(i, li) for i in impls for li in layers] if attention else [(impls[0], "ops")]
        for b in map(int, args.batches.split(",")):
            for c in map(int, args.contexts.split(",")):
                for line in decode_cases(args, b, c, attention, runs):
                    print(json.dumps(line), flush=True)
        for line in prefill_cases(args, 4, 128, attention, runs):
            print(json.dumps(line), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
