"""Sampling parameters, stop conditions, logprobs and streaming."""

from __future__ import annotations

import math

import pytest

from conftest import assert_clean, greedy, random_prompts
from jaxserve import SamplingParams
from jaxserve.sampling import MAX_LOGPROBS

PROMPT = random_prompts([11], seed=41)[0]
OTHERS = random_prompts([3, 70, 25], seed=42)


def seeded(seed, **kw):
    base = dict(temperature=0.8, top_p=0.9, top_k=20, seed=seed, max_tokens=16, ignore_eos=True)
    base.update(kw)
    return SamplingParams(**base)


def test_seeded_sampling_reproducible(engine):
    a = engine.generate(PROMPT, seeded(1234))[0].token_ids
    b = engine.generate(PROMPT, seeded(1234))[0].token_ids
    assert len(a) == 16 and a == b
    assert a != engine.generate(PROMPT, greedy(16))[0].token_ids  # it really sampled
    assert_clean(engine)


def test_seeded_sampling_independent_of_batch(engine):
    alone = engine.generate(PROMPT, seeded(1234))[0].token_ids
    # In a batch with greedy, unseeded and differently filtered requests, placed second,
    # with a prompt long enough to be chunked next to it.
    others = [greedy(5), SamplingParams(temperature=1.0, max_tokens=20, ignore_eos=True),
              SamplingParams(temperature=0.5, top_k=3, min_p=0.1, max_tokens=9, ignore_eos=True)]
    outs = engine.generate([OTHERS[0], PROMPT, OTHERS[1], OTHERS[2]], [others[0], seeded(1234), *others[1:]])
    assert outs[1].token_ids == alone
    # ... and as the last of more requests than there are slots (it waits, then runs).
    outs = engine.generate(OTHERS + OTHERS[:2] + [PROMPT], [greedy(3)] * 5 + [seeded(1234)])
    assert outs[-1].token_ids == alone
    assert_clean(engine)


def test_seeded_unfiltered_sampling_independent_of_filtered_neighbour(engine):
    sp = SamplingParams(temperature=0.8, seed=7, max_tokens=10, ignore_eos=True)
    alone = engine.generate([[5, 6, 7, 8]], sp)[0].token_ids
    neighbour = SamplingParams(temperature=0.8, top_k=5, seed=3, max_tokens=10, ignore_eos=True)
    together = engine.generate([[5, 6, 7, 8], [9, 10, 11]], [sp, neighbour])[0].token_ids
    assert_clean(engine)
    assert together == alone


def test_different_seeds_differ(engine):
    outs = [tuple(engine.generate(PROMPT, seeded(s))[0].token_ids) for s in range(4)]
    assert len(set(outs)) == 4
    assert_clean(engine)


def test_seed_uses_all_64_bits(engine):
    low = engine.generate(PROMPT, seeded(5))[0].token_ids
    high = engine.generate(PROMPT, seeded(5 + 2**32))[0].token_ids
    top = engine.generate(PROMPT, seeded(2**63 - 1))[0].token_ids
    assert low != high and len(top) == 16
    assert_clean(engine)


def test_unseeded_requests_differ(engine):
    """Requests without a seed each get their own random stream."""
    sp = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True)
    outs = engine.generate([PROMPT] * 3, [sp] * 3)
    assert len({tuple(o.token_ids) for o in outs}) == 3
    assert_clean(engine)


def test_top_k_1_is_greedy(engine):
    prompts = [PROMPT] + OTHERS
    want = [o.token_ids for o in engine.generate(prompts, greedy(10))]
    got = engine.generate(prompts, SamplingParams(temperature=1.0, top_k=1, max_tokens=10, ignore_eos=True,
                                                  seed=5))
    assert [o.token_ids for o in got] == want
    assert_clean(engine)


def test_min_p_1_is_greedy(engine):
    want = engine.generate(PROMPT, greedy(10))[0].token_ids
    got = engine.generate(PROMPT, SamplingParams(temperature=1.0, min_p=1.0, max_tokens=10, ignore_eos=True,
                                                 seed=5))[0].token_ids
    assert got == want
    assert_clean(engine)


def _rank(lp):
    """Rank of the chosen token among the returned top logprobs (MAX_LOGPROBS of them)."""
    order = sorted(lp.top, key=lp.top.get, reverse=True)
    return order.index(lp.token_id) if lp.token_id in order else None


