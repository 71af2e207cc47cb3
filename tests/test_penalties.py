"""Penalties and biases: repetition / presence / frequency penalties, logit_bias, min_tokens, bad_words.

Greedy tokens are compared with Hugging Face ``generate`` (repetition_penalty, sequence_bias for
logit_bias, min_new_tokens) on a transformers-written checkpoint, and presence/frequency penalties
with a plain numpy reference of OpenAI's formula on the same model's logits, in batches that mix
penalized and plain requests (the plain ones must get exactly the tokens they get alone).
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from conftest import assert_clean, greedy, random_prompts  # noqa: E402
from jaxserve import Engine, SamplingParams  # noqa: E402
from jaxserve.make_model import hf_config  # noqa: E402

ENGINE_KW = dict(max_num_seqs=4, page_size=8, max_model_len=256, max_num_batched_tokens=64,
                 min_prefill_bucket=64)
PROMPTS = random_prompts([5, 17, 70, 2, 33, 9], seed=7)
MAX_TOKENS = [12, 9, 14, 10, 6, 11]


@pytest.fixture(scope="module")
def hf_model_dir(tmp_path_factory):
    cfg = hf_config("llama", "tiny")
    torch.manual_seed(123)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    d = str(tmp_path_factory.mktemp("hf_penalties"))
    model.save_pretrained(d)
    return model, d


@pytest.fixture(scope="module")
def pen_engine(hf_model_dir):
    return Engine.from_pretrained(hf_model_dir[1], dtype="float32", **ENGINE_KW)


def hf_generate(model, prompt, n, **kw):
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             pad_token_id=0, **kw)
    return out[0, len(prompt):].tolist()


def numpy_reference(model, prompt, n, presence=0.0, frequency=0.0, bias=None, bans=()):
    """Greedy with OpenAI's formula: logits[j] -= frequency * c[j] + presence * (c[j] > 0) over generated
    tokens (full recompute each step, float32 logits from torch, the penalty in numpy)."""
    ids = list(prompt)
    out: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids])).logits[0, -1].numpy().astype(np.float32)
            counts = np.bincount(np.asarray(out, np.int64), minlength=logits.shape[0]).astype(np.float32)
            logits = logits - frequency * counts - presence * (counts > 0)
            for t, b in (bias or {}).items():
                logits[t] += b
            for t in bans:
                logits[t] = -np.inf
            t = int(np.argmax(logits))
            out.append(t)
            ids.append(t)
    return out


def test_repetition_penalty_matches_hf(hf_model_dir, pen_engine):
    model, _ = hf_model_dir
    params = [greedy(n, repetition_penalty=rp) for n, rp in zip(MAX_TOKENS, [1.3, 1.0, 2.0, 0.7, 1.3, 1.0])]
    outs = pen_engine.generate(PROMPTS, params)
    assert_clean(pen_engine)
    for i, (o, p) in enumerate(zip(outs, params)):
        ref = hf_generate(model, PROMPTS[i], p.max_tokens, repetition_penalty=p.repetition_penalty,
                          eos_token_id=None)
        assert o.token_ids == ref, f"prompt {i}, repetition_penalty={p.repetition_penalty}"
    # The penalty really changed something.
    plain = pen_engine.generate(PROMPTS[2], greedy(MAX_TOKENS[2]))[0].token_ids
    assert plain != outs[2].token_ids


def test_logit_bias_matches_hf_sequence_bias(hf_model_dir, pen_engine):
    model, _ = hf_model_dir
    plain = pen_engine.generate(PROMPTS[:3], [greedy(n) for n in MAX_TOKENS[:3]])
    # Push one token up, ban another the plain run produced, and a mild bias (values clamped to 100).
    biases = [{17: 8.0, plain[0].token_ids[0]: -100.0}, {plain[1].token_ids[2]: -5.0, 3: 2.5},
              {plain[2].token_ids[1]: 250.0}]
    outs = pen_engine.generate(PROMPTS[:3], [greedy(n, logit_bias=b) for n, b in zip(MAX_TOKENS, biases)])
    assert_clean(pen_engine)
    for i, (o, b) in enumerate(zip(outs, biases)):
        clamped = {(t,): max(-100.0, min(100.0, v)) for t, v in b.items()}
        ref = hf_generate(model, PROMPTS[i], MAX_TOKENS[i], sequence_bias=clamped, eos_token_id=None)
        assert o.token_ids == ref, f"prompt {i}, logit_bias={b}"
    assert outs[2].token_ids == [plain[2].token_ids[1]] * MAX_TOKENS[2]


def test_min_tokens_matches_hf_min_new_tokens(hf_model_dir, pen_engine):
    model, _ = hf_model_dir
    # A prompt whose greedy continuation has a new token early on: stopping on it ends the request early.
    plains = pen_engine.generate(PROMPTS, [greedy(12)] * len(PROMPTS))
    prompt, plain, k = next((p, o.token_ids, k) for p, o in zip(PROMPTS, plains) for k in range(1, 4)
                            if o.token_ids[k] not in o.token_ids[:k])
    stop_token = plain[k]  # greedy would stop after k + 1 tokens on it
    early = pen_engine.generate(prompt, greedy(12, stop_token_ids=[stop_token]))[0]
    assert early.token_ids == plain[:k + 1] and early.finish_reason == "stop"
    o = pen_engine.generate(prompt, greedy(12, stop_token_ids=[stop_token], min_tokens=5))[0]
    ref = hf_generate(model, prompt, 12, min_new_tokens=5, eos_token_id=stop_token)
    if ref[-1] == 0 and stop_token != 0:  # HF pads finished rows; strip
        ref = ref[:ref.index(stop_token) + 1]
    assert o.token_ids == ref
    assert len(o.token_ids) >= 5 and stop_token not in o.token_ids[:5]
    assert_clean(pen_engine)


def test_presence_frequency_numpy_reference_in_mixed_batch(hf_model_dir, pen_engine):
    model, _ = hf_model_dir
    alone = pen_engine.generate(PROMPTS, [greedy(n) for n in MAX_TOKENS])
    settings = [dict(presence_penalty=1.5), None, dict(frequency_penalty=2.0),
                dict(presence_penalty=-0.5, frequency_penalty=1.0), None, dict(frequency_penalty=0.7, logit_bias={5: 3.0})]
    params = [greedy(n, **(s or {})) for n, s in zip(MAX_TOKENS, settings)]
    outs = pen_engine.generate(PROMPTS, params)
    assert_clean(pen_engine)
    for i, (o, s) in enumerate(zip(outs, settings)):
        if s is None:
            assert o.token_ids == alone[i].token_ids, f"plain request {i} changed next to penalized ones"
        else:
            ref = numpy_reference(model, PROMPTS[i], MAX_TOKENS[i], s.get("presence_penalty", 0.0),
                                  s.get("frequency_penalty", 0.0), s.get("logit_bias"))
            assert o.token_ids == ref, f"prompt {i} {s}"
    assert outs[2].token_ids != alone[2].token_ids


def test_bad_words_token_sequences(hf_model_dir, pen_engine):
    model, _ = hf_model_dir
    plain = pen_engine.generate(PROMPTS[1], greedy(10))[0].token_ids
    a, b = plain[3], plain[4]
    single = pen_engine.generate(PROMPTS[1], greedy(10, bad_words=[[a]]))[0].token_ids
    assert a not in single and single == numpy_reference(model, PROMPTS[1], 10, bans=[a])
    multi = pen_engine.generate(PROMPTS[1], greedy(10, bad_words=[[a, b]]))[0].token_ids
    assert multi[:4] == plain[:4] and multi[4] != b
    assert all(not (x == a and y == b) for x, y in zip(multi, multi[1:]))
    assert_clean(pen_engine)


def test_penalties_do_not_compile_new_programs(pen_engine):
    pen_engine.warmup()
    n = pen_engine.compile_count
    assert n == pen_engine.num_buckets
    # More penalized requests than slots (rows are reused), mixed with plain and sampled ones.
    params = [greedy(8, repetition_penalty=1.2, presence_penalty=0.5), greedy(5),
              SamplingParams(temperature=0.9, seed=3, max_tokens=7, ignore_eos=True, frequency_penalty=1.0),
              greedy(6, min_tokens=3, logit_bias={9: 1.0}), greedy(9, bad_words=[[4, 5], [6]]),
              greedy(4, frequency_penalty=-1.0)] * 2
    outs = pen_engine.generate(PROMPTS * 2, params)
    assert [len(o.token_ids) for o in outs] == [p.max_tokens for p in params]
    assert pen_engine.compile_count == n
    assert_clean(pen_engine)
    assert not pen_engine.runner._row_owner and len(pen_engine.runner._free_rows) == pen_engine.runner.penalty_rows


@pytest.mark.parametrize("kw, field", [
    (dict(repetition_penalty=0), "repetition_penalty"),
    (dict(repetition_penalty=-1.0), "repetition_penalty"),
    (dict(repetition_penalty=float("nan")), "repetition_penalty"),
    (dict(presence_penalty=2.5), "presence_penalty"),
    (dict(frequency_penalty=-3), "frequency_penalty"),
    (dict(frequency_penalty="1"), "frequency_penalty"),
    (dict(logit_bias={-1: 1.0}), "logit_bias"),
    (dict(logit_bias={1: float("inf")}), "logit_bias"),
    (dict(logit_bias=[1, 2]), "logit_bias"),
    (dict(min_tokens=-1), "min_tokens"),
    (dict(min_tokens=20, max_tokens=10), "min_tokens"),
    (dict(bad_words="word"), "bad_words"),
    (dict(bad_words=[[]]), "bad_words"),
    (dict(bad_words=[""]), "bad_words"),
])
def test_bad_params_name_the_field(kw, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        SamplingParams(**kw)


def test_engine_checks_vocab(pen_engine):
    with pytest.raises(ValueError, match="^logit_bias: token id 5000 is outside"):
        pen_engine.generate([1, 2, 3], greedy(3, logit_bias={5000: 1.0}))
    with pytest.raises(ValueError, match="^bad_words: token id 99999"):
        pen_engine.generate([1, 2, 3], greedy(3, bad_words=[[1, 99999]]))
    with pytest.raises(ValueError, match="^bad_words: words as text need a tokenizer"):
        pen_engine.generate([1, 2, 3], greedy(3, bad_words=["hello"]))
    assert SamplingParams(logit_bias={"7": 300}).logit_bias == {7: 100.0}
    assert_clean(pen_engine)
