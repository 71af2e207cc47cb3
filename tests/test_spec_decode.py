"""Speculative decoding (jaxserve/spec_decode.py): greedy output equals plain greedy decoding token for token
(batches with slots refilled, chunked prefill, preemption), the rejection rule samples the target's
distribution exactly (chi-square over 20,000 seeded samples; a broken rule fails the same check), pages
and bucket programs as without it, and bad configurations are refused."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ENGINE_KW, assert_clean, greedy, random_prompts
from jaxserve import Engine, SamplingParams
from jaxserve import spec_decode
from jaxserve.sampling import SamplingArrays
from jaxserve.spec_decode import ngram_propose

K_MAX = 5


def chi_square_pvalue(counts: np.ndarray, probs: np.ndarray) -> float:
    """Upper tail of Pearson's chi-square (Wilson-Hilferty approximation), cells with expected count >= 5."""
    n = counts.sum()
    expected = n * probs
    big = expected >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    keep = exp > 0
    stat = float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
    df = int(keep.sum()) - 1
    z = ((stat / df) ** (1 / 3) - (1 - 2 / (9 * df))) / math.sqrt(2 / (9 * df))
    return 0.5 * math.erfc(z / math.sqrt(2))


def copy_prompts() -> list[list[int]]:
    """Prompts that repeat themselves (so prompt lookup finds matches), of several lengths: one longer
    than the 64-token budget (chunked prefill), six for four slots (slots refilled)."""
    rng = np.random.default_rng(7)
    out = []
    for seg_len, reps in ((6, 3), (11, 7), (4, 2), (9, 4), (20, 2), (5, 5)):
        seg = rng.integers(3, 1024, size=seg_len).tolist()
        out.append((seg * reps)[:-2])
    return out


def test_ngram_propose_latest_match_longest_first():
    t = np.array([1, 2, 3, 9, 1, 2, 4, 7, 1, 2])
    assert ngram_propose(t, 3, 1, 4) == [4, 7, 1]  # "1 2" last seen at 4: the latest match wins
    assert ngram_propose(np.array([5, 6, 7, 5, 6]), 5, 1, 3) == [7, 5, 6]
    assert ngram_propose(np.array([1, 2, 3]), 2, 1, 2) == []
    assert ngram_propose(np.array([4, 8, 4, 8, 4]), 2, 2, 2) == [8, 4]


@pytest.fixture(scope="module")
def spec_engine(llama_dir):
    """ngram speculation with k up to 5 and a small cache (20 pages of 8 tokens): the prompts below
    preempt each other."""
    return Engine.from_pretrained(llama_dir, **dict(ENGINE_KW, num_pages=20),
                                  speculative_config={"method": "ngram", "num_speculative_tokens": K_MAX})


@pytest.mark.parametrize("k", [1, 3, 5])
def test_greedy_equals_plain_greedy(spec_engine, reference_outputs, k):
    prompts = copy_prompts()
    max_tokens = [40, 30, 60, 25, 20, 45]
    ref = reference_outputs(prompts, max_tokens)
    e = spec_engine
    e.scheduler.num_speculative_tokens = k  # proposals per step (the programs hold up to K_MAX)
    before = (e.scheduler.num_preemptions, e.scheduler.spec_accepted_tokens, e.compile_count)
    outs = e.generate(prompts, [greedy(n) for n in max_tokens])
    assert [o.token_ids for o in outs] == ref
    assert e.scheduler.num_preemptions > before[0]  # the small cache preempted
    assert e.scheduler.spec_accepted_tokens > before[1]  # proposals were accepted
    assert max(o.spec_proposed_tokens / o.spec_steps for o in outs if o.spec_steps) <= k
    assert sum(o.spec_accepted_tokens for o in outs) > 0
    assert e.compile_count <= e.num_buckets  # the bucket set, no new program
    assert_clean(e)