def test_min_p_filters(engine):
    """temperature 1: every sampled token has p >= min_p * p_max (logprobs are of the raw
    distribution), and min_p does not collapse to greedy."""
    min_p = 0.9
    outs = engine.generate([PROMPT] + OTHERS, SamplingParams(temperature=1.0, min_p=min_p, max_tokens=24,
                                                             ignore_eos=True, seed=9, logprobs=MAX_LOGPROBS))
    ranks = []
    for o in outs:
        for lp in o.logprobs:
            top = max(lp.top.values())
            assert lp.logprob >= math.log(min_p) + top - 1e-5
            ranks.append(_rank(lp))
    assert any(r != 0 for r in ranks), "min_p=0.9 on a near-uniform model should not be greedy"
    assert_clean(engine)


def test_top_k_filters(engine):
    outs = engine.generate([PROMPT] + OTHERS, SamplingParams(temperature=1.5, top_k=4, max_tokens=24,
                                                             ignore_eos=True, seed=3, logprobs=MAX_LOGPROBS))
    ranks = [_rank(lp) for o in outs for lp in o.logprobs]
    assert all(r is not None and r < 4 for r in ranks), ranks
    assert len(set(ranks)) > 1
    assert_clean(engine)


def test_top_p_filters(engine):
    """temperature 1, top_p small: a token is kept only if the mass of the tokens ranked
    before it is < top_p."""
    top_p = 0.006
    outs = engine.generate([PROMPT] + OTHERS, SamplingParams(temperature=1.0, top_p=top_p, max_tokens=24,
                                                             ignore_eos=True, seed=4, logprobs=MAX_LOGPROBS))
    ranks = []
    for o in outs:
        for lp in o.logprobs:
            r = _rank(lp)
            assert r is not None
            probs = sorted((math.exp(v) for v in lp.top.values()), reverse=True)
            assert sum(probs[:r]) < top_p + 1e-6
            ranks.append(r)
    assert len(set(ranks)) > 1
    assert_clean(engine)


def test_stop_token_ids(engine):
    ref = engine.generate(PROMPT, greedy(30))[0].token_ids
    stop = ref[10]
    first = ref.index(stop)
    out = engine.generate(PROMPT, greedy(30, stop_token_ids=[stop, 1023 if stop != 1023 else 1022]))[0]
    assert out.finish_reason == "stop"
    assert out.token_ids == ref[:first + 1]
    assert out.token_ids[-1] == stop
    assert_clean(engine)


def _ascii_stop_string(text):
    """A 3-character alphanumeric substring from the middle of ``text``."""
    for i in range(len(text) // 3, len(text) - 3):
        s = text[i:i + 3]
        if s.isascii() and s.isalnum():
            return s
    pytest.fail(f"no ASCII substring in {text!r}")


def test_stop_string(engine):
    ref = engine.generate(PROMPT, greedy(40))[0]
    stop = _ascii_stop_string(ref.text)
    cut = ref.text.index(stop)
    out = engine.generate(PROMPT, greedy(40, stop=[stop, "\x00never"]))[0]
    assert out.finish_reason == "stop"
    assert out.text == ref.text[:cut]
    assert stop not in out.text
    # Generation stopped at the token that completed the stop string.
    n = len(out.token_ids)
    assert out.token_ids == ref.token_ids[:n] and n < len(ref.token_ids)
    assert stop in engine.tokenizer.decode(out.token_ids, skip_special_tokens=True)
    assert stop not in engine.tokenizer.decode(out.token_ids[:-1], skip_special_tokens=True)
    assert_clean(engine)


def test_text_matches_tokens(engine):
    out = engine.generate("The quick brown fox", greedy(20))[0]
    assert out.prompt == "The quick brown fox"
    assert out.prompt_token_ids == engine.tokenizer.encode("The quick brown fox")
    assert out.text == engine.tokenizer.decode(out.token_ids, skip_special_tokens=True)
    assert_clean(engine)


def test_logprobs(engine):
    outs = engine.generate([PROMPT] + OTHERS, greedy(12, logprobs=3))
    for o in outs:
        assert len(o.logprobs) == len(o.token_ids) == 12
        for t, lp in zip(o.token_ids, o.logprobs):
            assert lp.token_id == t
            assert len(lp.top) == 3
            assert all(v <= 0 for v in lp.top.values())
            # Greedy: the chosen token is the most likely one.
            assert lp.logprob == pytest.approx(max(lp.top.values()), abs=1e-6)
            assert max(lp.top, key=lp.top.get) == t
    no_lp = engine.generate(PROMPT, greedy(3))[0]
    assert no_lp.logprobs is None
    assert_clean(engine)


def test_logprobs_of_sampled_tokens(engine):
    """With sampling the chosen token's logprob is its entry in the top list when it is there,
    and never above the best one."""
    o = engine.generate(PROMPT, SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True, seed=2,
                                               logprobs=5))[0]
    assert len(o.logprobs) == 12
    for lp in o.logprobs:
        assert len(lp.top) == 5
        assert lp.logprob <= max(lp.top.values()) + 1e-6
        if lp.token_id in lp.top:
            assert lp.logprob == pytest.approx(lp.top[lp.token_id], abs=1e-6)
    assert_clean(engine)


