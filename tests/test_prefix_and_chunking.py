"""Scheduler at scale: chunked prefill, prefix caching, preemption under memory pressure, limits."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import ENGINE_KW, assert_clean, drain, greedy, random_prompts
from jaxserve import Engine

PREFIX = random_prompts([200], seed=42)[0]


def shared_prefix_batch(n: int = 12):
    suffixes = random_prompts([5 + 3 * i for i in range(n)], seed=7)
    return [PREFIX + s for s in suffixes], [4 + (i % 5) for i in range(n)]


@pytest.fixture(scope="module")
def no_cache_engine(llama_dir):
    return Engine.from_pretrained(llama_dir, **ENGINE_KW, enable_prefix_caching=False)


def test_prefix_cache_hits_save_prefill_with_identical_outputs(llama_dir, no_cache_engine):
    prompts, max_tokens = shared_prefix_batch()
    cached = Engine.from_pretrained(llama_dir, **ENGINE_KW, enable_prefix_caching=True)
    want = no_cache_engine.generate(prompts, [greedy(n) for n in max_tokens])
    got = cached.generate(prompts, [greedy(n) for n in max_tokens])
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    s_on, s_off = cached.scheduler, no_cache_engine.scheduler
    assert s_off.prefix_cache_hit_tokens == 0
    # Every request but the first few (admitted before the prefix was computed) reuses the
    # 200-token prefix's full pages: 200 // 8 = 25 pages = 200 tokens.
    assert s_on.prefix_cache_hit_tokens >= 8 * 200
    assert s_on.num_prefill_tokens == s_off.num_prefill_tokens - s_on.prefix_cache_hit_tokens
    assert s_on.num_prefill_tokens < s_off.num_prefill_tokens / 2
    assert_clean(cached)
    assert_clean(no_cache_engine)
    # A second pass finds everything cached (the pages stayed evictable, not lost).
    hits_before = s_on.prefix_cache_hit_tokens
    again = cached.generate(prompts, [greedy(n) for n in max_tokens])
    assert [o.token_ids for o in again] == [o.token_ids for o in want]
    assert s_on.prefix_cache_hit_tokens - hits_before >= len(prompts) * 200
    assert_clean(cached)


def test_prefix_cache_survives_eviction_pressure(llama_dir, no_cache_engine):
    """A cache too small to keep every prefix: evicted pages are recomputed, outputs unchanged."""
    prompts = [p + s for p in random_prompts([40, 40, 40], seed=3) for s in random_prompts([3, 9], seed=4)]
    max_tokens = [6] * len(prompts)
    small = Engine.from_pretrained(llama_dir, **{**ENGINE_KW, "max_model_len": 64}, num_pages=20,
                                   enable_prefix_caching=True)
    want = no_cache_engine.generate(prompts, [greedy(n) for n in max_tokens])
    for _ in range(2):
        got = small.generate(prompts, [greedy(n) for n in max_tokens])
        assert [o.token_ids for o in got] == [o.token_ids for o in want]
        assert_clean(small)
    assert small.scheduler.prefix_cache_hit_tokens > 0


@pytest.mark.parametrize("chunk", [16, 64])
def test_chunked_prefill_equals_unchunked(llama_dir, chunk):
    prompts = random_prompts([150, 3, 77, 1, 120, 40], seed=11)
    max_tokens = [7, 12, 5, 9, 6, 10]
    whole = Engine.from_pretrained(llama_dir, max_num_seqs=4, page_size=8, max_model_len=256,
                                   max_num_batched_tokens=256, enable_chunked_prefill=False,
                                   enable_prefix_caching=False, min_prefill_bucket=256)
    chunked = Engine.from_pretrained(llama_dir, max_num_seqs=4, page_size=8, max_model_len=256,
                                     max_num_batched_tokens=chunk, min_prefill_bucket=chunk,
                                     enable_prefix_caching=False)
    want = whole.generate(prompts, [greedy(n) for n in max_tokens])
    got = chunked.generate(prompts, [greedy(n) for n in max_tokens])
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    # the runner counts the steps with prompt tokens (at most `chunk` each) and their time on their own
    st = chunked.runner.stats
    assert -(-sum(map(len, prompts)) // chunk) <= st["prefill_steps"] < st["steps"]
    assert 0 < st["prefill_device_s"] < st["device_s"]
    assert_clean(chunked)
    assert_clean(whole)


def test_without_chunked_prefill_budget_must_hold_a_whole_prompt(llama_dir):
    with pytest.raises(ValueError, match="^max_num_batched_tokens"):
        Engine.from_pretrained(llama_dir, max_model_len=256, max_num_batched_tokens=64,
                               enable_chunked_prefill=False)


def test_long_prompt_does_not_stall_running_decodes(engine):
    """Decodes are scheduled first: while a long prompt is prefilled chunk by chunk, every step
    still advances every running decode by one token."""
    short = [engine.add_request(p, greedy(30)) for p in random_prompts([5, 9], seed=5)]
    while not all(engine._seqs[r].output_token_ids for r in short):
        engine.step()
    long_id = engine.add_request(random_prompts([200], seed=6)[0], greedy(3))
    steps_with_chunks = 0
    while engine._seqs[long_id].num_computed_tokens < 200:
        sched_before = {r: len(engine._seqs[r].output_token_ids) for r in short}
        engine.step()
        steps_with_chunks += 1
        for r in short:
            assert len(engine._seqs[r].output_token_ids) == sched_before[r] + 1
    assert steps_with_chunks >= 200 // ENGINE_KW["max_num_batched_tokens"]
    drain(engine)
    assert_clean(engine)


@settings(max_examples=8, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(lengths=st.lists(st.integers(1, 90), min_size=1, max_size=10),
       max_tokens=st.lists(st.integers(1, 20), min_size=10, max_size=10),
       extra_pages=st.sampled_from([1, 3, 40]),
       prefix=st.booleans(),
       seed=st.integers(0, 1000))
def test_no_request_lost_or_duplicated_under_memory_pressure(memory_engines, lengths, max_tokens, extra_pages,
                                                             prefix, seed):
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(3, 1000, n).tolist() for n in lengths]
    if prefix:  # half of the prompts start with the same 24 tokens (lengths unchanged)
        prompts = [([5] * 24 + p)[:len(p)] if i % 2 else p for i, p in enumerate(prompts)]
    max_tokens = max_tokens[:len(prompts)]
    engine = memory_engines[extra_pages]
    limits = engine.config
    original_schedule = engine.scheduler.schedule

    def checked_schedule():
        out = original_schedule()
        assert out.num_tokens <= limits.max_num_batched_tokens
        assert len(engine.scheduler.running) <= limits.max_num_seqs
        assert len(out.prefills) <= limits.max_num_prefill_seqs
        ids = [s.seq.request_id for s in out.decodes + out.prefills]
        assert len(ids) == len(set(ids))
        return out

    engine.scheduler.schedule = checked_schedule
    try:
        ids = [engine.add_request(p, greedy(n)) for p, n in zip(prompts, max_tokens)]
        final = drain(engine)
    finally:
        engine.scheduler.schedule = original_schedule
    assert sorted(final) == sorted(ids)
    for rid, n in zip(ids, max_tokens):
        assert final[rid].finish_reason == "length"
        assert len(final[rid].token_ids) == n
    reference = memory_engines["reference"].generate(prompts, [greedy(n) for n in max_tokens])
    assert [final[r].token_ids for r in ids] == [o.token_ids for o in reference]
    assert_clean(engine)


@pytest.fixture(scope="module")
def memory_engines(llama_dir, shared_engine):
    """Engines whose caches hold only a few pages more than the longest request needs (90 + 20
    tokens = 14 pages of 8), so requests preempt each other; plus the shared engine as reference."""
    kw = {**ENGINE_KW, "max_model_len": 128}
    engines = {extra: Engine.from_pretrained(llama_dir, **kw, num_pages=14 + extra) for extra in (1, 3, 40)}
    engines["reference"] = shared_engine
    return engines


def test_last_layer_on_sampled_rows_only_equals_full_layer(engine):
    """A step with prompt rows runs its last layer past the K/V write only on the sampled rows
    (``model._last_layer``): the logits and the cache it leaves equal those of the full last layer, on a
    step of a decode row, prefill chunks (a whole prompt and the first chunk of a longer one) and padding
    slots, over the cache as the engine had it before that step."""
    import jax
    import jax.numpy as jnp

    from jaxserve.model import CausalLM

    runner = engine.runner
    assert runner.layer_loop == "switch"
    captured = []
    prepare = runner.prepare

    def capture(out):
        res = prepare(out)
        if out.decodes and out.prefills and not captured:  # before the step donates the cache
            captured.append((res.key, res.arrays, jax.tree.map(jnp.copy, runner.cache)))
        return res

    runner.prepare = capture
    try:
        engine.add_request(random_prompts([20], seed=3)[0], greedy(6))
        engine.step()  # its prompt
        engine.step()  # a decode
        for p in random_prompts([30, 100], seed=4):
            engine.add_request(p, greedy(2))
        while not captured:
            engine.step()
    finally:
        runner.prepare = prepare
    drain(engine)
    (num_decode, _), arrays, cache = captured[0]
    inputs = runner._to_inputs(arrays, False)
    assert len(inputs.logits_indices) < len(inputs.input_ids)  # rows that are not sampled
    real = np.asarray(arrays["seq_lens"]) > 0
    assert real.sum() == 3 and not real.all()  # the three sequences and padding slots
    outs = {}
    for sampled in (False, True):
        model = CausalLM(runner.model_cfg, runner.dtype, runner.attention_impl, num_decode, None, runner.platform,
                         runner.layer_loop, runner.cfg.moe_impl, matmul_impl=runner.matmul_impl,
                         sampled_last_layer=sampled)
        logits, new_cache = jax.jit(model.apply)({"params": runner.params}, inputs.input_ids, inputs.positions,
                                                 jax.tree.map(jnp.copy, cache), inputs.meta, inputs.logits_indices)
        outs[sampled] = (np.asarray(logits)[real], jax.tree.map(np.asarray, new_cache))
    np.testing.assert_allclose(outs[True][0], outs[False][0], rtol=1e-5, atol=1e-5)
    # the last layer's K/V: the same values, up to XLA fusing its norm and RoPE outside the loop (1 ulp)
    for a, b in zip(jax.tree.leaves(outs[True][1]), jax.tree.leaves(outs[False][1])):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
