"""Async scheduling (``EngineConfig.async_scheduling``, ``Engine.step``): the next step is scheduled and
prepared while one runs, and the one before is processed while the next runs.  It changes when the host
does its work, never which tokens come out:

* greedy and seeded tokens, finish reasons and stop tokens equal the step-by-step engine's;
* a request stopped by a stop token while its next step is in flight loses nothing else (the row computed
  for nothing is dropped), and every page comes back;
* preemption and aborts while a step is in flight;
* a request that needs the host between tokens (penalties) switches the engine to step by step.
"""

from __future__ import annotations

import pytest

from conftest import ENGINE_KW, assert_clean, drain, greedy, random_prompts
from jaxserve import Engine, SamplingParams

PROMPTS = random_prompts([5, 40, 17, 3, 64, 9, 28, 12], seed=31)
MAX_TOKENS = [9, 14, 3, 20, 6, 11, 1, 16]


@pytest.fixture(scope="module")
def engines(llama_dir):
    kw = dict(ENGINE_KW, max_num_seqs=4)
    return {a: Engine.from_pretrained(llama_dir, async_scheduling=a, **kw) for a in (False, True)}


def _run(engine, prompts, params):
    outs = engine.generate(prompts, params)
    assert_clean(engine)
    return [(o.token_ids, o.finish_reason) for o in outs]


def test_a_step_stays_in_flight(engines):
    engine = engines[True]
    rid = engine.add_request(PROMPTS[0], greedy(3))
    assert engine.step() == []  # the prompt's step is launched, not processed
    assert engine._inflight is not None and engine.has_unfinished()
    outs = engine.step()  # processes the prompt's token while the first decode runs
    assert [o.request_id for o in outs] == [rid] and len(outs[0].token_ids) == 1
    final = drain(engine)
    assert len(final[rid].token_ids) == 3 and final[rid].finish_reason == "length"
    assert_clean(engine)


def test_same_greedy_and_seeded_tokens(engines):
    params = [greedy(n) for n in MAX_TOKENS]
    assert _run(engines[True], PROMPTS, params) == _run(engines[False], PROMPTS, params)
    sampled = [SamplingParams(temperature=1.0, top_p=0.9, seed=s, max_tokens=n, ignore_eos=True)
               for s, n in enumerate(MAX_TOKENS)]
    assert _run(engines[True], PROMPTS, sampled) == _run(engines[False], PROMPTS, sampled)


def test_stop_tokens_while_the_next_step_runs(engines):
    """Stop tokens taken from the requests' own greedy outputs: several requests stop early, each while
    its next step is already in flight; outputs and finish reasons equal the step-by-step engine's."""
    full = _run(engines[False], PROMPTS, [greedy(n) for n in MAX_TOKENS])
    stops = sorted({toks[len(toks) // 2] for toks, _ in full if len(toks) > 2})[:3]
    params = [SamplingParams(temperature=0, max_tokens=n, stop_token_ids=stops) for n in MAX_TOKENS]
    sync, async_ = _run(engines[False], PROMPTS, params), _run(engines[True], PROMPTS, params)
    assert async_ == sync
    assert any(reason == "stop" for _, reason in sync)
    for (toks, reason), (ref, _), n in zip(sync, full, MAX_TOKENS):
        assert toks == ref[:len(toks)]  # a prefix of the unstopped output
        if reason == "stop":
            assert toks[-1] in stops and not set(toks[:-1]) & set(stops)
        else:
            assert reason == "length" and len(toks) == n and not set(toks) & set(stops)


def test_preemption_and_abort_in_flight(llama_dir, engines):
    prompts = random_prompts([20, 22, 18, 25], seed=5)
    reference = _run(engines[False], prompts, [greedy(40)] * 4)
    small = Engine.from_pretrained(llama_dir, num_pages=12, async_scheduling=True, **ENGINE_KW)
    assert _run(small, prompts, [greedy(40)] * 4) == reference
    assert small.scheduler.num_preemptions > 0
    # An abort while a step is in flight: the others' tokens are unchanged and every page comes back.
    engine = engines[True]
    ids = [engine.add_request(p, greedy(40)) for p in prompts]
    for _ in range(6):
        engine.step()
    assert engine._inflight is not None
    assert engine.abort(ids[1])
    final = drain(engine)
    assert final[ids[1]].finish_reason == "abort"
    assert [final[i].token_ids for i in (ids[0], ids[2], ids[3])] == [reference[i][0] for i in (0, 2, 3)]
    assert_clean(engine)


def test_a_request_that_needs_the_host_runs_step_by_step(engines):
    engine = engines[True]
    plain = [engine.add_request(p, greedy(12)) for p in PROMPTS[:3]]
    engine.step()
    engine.step()
    assert engine._inflight is not None
    penalized = engine.add_request(PROMPTS[3], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True,
                                                              repetition_penalty=1.3))
    engine.step()  # lands the step in flight, then runs this one to the end
    assert engine._inflight is None
    final = drain(engine)
    assert_clean(engine)
    ref = engines[False].generate(PROMPTS[:4], [greedy(12)] * 3 + [SamplingParams(
        temperature=0, max_tokens=12, ignore_eos=True, repetition_penalty=1.3)])
    assert [final[i].token_ids for i in plain + [penalized]] == [o.token_ids for o in ref]
    # with the penalized request gone, steps overlap again
    rid = engine.add_request(PROMPTS[0], greedy(4))
    engine.step()
    assert engine._inflight is not None
    assert len(drain(engine)[rid].token_ids) == 4
    assert_clean(engine)