def test_low_acceptance_turns_speculation_off(spec_engine, reference_outputs):
    """min_acceptance_rate: a sequence whose acceptance falls below it (after min_acceptance_window proposed
    tokens) is decoded plainly from then on: at rate 1 and a window below k, the first step with a
    rejected proposal is its last speculated one, so no output has more than k rejected proposals (with
    the switch off, some has); the tokens stay those of plain greedy decoding."""
    prompts = copy_prompts()
    max_tokens = [40, 30, 60, 25, 20, 45]
    ref = reference_outputs(prompts, max_tokens)
    e, k = spec_engine, K_MAX
    e.scheduler.num_speculative_tokens = k
    spec = e.config.speculative_config
    saved = (spec.min_acceptance_rate, spec.min_acceptance_window)

    def rejected(rate: float, window: int) -> list[int]:
        spec.min_acceptance_rate, spec.min_acceptance_window = rate, window
        try:
            outs = e.generate(prompts, [greedy(n) for n in max_tokens])
        finally:
            spec.min_acceptance_rate, spec.min_acceptance_window = saved
        assert [o.token_ids for o in outs] == ref
        assert_clean(e)
        return [o.spec_proposed_tokens - o.spec_accepted_tokens for o in outs]

    assert max(rejected(0.0, 1)) > k  # never switched off
    assert max(rejected(1.0, k - 1)) <= k


def test_disable_by_batch_size(spec_engine, reference_outputs):
    """No proposals while at least disable_by_batch_size requests run: at 1 none at all, at 2 only once a
    request runs alone (the tail of the batch); the tokens are plain greedy decoding's either way."""
    prompts = copy_prompts()
    max_tokens = [40, 30, 60, 25, 20, 45]
    ref = reference_outputs(prompts, max_tokens)
    e = spec_engine
    e.scheduler.num_speculative_tokens = K_MAX
    spec = e.config.speculative_config

    def proposed(limit) -> int:
        spec.disable_by_batch_size = limit
        try:
            outs = e.generate(prompts, [greedy(n) for n in max_tokens])
        finally:
            spec.disable_by_batch_size = None
        assert [o.token_ids for o in outs] == ref
        assert_clean(e)
        return sum(o.spec_proposed_tokens for o in outs)

    assert proposed(1) == 0
    alone, unlimited = proposed(2), proposed(None)
    assert 0 < alone < unlimited
    with pytest.raises(ValueError, match="disable_by_batch_size"):
        spec_decode.SpeculativeConfig.from_value({"disable_by_batch_size": 0})


def test_opt_out_and_ineligible_requests_are_not_speculated(spec_engine, reference_outputs):
    prompts = copy_prompts()[:3]
    ref = reference_outputs(prompts, [30] * 3)
    e = spec_engine
    e.scheduler.num_speculative_tokens = 3
    params = [greedy(30, speculative=False), greedy(30, logprobs=2), greedy(30)]
    outs = e.generate(prompts, params)
    assert [o.token_ids for o in outs] == ref
    assert outs[0].spec_steps == 0 and outs[1].spec_steps == 0
    assert outs[2].spec_steps > 0 and outs[2].spec_mean_accepted_length >= 1
    assert_clean(e)


def test_spec_metrics_in_prometheus(spec_engine):
    from jaxserve.metrics import ServerMetrics, parse_prometheus

    e = spec_engine
    e.scheduler.num_speculative_tokens = 3
    e.generate(copy_prompts()[:2], greedy(20))
    m = e.spec_metrics()
    assert m["accepted_tokens"] == e.scheduler.spec_accepted_tokens > 0
    assert m["mean_accepted_length"] == pytest.approx((m["accepted_tokens"] + m["verifications"]) / m["verifications"])
    metrics = ServerMetrics()
    metrics.set_engine_state(spec=m)
    samples = parse_prometheus(metrics.render())
    assert samples["jaxserve_spec_accepted_tokens_total"] == m["accepted_tokens"]
    assert samples["jaxserve_spec_proposed_tokens_total"] == m["proposed_tokens"]
    assert samples["jaxserve_spec_acceptance_rate"] == pytest.approx(m["acceptance_rate"])
    assert samples["jaxserve_spec_proposals_per_step"] == pytest.approx(m["proposals_per_step"])
    assert "jaxserve_spec_accepted_tokens_total" not in ServerMetrics().render()  # no speculation: no series
    assert_clean(e)


