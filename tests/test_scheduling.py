"""Scheduling policy changes when tokens are computed, never which tokens come out.

* continuous vs static batching, one slot vs many: identical greedy tokens;
* continuous batching refills a finished request's slot at the very next step;
* static batching admits nothing until the whole batch finished;
* a cache too small for all requests preempts (and recomputes) without changing outputs.
"""

from __future__ import annotations

import pytest

from conftest import ENGINE_KW, assert_clean, greedy, random_prompts
from jaxserve import Engine, SamplingParams
from jaxserve.sequence import Status

PROMPT_LENGTHS = [1, 7, 70, 16, 3, 130, 33, 9]
MAX_TOKENS = [12, 3, 9, 17, 1, 6, 10, 20]
PROMPTS = random_prompts(PROMPT_LENGTHS, seed=21)


@pytest.fixture(scope="module")
def reference(reference_outputs):
    return reference_outputs(PROMPTS, MAX_TOKENS)


@pytest.mark.parametrize("scheduling,max_num_seqs,extra", [
    ("static", 4, {}), ("continuous", 1, {}), ("continuous", 8, {}), ("static", 8, {}),
    # Many small chunks per prompt (a 130-token prompt in 9 chunks), small pages.
    ("continuous", 4, dict(page_size=4, max_num_batched_tokens=16)),
    # One token per page; one prefill sequence per step.
    ("continuous", 3, dict(page_size=1, max_num_prefill_seqs=1)),
], ids=["static-4", "continuous-1", "continuous-8", "static-8", "chunks16-page4", "page1-oneprefill"])
def test_same_tokens_whatever_the_policy(llama_dir, reference, scheduling, max_num_seqs, extra):
    kw = dict(ENGINE_KW, max_num_seqs=max_num_seqs, scheduling=scheduling)
    kw.update(extra)
    engine = Engine.from_pretrained(llama_dir, **kw)
    outs = engine.generate(PROMPTS, [greedy(n) for n in MAX_TOKENS])
    assert [o.token_ids for o in outs] == reference
    assert [len(o.token_ids) for o in outs] == MAX_TOKENS
    assert_clean(engine)


def _ids(seqs):
    return [s.request_id for s in seqs]


@pytest.fixture(scope="module")
def small_engines(llama_dir):
    """Two-slot engines, continuous and static (shared by the refill and static tests)."""
    kw = dict(ENGINE_KW, max_num_seqs=2)
    return {s: Engine.from_pretrained(llama_dir, scheduling=s, **kw) for s in ("continuous", "static")}


def _three_requests(engine):
    short = engine.add_request(random_prompts([5], seed=2)[0], greedy(2))
    long_ = engine.add_request(random_prompts([6], seed=3)[0], greedy(8))
    third = engine.add_request(random_prompts([4], seed=4)[0], greedy(3))
    return short, long_, third


def _run_recording(engine, max_steps: int = 40):
    """Step until done; returns ({request_id: step it finished}, [(step, running ids, waiting ids)])."""
    finished, history = {}, []
    for step in range(1, max_steps):
        for o in engine.step():
            if o.finished:
                finished[o.request_id] = step
        history.append((step, _ids(engine.scheduler.running), _ids(engine.scheduler.waiting)))
        if not engine.has_unfinished():
            break
    return finished, history


def test_continuous_refill_two_slots(small_engines):
    engine = small_engines["continuous"]
    short, long_, third = _three_requests(engine)
    finished, history = _run_recording(engine)
    assert set(finished) == {short, long_, third}
    s = finished[short]
    assert finished[long_] > s + 1, "test setup: the long request must outlive the short one"
    for step, running, waiting in history:
        assert len(running) <= 2
        if step <= s:
            assert third in waiting, f"step {step}: admitted before a slot was free"
        if step == s + 1:
            assert third in running and long_ in running and not waiting, history
    assert_clean(engine)


def test_static_batching_waits_for_whole_batch(small_engines):
    engine = small_engines["static"]
    short, long_, third = _three_requests(engine)
    finished, history = _run_recording(engine)
    assert set(finished) == {short, long_, third}
    assert finished[short] < finished[long_] < finished[third]
    b = finished[long_]
    for step, running, waiting in history:
        if step < b:
            assert third in waiting and third not in running, f"step {step}: admitted into a running batch"
        if step == b + 1:
            assert running == [third]
    # The third request ran alone: it needed exactly its max_tokens steps after the batch.
    assert finished[third] == b + 3
    assert_clean(engine)


def test_static_and_continuous_same_tokens_small(small_engines):
    prompts = random_prompts([5, 6, 4], seed=9)
    outs = {s: [o.token_ids for o in e.generate(prompts, [greedy(n) for n in (2, 8, 3)])]
            for s, e in small_engines.items()}
    assert outs["static"] == outs["continuous"]
    for e in small_engines.values():
        assert_clean(e)


@pytest.mark.parametrize("scheduling", ["continuous", "static"])
def test_preemption_keeps_outputs(llama_dir, reference, reference_outputs, scheduling):
    """A cache of only a few pages more than the largest request needs: requests are preempted
    and recomputed, and the outputs equal the unconstrained engine's."""
    # Largest request: 130 + 6 = 136 tokens = 17 pages of 8.
    need = max(-(-(len(p) + n) // 8) for p, n in zip(PROMPTS, MAX_TOKENS))
    engine = Engine.from_pretrained(llama_dir, num_pages=need + 3, scheduling=scheduling, **ENGINE_KW)
    assert engine.num_pages == need + 3
    outs = engine.generate(PROMPTS, [greedy(n) for n in MAX_TOKENS])
    assert engine.scheduler.num_preemptions > 0
    assert [o.token_ids for o in outs] == reference
    assert [o.finish_reason for o in outs] == ["length"] * len(PROMPTS)
    assert_clean(engine)
    # Again, with long generations that grow into each other's pages while decoding.
    prompts = random_prompts([20, 22, 18, 25], seed=5)
    before = engine.scheduler.num_preemptions
    outs = engine.generate(prompts, [greedy(40)] * 4)
    assert engine.scheduler.num_preemptions > before
    assert_clean(engine)
    assert [o.token_ids for o in outs] == reference_outputs(prompts, [40] * 4)
    # Seeded sampling survives preemption too (the key depends on the seed and the number of
    # tokens generated, both kept across the recompute).
    sp = [SamplingParams(temperature=1.0, top_p=0.95, seed=s, max_tokens=40, ignore_eos=True) for s in range(4)]
    before = engine.scheduler.num_preemptions
    sampled = [o.token_ids for o in engine.generate(prompts, sp)]
    assert engine.scheduler.num_preemptions > before
    assert_clean(engine)
    alone = [engine.generate(p, s)[0].token_ids for p, s in zip(prompts, sp)]
    assert sampled == alone


def test_status_transitions(small_engines):
    engine = small_engines["continuous"]
    rid = engine.add_request([5, 6, 7], greedy(2))
    (seq,) = engine.scheduler.waiting
    assert seq.request_id == rid and seq.status == Status.WAITING
    engine.step()
    assert seq.status == Status.RUNNING and seq in engine.scheduler.running
    assert seq.page_ids and seq.num_computed_tokens == 3
    outs = engine.step()
    if engine.async_scheduling:  # the prompt's token lands while the step after it runs
        assert [o.finished for o in outs] == [False]
        outs = engine.step()
    (out,) = outs
    assert out.finished and seq.status == Status.FINISHED and not seq.page_ids
    assert_clean(engine)
