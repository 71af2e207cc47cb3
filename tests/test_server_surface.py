"""The rest of the OpenAI request surface, with the official ``openai`` client against a ``jaxserve
serve`` subprocess (tiny Llama with a BPE tokenizer and a chat template, as in test_server.py):
penalties and logit_bias, echo, suffix, n with best_of, stop with include_stop_str_in_output,
skip_special_tokens, user, min_tokens / bad_words, unknown fields (ignored, named in a header)."""

from __future__ import annotations

import os

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from conftest import greedy, random_prompts  # noqa: E402
from test_server import MODEL_NAME, ServerProcess, chat_model_dir, client  # noqa: E402,F401

GREEDY = dict(temperature=0)
IDS = {"ignore_eos": True, "return_token_ids": True}
PROMPT = random_prompts([9], seed=21)[0]


@pytest.fixture(scope="module")
def server(chat_model_dir, tmp_path_factory):
    proc = ServerProcess(chat_model_dir, os.path.join(str(tmp_path_factory.mktemp("surface_logs")), "server.log"))
    yield proc
    proc.stop()


def test_penalties_and_logit_bias_equal_engine(server, engine):
    c = client(server)
    kinds = [dict(presence_penalty=1.5, frequency_penalty=0.5), dict(logit_bias={"17": 100}),
             dict(extra={"repetition_penalty": 1.8, "min_tokens": 4})]
    refs = engine.generate([PROMPT] * 3, [greedy(10, presence_penalty=1.5, frequency_penalty=0.5),
                                          greedy(10, logit_bias={17: 100.0}),
                                          greedy(10, repetition_penalty=1.8, min_tokens=4)])
    for kw, ref in zip(kinds, refs):
        extra = dict(IDS, **kw.pop("extra", {}))
        out = c.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=10, **GREEDY, **kw,
                                   extra_body=extra, user="tester")
        assert out.choices[0].token_ids == ref.token_ids, kw
    assert refs[1].token_ids == [17] * 10


def test_bad_values_get_400_naming_the_field(server):
    c = client(server)
    cases = [(dict(presence_penalty=2.5), "presence_penalty"), (dict(frequency_penalty=-3), "frequency_penalty"),
             (dict(logit_bias={"abc": 1}), "logit_bias"), (dict(logit_bias={"99999": 1}), "logit_bias"),
             (dict(extra_body={"repetition_penalty": 0}), "repetition_penalty"),
             (dict(extra_body={"min_tokens": 9}), "min_tokens"), (dict(suffix="tail"), "suffix"),
             (dict(n=2, best_of=1), "best_of"), (dict(extra_body={"prompt_logprobs": 21}), "prompt_logprobs"),
             (dict(stream=True, extra_body={"prompt_logprobs": 1}), "prompt_logprobs"),
             (dict(echo=True, logprobs=1), "echo"), (dict(extra_body={"bad_words": "x"}), "bad_words")]
    for kw, field in cases:
        with pytest.raises(openai.BadRequestError) as e:
            c.completions.create(model=MODEL_NAME, prompt="Hello", max_tokens=5, **kw)
        err = e.value.body
        assert err["param"] == field and field in err["message"], (kw, err)


def test_echo_stream_and_non_stream(server):
    c = client(server)
    out = c.completions.create(model=MODEL_NAME, prompt="The quick brown fox", max_tokens=6, echo=True, **GREEDY,
                               extra_body={"ignore_eos": True})
    plain = c.completions.create(model=MODEL_NAME, prompt="The quick brown fox", max_tokens=6, **GREEDY,
                                 extra_body={"ignore_eos": True})
    assert out.choices[0].text == "The quick brown fox" + plain.choices[0].text
    streamed = "".join(ch.text for chunk in c.completions.create(
        model=MODEL_NAME, prompt="The quick brown fox", max_tokens=6, echo=True, stream=True, **GREEDY,
        extra_body={"ignore_eos": True}) for ch in chunk.choices)
    assert streamed == out.choices[0].text


def test_n_with_best_of_picks_highest_cumulative_logprob(server):
    c = client(server)
    kw = dict(model=MODEL_NAME, prompt=PROMPT, max_tokens=6, temperature=1.0, seed=77)
    all4 = c.completions.create(n=4, logprobs=0, extra_body=IDS, **kw)
    scores = [sum(ch.logprobs.token_logprobs) for ch in all4.choices]
    best = c.completions.create(n=2, best_of=4, extra_body=IDS, **kw)
    order = sorted(range(4), key=lambda i: -scores[i])[:2]
    assert [ch.token_ids for ch in best.choices] == [all4.choices[i].token_ids for i in order]
    assert [ch.index for ch in best.choices] == [0, 1]
    assert all(ch.logprobs is None for ch in best.choices)
    assert best.usage.completion_tokens == 24  # every candidate was generated
    chat = c.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "Hi"}], n=1,
                                     max_tokens=4, temperature=1.0, seed=5, extra_body={"best_of": 3, "ignore_eos": True})
    assert len(chat.choices) == 1