def test_bad_speculative_config_names_the_field(llama_dir):
    for bad, field in (({"method": "eagle"}, "speculative_config.method"),
                       ({"method": "ngram", "num_speculative_tokens": 0}, "speculative_config.num_speculative_tokens"),
                       ({"method": "ngram", "prompt_lookup_min": 5, "prompt_lookup_max": 2},
                        "speculative_config.prompt_lookup_min"),
                       ({"method": "ngram", "k": 3}, "speculative_config: unknown key 'k'"),
                       ("ngram", "speculative_config")):
        with pytest.raises(ValueError, match=field):
            Engine.from_pretrained(llama_dir, **ENGINE_KW, speculative_config=bad)
    with pytest.raises(ValueError, match="speculative"):
        SamplingParams(speculative="no")


# -- exact sampling -----------------------------------------------------------------------------------------


def _target_probs(model_dir: str, prefix: list[int]) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([prefix])).logits[0, -1].double()
    return torch.softmax(logits, -1).numpy()


def _sample_first_rows(logits: np.ndarray, draft: int, n: int, broken: bool = False) -> np.ndarray:
    """``verify_rows`` on n seeded copies of one verified row whose proposal is ``draft``: the token the
    chain emits there (the proposal if accepted, else the residual sample)."""
    rows = jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (n, logits.shape[-1]))
    p = SamplingArrays(temperature=jnp.ones(n), top_k=jnp.full(n, -1, jnp.int32), top_p=jnp.ones(n),
                       min_p=jnp.zeros(n), seed=jnp.stack([jnp.arange(n, dtype=jnp.uint32),
                                                          jnp.full(n, 12345, jnp.uint32)], axis=1),
                       step=jnp.zeros(n, jnp.int32))
    def run():  # traced afresh on each call (a new function), so that the patch below takes effect
        return jax.jit(lambda *a: spec_decode.verify_rows(*a))(rows, jnp.full(n, draft, jnp.int32),
                                                             jnp.zeros(n, jnp.int32), p)

    if broken:  # resample from p itself on rejection (no residual): biased towards the proposal
        orig = spec_decode.residual_logits
        spec_decode.residual_logits = lambda z, d: z
        try:
            tok, accept = run()
        finally:
            spec_decode.residual_logits = orig
    else:
        tok, accept = run()
    return np.where(np.asarray(accept), draft, np.asarray(tok))


@pytest.fixture(scope="module")
def tiny_vocab_dir(model_factory):
    return model_factory("llama_v32", tokenizer=False, vocab_size=32)


N_SAMPLES = 20_000


