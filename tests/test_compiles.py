"""Bounded compilation: one program per (decode, prefill) bucket, never a recompile."""

from __future__ import annotations

import json
import os

import pytest

from conftest import ROOT, assert_clean, greedy
from jaxserve import Engine

WORKLOAD = os.path.join(os.path.dirname(ROOT), "shared", "workloads", "longtail-64.json")
NUM_REQUESTS = 16
MAX_TOKENS_CAP = 8


@pytest.fixture(scope="module")
def workload():
    if not os.path.isfile(WORKLOAD):
        pytest.skip(f"workload file {WORKLOAD} not found (the shared/ directory is expected beside "
                    "the repository clone, as in CI)")
    with open(WORKLOAD) as f:
        reqs = json.load(f)["requests"][:NUM_REQUESTS]
    assert len(reqs) == NUM_REQUESTS
    return [r["prompt_token_ids"] for r in reqs], [min(r["max_tokens"], MAX_TOKENS_CAP) for r in reqs]


@pytest.fixture(scope="module")
def vocab32k_dir(model_factory):
    return model_factory("llama_32k", vocab_size=32000, tokenizer=False)


def test_compile_count_bounded_and_stable(vocab32k_dir, workload):
    prompts, max_tokens = workload
    assert max(t for p in prompts for t in p) < 32000
    engine = Engine.from_pretrained(vocab32k_dir, max_num_seqs=8, page_size=16, max_model_len=512,
                                    max_num_batched_tokens=128)
    assert engine.compile_count == 0
    outs = engine.generate(prompts, [greedy(n) for n in max_tokens])
    assert [len(o.token_ids) for o in outs] == max_tokens
    first = engine.compile_count
    assert 0 < first <= engine.num_buckets
    assert_clean(engine)
    again = engine.generate(prompts, [greedy(n) for n in max_tokens])
    assert engine.compile_count == first, "the same workload compiled new programs"
    assert [o.token_ids for o in again] == [o.token_ids for o in outs]
    assert_clean(engine)


def test_warmup_compiles_every_bucket_once(engine):
    engine.warmup()
    assert engine.compile_count == engine.num_buckets
    engine.warmup()
    assert engine.compile_count == engine.num_buckets
    out = engine.generate([list(range(3, 200)), [7]], [greedy(9), greedy(30)])
    assert [len(o.token_ids) for o in out] == [9, 30]
    assert engine.compile_count == engine.num_buckets
    assert_clean(engine)
