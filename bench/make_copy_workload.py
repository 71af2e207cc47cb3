"""Write a copy-heavy workload (the format of ../shared/workloads/README.md) for SmolLM2's tokenizer.

    python bench/make_copy_workload.py --out bench/workloads/copy-16.json

Each request asks SmolLM2-135M-Instruct (chat template) to repeat, correct or lightly edit a passage of
3-5 sentences of ``jaxserve/data/corpus.txt``, so that most of its answer copies its own prompt: the case
where prompt-lookup (n-gram) speculative decoding pays.  ``max_tokens`` is the passage's length in tokens
plus 8.  Token ids are SmolLM2's (a vocabulary of 49,152): run it with ``--model smollm2``.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

TASKS = (
    "Repeat the following text exactly, word for word:\n\n{text}",
    "Fix the spelling mistakes in the text below and return the whole corrected text:\n\n{typo}",
    "Rewrite the text below with each sentence on its own line, keeping every word:\n\n{text}",
    "Here is a paragraph:\n\n{text}\n\nCopy the paragraph above, then add one sentence at the end.",
)


def typos(text: str, rng: np.random.Generator) -> str:
    """Swap two adjacent letters in about one word out of eight."""
    words = text.split(" ")
    for i, w in enumerate(words):
        if len(w) > 3 and rng.random() < 0.125:
            j = int(rng.integers(1, len(w) - 2))
            words[i] = w[:j] + w[j + 1] + w[j] + w[j + 2:]
    return " ".join(words)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    from jaxserve.gguf_loader import load_gguf
    from jaxserve.hub import resolve_model

    _, _, tok = load_gguf(resolve_model("smollm2", None, None), np.float32, False)
    corpus = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "jaxserve", "data", "corpus.txt")
    lines = [ln.strip() for ln in open(corpus) if ln.strip()]
    rng = np.random.default_rng(args.seed)
    requests = []
    for i in range(args.requests):
        start = int(rng.integers(0, len(lines) - 5))
        text = " ".join(lines[start:start + int(rng.integers(3, 6))])
        task = TASKS[i % len(TASKS)].format(text=text, typo=typos(text, rng))
        prompt = tok.apply_chat_template([{"role": "user", "content": task}], tokenize=False,
                                         add_generation_prompt=True)
        ids = list(tok.encode(prompt, add_special_tokens=False))
        requests.append({"prompt_token_ids": ids, "max_tokens": len(tok.encode(text, add_special_tokens=False)) + 8})
    workload = {"name": f"copy-{args.requests}", "vocab_size": 49152,
                "description": f"{args.requests} SmolLM2 chat prompts asking to repeat, correct or re-line a passage "
                               f"of jaxserve/data/corpus.txt (max_tokens: passage tokens + 8; seed {args.seed})",
                "requests": requests}
    with open(args.out, "w") as f:
        json.dump(workload, f)
    n_in = sum(len(r["prompt_token_ids"]) for r in requests)
    n_out = sum(r["max_tokens"] for r in requests)
    print(f"wrote {args.out}: {len(requests)} requests, {n_in} prompt tokens, {n_out} output tokens")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