def test_rejection_sampling_matches_target_softmax(tiny_vocab_dir):
    prefix = [5, 9, 17, 3, 5]
    probs = _target_probs(tiny_vocab_dir, prefix)
    draft = int(np.argsort(probs)[len(probs) // 2])  # a proposal of middling probability
    logits = np.log(probs)  # the target's logits up to a constant (same softmax)
    good = _sample_first_rows(logits, draft, N_SAMPLES)
    counts = np.bincount(good, minlength=len(probs))
    assert chi_square_pvalue(counts, probs) > 1e-3
    bad = _sample_first_rows(logits, draft, N_SAMPLES, broken=True)
    assert chi_square_pvalue(np.bincount(bad, minlength=len(probs)), probs) < 1e-6


# -- draft model --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def draft_dir(llama_dir, tmp_path_factory):
    """The tiny Llama's first layer alone (same embeddings, LM head and vocabulary): a smaller model that
    agrees with the target on some tokens, not all."""
    import json
    import os

    from safetensors.numpy import load_file, save_file

    out = str(tmp_path_factory.mktemp("llama_draft"))
    tensors = {k: v for k, v in load_file(os.path.join(llama_dir, "model.safetensors")).items()
               if not k.startswith("model.layers.") or k.startswith("model.layers.0.")}
    save_file(tensors, os.path.join(out, "model.safetensors"))
    with open(os.path.join(llama_dir, "config.json")) as f:
        config = json.load(f)
    config["num_hidden_layers"] = 1
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f)
    return out


@pytest.fixture(scope="module")
def draft_engine(llama_dir, draft_dir):
    return Engine.from_pretrained(llama_dir, **dict(ENGINE_KW, num_pages=20),
                                  speculative_config={"method": "draft", "model": draft_dir,
                                                      "num_speculative_tokens": K_MAX})


@pytest.mark.parametrize("k", [1, 3, 5])
def test_draft_greedy_equals_plain_greedy(draft_engine, reference_outputs, k):
    prompts = copy_prompts()
    max_tokens = [40, 30, 60, 25, 20, 45]
    ref = reference_outputs(prompts, max_tokens)
    e = draft_engine
    draft = e.scheduler.proposer.engine
    e.scheduler.num_speculative_tokens = k
    before = (e.scheduler.num_preemptions, e.scheduler.spec_accepted_tokens, e.scheduler.spec_proposed_tokens)
    outs = e.generate(prompts, [greedy(n) for n in max_tokens])
    assert [o.token_ids for o in outs] == ref
    assert e.scheduler.num_preemptions > before[0]
    accepted = e.scheduler.spec_accepted_tokens - before[1]
    assert 0 < accepted < e.scheduler.spec_proposed_tokens - before[2]  # some proposals accepted, some not
    assert e.compile_count <= e.num_buckets and draft.compile_count <= draft.num_buckets
    assert_clean(e)
    assert draft.num_free_pages == draft.num_pages  # the draft's pages went back with the requests


def test_draft_with_another_vocabulary_is_refused(llama_dir, tiny_vocab_dir):
    with pytest.raises(ValueError, match=r"speculative_config.model: the draft model's vocabulary \(32 tokens\) "
                                         r"differs from the target's \(1024\)"):
        Engine.from_pretrained(llama_dir, **ENGINE_KW,
                               speculative_config={"method": "draft", "model": tiny_vocab_dir})
    with pytest.raises(ValueError, match="speculative_config.model"):
        Engine.from_pretrained(llama_dir, **ENGINE_KW, speculative_config={"method": "draft"})


@pytest.mark.slow  # 3,000 requests; the rule itself is checked above at 20,000 samples in CI
def test_engine_samples_target_distribution_through_verification(tiny_vocab_dir):
    """Temperature 1 through the engine: the prompt's first two pages are prefix-cached after the first
    requests, so every later request's first token is verified against an n-gram proposal (accepted, or
    replaced by a residual sample); those tokens follow the target's softmax."""
    prefix = [5, 9, 17, 3, 11, 4, 8, 20, 6, 13, 27, 2, 30, 12, 7, 25, 9]  # 17 tokens; "9" proposes "17"
    probs = _target_probs(tiny_vocab_dir, prefix)
    e = Engine.from_pretrained(tiny_vocab_dir, max_num_seqs=32, max_num_prefill_seqs=32, page_size=8,
                               max_model_len=64, max_num_batched_tokens=64, min_prefill_bucket=64,
                               min_decode_bucket=32,
                               speculative_config={"method": "ngram", "num_speculative_tokens": 1})
    outs = e.generate([prefix] * 3000, SamplingParams(temperature=1.0, max_tokens=2, ignore_eos=True))
    verified = [o.token_ids[0] for o in outs if o.spec_steps == 1]
    assert len(verified) > 2500
    assert 0 < sum(o.spec_accepted_tokens for o in outs) < len(verified)
    assert chi_square_pvalue(np.bincount(verified, minlength=len(probs)), probs) > 1e-3
    assert e.compile_count <= e.num_buckets == 3
    assert_clean(e)


def test_speculative_request_field():
    """The HTTP body's ``speculative`` (jaxserve's field) reaches SamplingParams; a non-boolean is refused
    by name."""
    import pydantic

    from jaxserve.protocol import CompletionRequest

    base = {"model": "m", "prompt": "hi"}
    assert CompletionRequest.model_validate(base).sampling_params(4, None).speculative is True
    assert CompletionRequest.model_validate({**base, "speculative": False}).sampling_params(4, None).speculative is False
    with pytest.raises(pydantic.ValidationError, match="speculative"):
        CompletionRequest.model_validate({**base, "speculative": "no"})