@pytest.mark.parametrize("prompt", ["Once upon a time", PROMPT])
def test_stream_concatenates_to_generate(engine, prompt):
    want = engine.generate(prompt, greedy(25))[0]
    outs = list(engine.stream(prompt, greedy(25)))
    assert outs[-1].finished and all(not o.finished for o in outs[:-1])
    assert sum((o.new_token_ids for o in outs), []) == want.token_ids
    assert all(len(o.new_token_ids) == 1 for o in outs)
    assert want.text  # the model has a tokenizer: token-id prompts get text too
    assert "".join(o.text_delta for o in outs) == want.text
    assert outs[-1].token_ids == want.token_ids and outs[-1].text == want.text
    assert_clean(engine)


def test_stream_single_token(engine):
    """max_tokens=1: the request finishes at its prefill step, in one streamed output."""
    outs = list(engine.stream(PROMPT, greedy(1)))
    assert len(outs) == 1 and outs[0].finished and outs[0].finish_reason == "length"
    assert outs[0].new_token_ids == engine.generate(PROMPT, greedy(1))[0].token_ids
    assert_clean(engine)


def test_stream_seeded_sampling(engine):
    want = engine.generate(PROMPT, seeded(77))[0].token_ids
    got = sum((o.new_token_ids for o in engine.stream(PROMPT, seeded(77))), [])
    assert got == want
    assert_clean(engine)


def test_eos_ends_generation_unless_ignored(engine):
    """A stop on the model's EOS id (2) needs the model to produce it: use stop_token_ids to find
    a token the model does produce, and check that ignore_eos only concerns EOS."""
    ref = engine.generate(PROMPT, greedy(20))[0].token_ids
    assert engine.eos_token_ids == {2}
    if 2 in ref:
        out = engine.generate(PROMPT, SamplingParams(temperature=0, max_tokens=20))[0]
        assert out.finish_reason == "stop" and out.token_ids == ref[:ref.index(2) + 1]
    else:
        out = engine.generate(PROMPT, SamplingParams(temperature=0, max_tokens=20))[0]
        assert out.finish_reason == "length" and out.token_ids == ref
    assert_clean(engine)


@pytest.mark.parametrize("vocab", [32000, 49152, 50257, 1000, 128])
def test_argmax_rows_equals_argmax(vocab):
    """The blocked argmax of greedy sampling picks jnp.argmax's index: ties (the first), infinities, NaN
    (the first NaN), all -inf rows, and vocabularies without a block size (50257: the plain argmax)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxserve.sampling import argmax_rows

    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, vocab)).astype(np.float32)
    x[1, :] = 1.0  # all tied: index 0
    x[2, [10, vocab // 2, vocab - 1]] = 100.0  # ties across blocks: the first
    x[3, vocab - 1] = np.inf
    x[4, :] = -np.inf
    x[5, 7] = np.nan
    x[6, [vocab // 2, vocab - 1]] = np.nan  # the first NaN, in a later block
    x[7, vocab - 1] = 50.0  # the last block
    got = np.asarray(jax.jit(argmax_rows)(x))
    np.testing.assert_array_equal(got, np.asarray(jnp.argmax(x, axis=-1)))
    assert got[1] == 0 and got[2] == 10 and got[5] == 7 and got[6] == vocab // 2 and got[7] == vocab - 1
