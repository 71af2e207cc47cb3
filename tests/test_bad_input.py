"""Bad input is refused up front with an error naming the field, and hurts no one else.

For each bad request: ``add_request`` raises ValueError naming the field;
``generate`` with a good and a bad prompt raises too, before queueing either
(validation of the whole batch comes first); a request queued beforehand is
neither dropped nor disturbed and completes with the tokens it gets alone.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest

from conftest import ENGINE_KW, assert_clean, drain, greedy, random_prompts
from jaxserve import Engine, SamplingParams

GOOD_PROMPT = random_prompts([9], seed=51)[0]
GOOD_MAX_TOKENS = 6


def check_rejected(engine, bad_prompt, bad_params, match):
    """The core check (see the module docstring).  ``match``: regex the message must match."""
    assert_clean(engine)
    alone = engine.generate(GOOD_PROMPT, greedy(GOOD_MAX_TOKENS))[0].token_ids
    queued = engine.add_request(GOOD_PROMPT, greedy(GOOD_MAX_TOKENS))
    engine.step()  # it is running (and holds pages) when the bad request arrives
    state = ([s.request_id for s in engine.scheduler.running], [s.request_id for s in engine.scheduler.waiting],
             engine.num_free_pages)
    assert state[0] == [queued]
    with pytest.raises(ValueError, match=match):
        engine.add_request(bad_prompt, bad_params)
    with pytest.raises(ValueError, match=match):
        engine.generate([[5, 6, 7], bad_prompt], [greedy(3), bad_params])
    if isinstance(bad_prompt, str) or (isinstance(bad_prompt, list) and bad_prompt
                                        and isinstance(bad_prompt[0], int)):
        # generate's single-prompt form (a list of lists or of strings would be a batch).
        with pytest.raises(ValueError, match=match):
            engine.generate(bad_prompt, bad_params)
    assert ([s.request_id for s in engine.scheduler.running], [s.request_id for s in engine.scheduler.waiting],
            engine.num_free_pages) == state, "a rejected request changed the scheduler state"
    final = drain(engine)
    assert set(final) == {queued}
    assert final[queued].finish_reason == "length"
    assert final[queued].token_ids == alone
    assert_clean(engine)


def invalid_params(**fields):
    """SamplingParams validates on construction; a caller may still mutate a valid one."""
    sp = greedy(4)
    for k, v in fields.items():
        setattr(sp, k, v)
    return sp


# -- prompts ---------------------------------------------------------------------------------------

def test_empty_prompt(engine):
    check_rejected(engine, [], greedy(4), r"^prompt: .*empty")
    check_rejected(engine, "", greedy(4), r"^prompt: .*empty")
    assert engine.generate([], greedy(4)) == []  # no prompts at all is not an error


def test_prompt_plus_max_tokens_over_max_model_len(engine):
    assert engine.max_model_len == 256
    check_rejected(engine, list(range(3, 203)), greedy(57), r"^max_tokens: .*max_model_len \(256\)")
    # 256 exactly is fine.
    out = engine.generate(list(range(3, 203)), greedy(56))[0]
    assert len(out.token_ids) == 56
    assert_clean(engine)


def test_prompt_longer_than_max_model_len(engine):
    check_rejected(engine, list(range(3, 3 + 300)), greedy(1), r"^max_tokens: .*max_model_len")


@pytest.mark.parametrize("bad_id", [-1, 1024, 10**6])
def test_token_id_outside_vocabulary(engine, bad_id):
    check_rejected(engine, [5, bad_id, 6], greedy(4), rf"^prompt_token_ids: .*{bad_id}.*1024")


@pytest.mark.parametrize("prompt", [[5, 2.5], [True, 5], ["a", "b"], [[1, 2]]])
def test_prompt_not_integers(engine, prompt):
    check_rejected(engine, prompt, greedy(4), r"^prompt: ")


def test_prompt_wrong_type(engine):
    check_rejected(engine, {"ids": [1, 2]}, greedy(4), r"^prompt: ")
    with pytest.raises(ValueError, match=r"^prompt: "):
        engine.add_request(12345, greedy(4))
    with pytest.raises(ValueError, match=r"^prompts: "):
        engine.generate({"ids": [1, 2]}, greedy(4))
    assert_clean(engine)


# -- sampling parameters -----------------------------------------------------------------------------

PARAM_CASES = [
    ("max_tokens", 0), ("max_tokens", -3), ("max_tokens", 2.0),
    ("temperature", -0.1), ("temperature", float("nan")), ("temperature", float("inf")),
    ("top_p", 0.0), ("top_p", 1.5), ("top_p", -0.5),
    ("top_k", -2), ("top_k", 1.5),
    ("min_p", -0.1), ("min_p", 1.1),
    ("seed", -1), ("seed", 2**63),
    ("logprobs", -1), ("logprobs", 21),
    ("stop", [""]), ("stop", [3]),
    ("stop_token_ids", [-1]),
]


@pytest.mark.parametrize("field,value", PARAM_CASES, ids=[f"{f}={v!r}" for f, v in PARAM_CASES])
def test_bad_sampling_params(engine, field, value):
    with pytest.raises(ValueError, match=rf"^{field}: "):
        SamplingParams(**{field: value})
    check_rejected(engine, [5, 6, 7], invalid_params(**{field: value}), rf"^{field}: ")


def test_sampling_params_wrong_type(engine):
    check_rejected(engine, [5, 6, 7], {"temperature": 0}, r"^sampling_params: ")
    with pytest.raises(ValueError, match=r"^sampling_params: .*2.*1"):
        engine.generate([[5, 6]], [greedy(2), greedy(2)])
    assert_clean(engine)


def test_duplicate_request_id(engine):
    alone = engine.generate(GOOD_PROMPT, greedy(GOOD_MAX_TOKENS))[0].token_ids
    engine.add_request(GOOD_PROMPT, greedy(GOOD_MAX_TOKENS), request_id="dup")
    with pytest.raises(ValueError, match=r"^request_id: .*dup"):
        engine.add_request([5, 6], greedy(2), request_id="dup")
    with pytest.raises(ValueError, match=r"^request_id: "):
        engine.add_request([5, 6], greedy(2), request_id="")
    final = drain(engine)
    assert set(final) == {"dup"} and final["dup"].token_ids == alone
    assert_clean(engine)
    # Once finished, the id may be used again.
    assert engine.generate(GOOD_PROMPT, greedy(GOOD_MAX_TOKENS))[0].token_ids == alone
    engine.add_request(GOOD_PROMPT, greedy(2), request_id="dup")
    drain(engine)
    assert_clean(engine)


# -- the cache, the tokenizer ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_cache_engine(notok_dir):
    """No tokenizer, and a KV cache of 3 pages of 8 tokens (24 tokens)."""
    return Engine.from_pretrained(notok_dir, num_pages=3, **ENGINE_KW)


def test_request_that_never_fits_in_cache(small_cache_engine):
    e = small_cache_engine
    assert e.num_pages == 3 and e.max_model_len == 256
    # 20 + 10 = 30 tokens = 4 pages > 3, though well within max_model_len.
    check_rejected(e, list(range(3, 23)), greedy(10), r"^max_tokens: .*4 KV-cache pages.*only 3")
    out = e.generate(list(range(3, 17)), greedy(10))[0]  # 24 tokens: exactly the whole cache
    assert len(out.token_ids) == 10
    assert_clean(e)


def test_text_prompt_without_tokenizer(small_cache_engine):
    assert small_cache_engine.tokenizer is None
    check_rejected(small_cache_engine, "hello world", greedy(4), r"^prompt: .*tokenizer")


def test_no_text_without_tokenizer(small_cache_engine):
    out = small_cache_engine.generate(GOOD_PROMPT, greedy(3))[0]
    assert out.text is None and out.text_delta == ""
    # stop strings need text: without a tokenizer they cannot match, generation runs to length.
    out = small_cache_engine.generate(GOOD_PROMPT, greedy(3, stop=["a"]))[0]
    assert out.finish_reason == "length"
    assert_clean(small_cache_engine)


# -- loading -----------------------------------------------------------------------------------------

def test_missing_model_directory(tmp_path):
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        Engine.from_pretrained(missing)


def test_directory_without_config(tmp_path, llama_dir):
    d = tmp_path / "noconfig"
    d.mkdir()
    shutil.copy(os.path.join(llama_dir, "model.safetensors"), d)
    with pytest.raises(FileNotFoundError, match="config.json"):
        Engine.from_pretrained(str(d))


def test_directory_without_weights(tmp_path, llama_dir):
    d = tmp_path / "noweights"
    d.mkdir()
    shutil.copy(os.path.join(llama_dir, "config.json"), d)
    with pytest.raises(FileNotFoundError, match="safetensors"):
        Engine.from_pretrained(str(d))


def test_unreadable_config(tmp_path):
    d = tmp_path / "badjson"
    d.mkdir()
    (d / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json"):
        Engine.from_pretrained(str(d))


def test_unsupported_model_type(tmp_path, llama_dir):
    d = tmp_path / "gpt2"
    shutil.copytree(llama_dir, d)
    with open(d / "config.json") as f:
        cfg = json.load(f)
    cfg["model_type"] = "gpt2"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="model_type") as info:
        Engine.from_pretrained(str(d))
    msg = str(info.value)
    assert "gpt2" in msg
    for supported in ("llama", "mistral", "qwen2", "qwen3"):
        assert supported in msg


@pytest.mark.parametrize("kw,field", [
    (dict(scheduling="fifo"), "scheduling"), (dict(page_size=0), "page_size"), (dict(dtype="int8"), "dtype"),
    (dict(max_num_seqs=0), "max_num_seqs"), (dict(num_pages=0), "num_pages"),
    (dict(max_model_len=4096), "max_model_len"), (dict(max_num_batched_tokens=-1), "max_num_batched_tokens"),
])
def test_bad_engine_config(llama_dir, kw, field):
    with pytest.raises(ValueError, match=rf"^{field}: "):
        Engine.from_pretrained(llama_dir, **kw)
