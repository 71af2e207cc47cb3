"""Quality gate for quantized serving: perplexity and greedy-token agreement, one JSON line per setting.

    python bench/quality.py                       # SmolLM2-135M-Instruct (Q4_1 GGUF), every setting
    python bench/quality.py --model /work/models/56m --settings f32,int8

For each setting (``SETTINGS``: f32, int8 weights, int8 weights and activations; int8 KV cache and both, once ``EngineConfig`` has
``kv_cache_dtype``) it loads the model, then

* ``ppl``: perplexity of ``jaxserve/data/corpus.txt`` (ships with the package), from the engine's prompt
  logprobs of every corpus token after the first (one request, prefilled in chunks);
* ``agree``: greedy agreement with the first setting (the float32 baseline) over the first ``--tokens``
  (32) generated tokens of each prompt of ``PROMPTS``: the fraction of positions with the same token, and
  ``prefix``: the mean number of leading tokens equal to the baseline's;
* ``weight_mib``: the bytes of the weights as the engine holds them (int8 counts one byte per element),
  and ``ppl_change``: the relative perplexity change against the baseline.

SmolLM2's file is Q4_1: its float32 baseline is the Q4_1 weights dequantized; ``int8`` re-quantizes those
per output channel (``jaxserve/quant.py``); ``gguf`` keeps the file's blocks (int8 codes, block scales).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
from importlib import resources

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxserve import Engine, EngineConfig, SamplingParams  # noqa: E402
from jaxserve.quant import param_bytes  # noqa: E402

# name -> EngineConfig overrides.  A setting is one line.
SETTINGS = {
    "f32": {},
    "int8": {"quantization": "int8"},
    "w8a8": {"quantization": "w8a8"},
    "gguf": {"quantization": "gguf"},  # the GGUF file's Q4_1/Q8_0 blocks kept (int8 codes + block scales)
}
if "kv_cache_dtype" in {f.name for f in dataclasses.fields(EngineConfig)}:  # the 8-bit KV cache (issue 18 part 3)
    SETTINGS["int8_kv"] = {"kv_cache_dtype": "int8"}
    SETTINGS["int8_both"] = {"quantization": "int8", "kv_cache_dtype": "int8"}

PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea.",
    "Explain what a KV cache is in one paragraph.",
    "def fibonacci(n):",
    "List three uses of a hash table:",
    "Once upon a time, in a small village,",
    "The three primary colors are",
    "Translate to French: Good morning, how are you?",
]


def corpus_text() -> str:
    return resources.files("jaxserve").joinpath("data/corpus.txt").read_text(encoding="utf-8")


def evaluate(model: str, overrides: dict, tokens: int, engine_kw: dict) -> dict:
    engine = Engine.from_pretrained(model, **engine_kw, **overrides)
    ids = engine.tokenizer.encode(corpus_text())
    out = engine.generate([ids], SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0))[0]
    lps = [lp.logprob for lp in out.prompt_logprobs[1:]]
    prompts = [engine.tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                    add_generation_prompt=True)
               if engine.tokenizer.chat_template else p for p in PROMPTS]
    gen = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True))
    return {"ppl": math.exp(-sum(lps) / len(lps)), "corpus_tokens": len(ids),
            "weight_mib": param_bytes(engine.runner.params) / 2**20, "greedy": [g.token_ids for g in gen]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2", help="HF directory, .gguf file, or 'smollm2' (the default)")
    ap.add_argument("--settings", default=",".join(SETTINGS),
                    help=f"comma-separated, the first is the baseline (default: {','.join(SETTINGS)})")
    ap.add_argument("--tokens", type=int, default=32, help="greedy tokens per prompt compared")
    args = ap.parse_args(argv)
    names = args.settings.split(",")
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        raise SystemExit(f"--settings: unknown setting {unknown[0]!r} (known: {', '.join(SETTINGS)})")
    logging.basicConfig(level=logging.WARNING)
    engine_kw = dict(max_num_seqs=8, max_num_batched_tokens=256, max_model_len=1024, min_prefill_bucket=256,
                     dtype="float32")
    base = None
    for name in names:
        r = evaluate(args.model, SETTINGS[name], args.tokens, engine_kw)
        base = base or r
        pairs = [(a, b) for ga, gb in zip(r["greedy"], base["greedy"]) for a, b in zip(ga, gb)]
        prefixes = [next((i for i, (a, b) in enumerate(zip(ga, gb)) if a != b), len(ga))
                    for ga, gb in zip(r["greedy"], base["greedy"])]
        print(json.dumps({
            "setting": name, **SETTINGS[name], "model": args.model, "ppl": round(r["ppl"], 4),
            "ppl_change": round(r["ppl"] / base["ppl"] - 1, 5), "corpus_tokens": r["corpus_tokens"],
            "agree": round(sum(a == b for a, b in pairs) / len(pairs), 4),
            "prefix": round(sum(prefixes) / len(prefixes), 2), "prompts": len(PROMPTS), "tokens": args.tokens,
            "weight_mib": round(r["weight_mib"], 1)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