def test_stop_with_include_stop_str_in_output(server):
    c = client(server)
    base = c.completions.create(model=MODEL_NAME, prompt="The quick brown fox", max_tokens=40, **GREEDY,
                                extra_body={"ignore_eos": True}).choices[0].text
    stop = base[8:11]
    cut = base[:base.find(stop)]
    for stream in (False, True):
        kw = dict(model=MODEL_NAME, prompt="The quick brown fox", max_tokens=40, stop=[stop], **GREEDY,
                  stream=stream)
        with_stop = c.completions.create(**kw, extra_body={"ignore_eos": True, "include_stop_str_in_output": True})
        without = c.completions.create(**kw, extra_body={"ignore_eos": True})
        if stream:
            texts = ["".join(ch.text for chunk in r for ch in chunk.choices) for r in (with_stop, without)]
        else:
            texts = [with_stop.choices[0].text, without.choices[0].text]
        assert texts == [cut + stop, cut], stream


def test_skip_special_tokens(server, engine):
    c = client(server)
    tok = engine.tokenizer
    special = tok.all_special_ids[0]
    bias = {str(special): 100}
    kw = dict(model=MODEL_NAME, prompt="Hello", max_tokens=3, **GREEDY, logit_bias=bias)
    skipped = c.completions.create(**kw, extra_body={"ignore_eos": True})
    kept = c.completions.create(**kw, extra_body={"ignore_eos": True, "skip_special_tokens": False})
    assert skipped.choices[0].text == ""
    assert kept.choices[0].text == tok.decode([special] * 3, skip_special_tokens=False) != ""


def test_unknown_fields_ignored_and_named_in_header(server):
    c = client(server)
    raw = c.completions.with_raw_response.create(model=MODEL_NAME, prompt="Hi", max_tokens=2, user="u1",
                                                 extra_body={"frobnicate": 1, "guided_zzz": "x"})
    assert raw.http_response.status_code == 200
    assert raw.headers["x-ignored-fields"] == "frobnicate, guided_zzz"
    assert len(raw.parse().choices) == 1
    raw = c.completions.with_raw_response.create(model=MODEL_NAME, prompt="Hi", max_tokens=2)
    assert "x-ignored-fields" not in raw.headers
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}],
                                                              "max_tokens": 2, "whatever": True, "stream": True})
    assert r.status_code == 200 and r.headers["x-ignored-fields"] == "whatever"


def test_bad_words_text(server, engine):
    c = client(server)
    base = c.completions.create(model=MODEL_NAME, prompt="The quick brown fox", max_tokens=12, **GREEDY,
                                extra_body=IDS).choices[0]
    # A generated token that is a whole word by vLLM's tokenization of bad words (as written, and with a
    # leading space where that gives a same-length sequence).
    k, word = next((k, w) for k, t in enumerate(base.token_ids) if (w := engine.tokenizer.decode([t]).strip())
                   and [t] in engine._bad_word_ids([w]))
    out = c.completions.create(model=MODEL_NAME, prompt="The quick brown fox", max_tokens=12, **GREEDY,
                               extra_body=dict(IDS, bad_words=[word])).choices[0]
    assert out.token_ids[:k] == base.token_ids[:k] and out.token_ids[k] != base.token_ids[k]
    assert all([t] not in engine._bad_word_ids([word]) for t in out.token_ids)


def test_prompt_logprobs_completions_and_chat(server):
    c = client(server)
    r = c.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=2, temperature=0,
                             extra_body={"prompt_logprobs": 2, **IDS})
    plp = r.choices[0].model_extra["prompt_logprobs"]
    assert len(plp) == len(PROMPT) and plp[0] is None
    for pos, entry in enumerate(plp[1:], 1):
        assert str(PROMPT[pos]) in entry and 2 <= len(entry) <= 3
        assert all(v["logprob"] <= 0 and v["rank"] >= 1 and isinstance(v["decoded_token"], str)
                   for v in entry.values())
    r = c.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=1,
                                  extra_body={"prompt_logprobs": 0, "return_token_ids": True})
    plp = r.model_extra["prompt_logprobs"]
    assert len(plp) == len(r.choices[0].model_extra["prompt_token_ids"]) and plp[0] is None
    assert all(len(e) == 1 and next(iter(e.values()))["rank"] >= 1 for e in plp[1:])
