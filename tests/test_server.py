"""The OpenAI-compatible server, over real HTTP on a loopback port, with the official ``openai`` client.

One ``jaxserve serve`` subprocess (tiny Llama with a chat template, the shared test engine
configuration) serves most tests; the last test shuts it down with SIGTERM.  One test runs the
server in-process (uvicorn in a thread) over the shared engine to check the API key, the 429 of
``--max-queue``, ``--enable-force-include-usage`` and the 400 of a model without a chat template.
Expected token ids come from ``Engine.generate`` (the ``reference_outputs`` fixture) on the same
checkpoint.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from conftest import ENGINE_KW, ROOT, assert_clean, random_prompts  # noqa: E402
from jaxserve.metrics import parse_prometheus  # noqa: E402

MODEL_NAME = "tiny-chat"
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
STARTUP_TIMEOUT_S = 240
HTTP_TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def engine_cli_args() -> list[str]:
    kw = ENGINE_KW
    return ["--max-num-seqs", str(kw["max_num_seqs"]), "--page-size", str(kw["page_size"]),
            "--max-model-len", str(kw["max_model_len"]), "--max-num-batched-tokens",
            str(kw["max_num_batched_tokens"]), "--min-prefill-bucket", str(kw["min_prefill_bucket"])]


class ServerProcess:
    """``jaxserve serve`` in a subprocess on a free loopback port."""

    def __init__(self, model_dir: str, log_path: str, extra: list[str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        cmd = [sys.executable, "-m", "jaxserve.cli", "-v", "serve", "--model", model_dir, "--port", str(self.port),
               "--served-model-name", MODEL_NAME, *engine_cli_args(), *(extra or [])]
        self.log_path = log_path
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_text()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"server did not start within {STARTUP_TIMEOUT_S}s:\n{self.log_text()}")

    def log_text(self) -> str:
        self.log.flush()
        with open(self.log_path) as f:
            return f.read()[-5000:]

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.running:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()


@pytest.fixture(scope="module")
def chat_model_dir(llama_dir, tmp_path_factory) -> str:
    """The shared tiny Llama (same weights and tokenizer) with a chat template."""
    return with_chat_template(llama_dir, str(tmp_path_factory.mktemp("llama_chat") / "model"), CHAT_TEMPLATE)


def with_chat_template(model_dir: str, path: str, template: str) -> str:
    """A copy of ``model_dir`` at ``path`` whose tokenizer config has ``template`` as its chat template."""
    shutil.copytree(model_dir, path)
    cfg_path = os.path.join(path, "tokenizer_config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["chat_template"] = template
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    return path


@pytest.fixture(scope="module")
def _server_holder(chat_model_dir, tmp_path_factory):
    holder: dict[str, ServerProcess] = {}
    yield holder, chat_model_dir, str(tmp_path_factory.mktemp("server_logs"))
    if "server" in holder:
        holder["server"].stop()


@pytest.fixture
def server(_server_holder) -> ServerProcess:
    """The module's server process, (re)started if it is not running."""
    holder, model_dir, log_dir = _server_holder
    if "server" not in holder or not holder["server"].running:
        if "server" in holder:
            holder["server"].stop()
        holder["server"] = ServerProcess(model_dir, os.path.join(log_dir, f"server-{len(os.listdir(log_dir))}.log"))
    return holder["server"]


def client(server: ServerProcess) -> "openai.OpenAI":
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=HTTP_TIMEOUT_S)


def metrics(url: str) -> dict[str, float]:
    return parse_prometheus(httpx.get(url + "/metrics", timeout=10).text)


def wait_idle(url: str, timeout_s: float = 60) -> dict[str, float]:
    """Poll /metrics until nothing runs, waits or holds a page; returns the last sample."""
    deadline = time.monotonic() + timeout_s
    while True:
        m = metrics(url)
        if (m["jaxserve_requests_running"], m["jaxserve_requests_waiting"], m["jaxserve_cache_pages_used"]) == (0, 0, 0):
            return m
        if time.monotonic() > deadline:
            raise AssertionError(f"server not idle after {timeout_s}s: {m}")
        time.sleep(0.05)


GREEDY = dict(temperature=0)
IDS_EXTRA = {"ignore_eos": True, "return_token_ids": True}


# -- basic API ----------------------------------------------------------------------------------------

def test_models_health_metrics(server):
    c = client(server)
    assert [m.id for m in c.models.list().data] == [MODEL_NAME]
    assert httpx.get(server.url + "/health", timeout=10).json() == {"status": "ok"}
    m = metrics(server.url)
    for name in ("jaxserve_requests_running", "jaxserve_requests_waiting", "jaxserve_cache_pages_used",
                 "jaxserve_generation_tokens_total", "jaxserve_time_to_first_token_seconds_count",
                 "jaxserve_time_per_output_token_seconds_count"):
        assert name in m
    assert m["jaxserve_cache_pages_total"] > 0


def test_completion_stream_equals_non_stream(server, reference_outputs):
    c = client(server)
    prompt = random_prompts([11], seed=5)[0]
    kwargs = dict(model=MODEL_NAME, prompt=prompt, max_tokens=20, logprobs=2, **GREEDY, extra_body=IDS_EXTRA)
    full = c.completions.create(**kwargs)
    choice = full.choices[0]
    assert choice.finish_reason == "length"
    assert choice.token_ids == reference_outputs([prompt], [20])[0]
    assert full.usage.prompt_tokens == 11 and full.usage.completion_tokens == 20
    assert full.usage.total_tokens == 31

    # The standard client loop: without stream_options, every chunk has its choice (no usage chunk).
    chunks = list(c.completions.create(stream=True, **kwargs))
    assert "".join(chunk.choices[0].text for chunk in chunks) == choice.text
    assert [i for chunk in chunks for i in chunk.choices[0].token_ids] == choice.token_ids
    reasons = [chunk.choices[0].finish_reason for chunk in chunks]
    assert reasons[-1] == "length" and set(reasons[:-1]) <= {None}
    assert all(chunk.usage is None for chunk in chunks)
    assert {(ch.id, ch.created, ch.model, ch.object) for ch in chunks} == {
        (chunks[0].id, chunks[0].created, MODEL_NAME, "text_completion")}
    logprobs = [chunk.choices[0].logprobs for chunk in chunks]
    assert [t for lp in logprobs for t in lp.tokens] == choice.logprobs.tokens
    assert [o for lp in logprobs for o in lp.text_offset] == choice.logprobs.text_offset
    assert [v for lp in logprobs for v in lp.token_logprobs] == pytest.approx(choice.logprobs.token_logprobs)

    # Asked for: exactly one more chunk, the last, with no choices and the request's usage.
    chunks = list(c.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    assert [chunk.choices == [] for chunk in chunks] == [False] * (len(chunks) - 1) + [True]
    assert "".join(chunk.choices[0].text for chunk in chunks[:-1]) == choice.text
    assert all(chunk.usage is None for chunk in chunks[:-1])
    usage = chunks[-1].usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (11, 20, 31)


def test_text_prompt_and_stop_string_stream_equals_non_stream(server):
    c = client(server)
    base = c.completions.create(model=MODEL_NAME, prompt="The quick brown fox", max_tokens=40, **GREEDY,
                                extra_body={"ignore_eos": True})
    text = base.choices[0].text
    assert len(text) > 12, text
    stop = text[8:11]
    expected = text[:text.find(stop)]
    cut = c.completions.create(model=MODEL_NAME, prompt="The quick brown fox", max_tokens=40, stop=[stop],
                               **GREEDY, extra_body={"ignore_eos": True})
    assert cut.choices[0].text == expected and cut.choices[0].finish_reason == "stop"
    streamed = "".join(ch.text for chunk in c.completions.create(
        model=MODEL_NAME, prompt="The quick brown fox", max_tokens=40, stop=[stop], stream=True, **GREEDY,
        extra_body={"ignore_eos": True}) for ch in chunk.choices)
    assert streamed == expected


def test_chat_stream_equals_non_stream(server):
    c = client(server)
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hello."}]
    kwargs = dict(model=MODEL_NAME, messages=messages, max_tokens=16, logprobs=True, **GREEDY,
                  extra_body={"ignore_eos": True})
    full = c.chat.completions.create(**kwargs)
    msg = full.choices[0].message
    assert msg.role == "assistant" and full.object == "chat.completion"
    assert full.usage.completion_tokens == 16 and full.usage.prompt_tokens > 10

    # The standard client loop: a role chunk, then content; no usage chunk unless asked for.
    chunks = list(c.chat.completions.create(stream=True, **kwargs))
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks) == msg.content
    first = chunks[0].choices[0]
    assert (first.delta.role, first.delta.content, first.logprobs, first.finish_reason) == ("assistant", "", None, None)
    assert all(chunk.choices[0].delta.role is None for chunk in chunks[1:])
    reasons = [chunk.choices[0].finish_reason for chunk in chunks]
    assert reasons[-1] == "length" and set(reasons[:-1]) <= {None}
    assert all(chunk.usage is None for chunk in chunks)
    assert {(ch.id, ch.created, ch.model, ch.object) for ch in chunks} == {
        (chunks[0].id, chunks[0].created, MODEL_NAME, "chat.completion.chunk")}
    streamed = [(e.token, e.logprob) for chunk in chunks[1:] for e in chunk.choices[0].logprobs.content]
    expected = [(e.token, e.logprob) for e in full.choices[0].logprobs.content]
    assert [t for t, _ in streamed] == [t for t, _ in expected]
    assert [v for _, v in streamed] == pytest.approx([v for _, v in expected])

    # include_usage, on the wire: "usage": null on every chunk but the last, which has no choices.
    body = {"model": MODEL_NAME, "messages": messages, "max_tokens": 16, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=HTTP_TIMEOUT_S) as resp:
        assert resp.status_code == 200
        lines = [line for line in resp.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)
    events = [json.loads(line[len("data: "):]) for line in lines[:-1]]
    assert events[0]["choices"] == [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                     "finish_reason": None}]
    assert [e["choices"] == [] for e in events] == [False] * (len(events) - 1) + [True]
    assert [e["usage"] for e in events[:-1]] == [None] * (len(events) - 1)
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1]) == msg.content
    assert events[-1]["usage"] == {"prompt_tokens": full.usage.prompt_tokens, "completion_tokens": 16,
                                   "total_tokens": full.usage.prompt_tokens + 16}


def test_chat_logprobs_and_max_completion_tokens(server):
    c = client(server)
    out = c.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "Hi"}],
                                    logprobs=True, top_logprobs=3, max_completion_tokens=5, **GREEDY,
                                    extra_body={"ignore_eos": True})
    content = out.choices[0].logprobs.content
    assert len(content) == 5
    for entry in content:
        assert len(entry.top_logprobs) == 3
        assert entry.logprob <= 0 and entry.top_logprobs[0].logprob >= entry.logprob - 1e-5


def test_batch_prompts_n_seed_logprobs(server, reference_outputs):
    c = client(server)
    prompts = random_prompts([5, 9], seed=11)
    kwargs = dict(model=MODEL_NAME, prompt=prompts, max_tokens=6, n=2, temperature=0.9, seed=1234, logprobs=2,
                  extra_body=IDS_EXTRA)
    first = c.completions.create(**kwargs)
    assert [ch.index for ch in first.choices] == [0, 1, 2, 3]
    assert first.usage.prompt_tokens == 14 and first.usage.completion_tokens == 24
    for ch in first.choices:
        assert len(ch.token_ids) == 6
        assert len(ch.logprobs.tokens) == 6 and len(ch.logprobs.token_logprobs) == 6
        assert all(len(top) <= 2 for top in ch.logprobs.top_logprobs)
    again = c.completions.create(**kwargs)
    assert [ch.token_ids for ch in again.choices] == [ch.token_ids for ch in first.choices]
    greedy = c.completions.create(model=MODEL_NAME, prompt=prompts, max_tokens=6, n=2, **GREEDY,
                                  extra_body=IDS_EXTRA)
    ref = reference_outputs(prompts, [6, 6])
    assert [ch.token_ids for ch in greedy.choices] == [ref[0], ref[0], ref[1], ref[1]]


# -- load and faults ------------------------------------------------------------------------------------

async def _stream_tokens(c: "openai.AsyncOpenAI", prompt: list[int], max_tokens: int) -> tuple[list[int], str]:
    ids, reason = [], None
    stream = await c.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=max_tokens, stream=True,
                                        **GREEDY, extra_body=IDS_EXTRA)
    async for chunk in stream:
        for ch in chunk.choices:
            ids += ch.token_ids
            reason = ch.finish_reason or reason
    return ids, reason


def test_64_concurrent_streaming_clients(server, reference_outputs):
    lengths = [3 + (7 * i) % 41 for i in range(64)]
    max_tokens = [1 + (5 * i) % 24 for i in range(64)]
    prompts = random_prompts(lengths, seed=64)
    expected = reference_outputs(prompts, max_tokens)

    async def main():
        c = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0,
                               timeout=HTTP_TIMEOUT_S)
        try:
            return await asyncio.gather(*(_stream_tokens(c, p, n) for p, n in zip(prompts, max_tokens)))
        finally:
            await c.close()

    results = asyncio.run(main())
    assert [ids for ids, _ in results] == expected
    assert all(reason == "length" for _, reason in results)
    m = wait_idle(server.url)
    assert m["jaxserve_cache_pages_used"] == 0


def _read_events(resp, count: int) -> list[str]:
    events = []
    for line in resp.iter_lines():
        if line.startswith("data: "):
            events.append(line)
            if len(events) >= count:
                break
    return events


def test_disconnect_mid_stream_aborts_only_that_request(server, reference_outputs):
    before = metrics(server.url)
    prompt = random_prompts([7], seed=3)[0]
    other_prompt = random_prompts([9], seed=4)[0]
    c = client(server)
    result: dict[str, object] = {}

    def other():
        out = c.completions.create(model=MODEL_NAME, prompt=other_prompt, max_tokens=30, **GREEDY,
                                   extra_body=IDS_EXTRA)
        result["ids"] = out.choices[0].token_ids

    with httpx.Client(timeout=HTTP_TIMEOUT_S) as h:
        with h.stream("POST", server.url + "/v1/completions",
                      json={"prompt": prompt, "max_tokens": 240, "temperature": 0, "ignore_eos": True,
                            "stream": True}) as resp:
            assert resp.status_code == 200
            assert len(_read_events(resp, 3)) == 3
            t = threading.Thread(target=other)
            t.start()
        # leaving the block closes the connection mid-stream
    t.join(HTTP_TIMEOUT_S)
    assert result["ids"] == reference_outputs([other_prompt], [30])[0]
    after = wait_idle(server.url)
    key = 'jaxserve_requests_finished_total{finish_reason="abort"}'
    assert after[key] == before[key] + 1
    # the aborted request did not run to its 240 tokens
    assert after["jaxserve_generation_tokens_total"] - before["jaxserve_generation_tokens_total"] < 240 + 30


# Known-nasty bodies: every one must get a 4xx with an OpenAI error body, none a 500.
NASTY = [
    b"", b"{", b"null", b"[]", b'"prompt"', b"123", b"\xff\xfe\x00garbage", b'{"prompt": NaN}',
    b'{"prompt": "hi", "max_tokens": Infinity}', b'{"prompt": "hi", "max_tokens": 1e999}',
    b'{"prompt": "hi", "temperature": 1e999}', b"[" * 100_000 + b"]" * 100_000,
    b'{"prompt": "\\ud800"}', b'{"prompt": "hi", "stop": "\\udfff"}', b'{"prompt": []}',
    b'{"prompt": [[]]}', b'{"prompt": [1, "a"]}', b'{"prompt": [-1]}', b'{"prompt": [99999999999999999999]}',
    b'{"prompt": [5], "max_tokens": 100000}', b'{"prompt": [5], "max_tokens": 0}', b'{"prompt": [5], "n": 0}',
    b'{"prompt": [5], "n": 100000}', b'{"prompt": [5], "top_k": 99999999999999}', b'{"prompt": [5], "top_p": 0}',
    b'{"prompt": [5], "seed": -1}', b'{"prompt": [5], "seed": 18446744073709551616}',
    b'{"prompt": [5], "logprobs": 50}', b'{"prompt": [5], "max_tokens": "5"}', b'{"prompt": [5], "stream": "yes"}',
    b'{"prompt": [5], "stop": [""]}', b'{"prompt": [5], "echo": true, "logprobs": 1}', b'{"prompt": [5], "model": "gpt-4"}',
    b'{"prompt": [5], "stream_options": {"include_usage": 3}}', b'{"prompt": [5], "presence_penalty": 3}',
    b'{"prompt": [5], "logit_bias": {"x": 1}}', b'{"prompt": [5], "repetition_penalty": 0}',
    b'{"prompt": ' + b"[5, " * 1 + b'"x"' + b"]}", b'{"max_tokens": 5}',
]
NASTY_CHAT = [
    b'{"messages": []}', b'{"messages": "hi"}', b'{"messages": [{"role": "wizard", "content": "x"}]}',
    b'{"messages": [{"role": "user", "content": 5}]}', b'{"messages": [{"role": "user", "content": "\\ud800"}]}',
    b'{"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}',
    b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 100000}',
    b'{"messages": [{"role": "user", "content": [{"type": "image", "url": "x"}]}]}',
]


def _assert_error_body(resp, body: bytes) -> None:
    assert 400 <= resp.status_code < 500, (resp.status_code, body[:200], resp.text[:300])
    err = resp.json()["error"]
    assert isinstance(err["message"], str) and err["message"], err
    assert err["type"], err


def test_nasty_bodies_get_4xx_naming_the_field(server):
    with httpx.Client(timeout=HTTP_TIMEOUT_S) as h:
        for path, bodies in (("/v1/completions", NASTY), ("/v1/chat/completions", NASTY_CHAT)):
            for body in bodies:
                resp = h.post(server.url + path, content=body, headers={"content-type": "application/json"})
                _assert_error_body(resp, body)
        named = {b'{"prompt": [5], "max_tokens": "5"}': "max_tokens", b'{"prompt": [5], "top_p": 0}': "top_p",
                 b'{"prompt": [5], "n": 0}': "n", b'{"prompt": [99999999999999999999]}': "prompt_token_ids",
                 b'{"prompt": [5], "max_tokens": 100000}': "max_tokens", b'{"max_tokens": 5}': "prompt",
                 b'{"prompt": [5], "seed": -1}': "seed"}
        for body, field in named.items():
            err = h.post(server.url + "/v1/completions", content=body).json()["error"]
            assert err["param"] == field and field in err["message"], (body, err)
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200
    wait_idle(server.url)


_JUNK = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=12),
    st.lists(st.integers(min_value=-5, max_value=2**40), max_size=4),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2))
_FIELDS = ["prompt", "messages", "max_tokens", "n", "temperature", "top_p", "top_k", "min_p", "seed", "stop",
           "logprobs", "stream", "stop_token_ids", "model", "top_logprobs", "ignore_eos"]
_bad_body = st.one_of(
    st.binary(max_size=40),
    st.dictionaries(st.sampled_from(_FIELDS), _JUNK, max_size=5).map(lambda d: json.dumps(d).encode()),
    st.fixed_dictionaries({"prompt": st.one_of(st.text(max_size=8), st.lists(st.integers(-3, 4000), max_size=6))},
                          optional={k: _JUNK for k in ("max_tokens", "n", "temperature", "top_p", "seed", "stop")}
                          ).map(lambda d: json.dumps(d).encode()),
    st.recursive(_JUNK, lambda inner: st.lists(inner, max_size=3), max_leaves=8).map(
        lambda v: json.dumps(v).encode()))


@settings(max_examples=12, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture])
@given(bad=st.lists(st.tuples(st.sampled_from(["/v1/completions", "/v1/chat/completions"]), _bad_body),
                    min_size=4, max_size=10))
def test_malformed_burst_mixed_with_good_requests(server, reference_outputs, bad):
    good_prompts = random_prompts([6, 13], seed=99)
    expected = reference_outputs(good_prompts, [8, 8])

    async def main():
        async with httpx.AsyncClient(timeout=HTTP_TIMEOUT_S) as h:
            async def post(path: str, body: bytes):
                return await h.post(server.url + path, content=body, headers={"content-type": "application/json"})

            async def good(prompt: list[int], stream: bool) -> list[int]:
                body = {"prompt": prompt, "max_tokens": 8, "temperature": 0, "stream": stream, **IDS_EXTRA}
                if not stream:
                    resp = await h.post(server.url + "/v1/completions", json=body)
                    assert resp.status_code == 200, resp.text
                    return resp.json()["choices"][0]["token_ids"]
                ids = []
                async with h.stream("POST", server.url + "/v1/completions", json=body) as resp:
                    assert resp.status_code == 200
                    async for line in resp.aiter_lines():
                        if line.startswith("data: ") and line != "data: [DONE]":
                            for ch in json.loads(line[6:])["choices"]:
                                ids += ch["token_ids"]
                return ids

            tasks = [post(path, body) for path, body in bad]
            tasks.insert(len(tasks) // 2, good(good_prompts[0], False))
            tasks.append(good(good_prompts[1], True))
            return await asyncio.gather(*tasks)

    results = asyncio.run(main())
    goods = [r for r in results if isinstance(r, list)]
    responses = [r for r in results if not isinstance(r, list)]
    assert goods == expected
    for (path, body), resp in zip(bad, responses):
        assert resp.status_code < 500, (path, body[:300], resp.status_code, resp.text[:300])
        if resp.status_code != 200:
            _assert_error_body(resp, body)
    wait_idle(server.url)


# -- in-process server: API key, --max-queue, forced usage chunk, no chat template ------------------------

def test_api_key_max_queue_and_missing_chat_template(engine):
    import uvicorn

    from jaxserve.server import OpenAIServer, ServerConfig

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    app_server = OpenAIServer(engine, ServerConfig("tiny", api_key="sekrit", max_queue=0, force_include_usage=True))
    uv = uvicorn.Server(uvicorn.Config(app_server.app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not uv.started:
            assert time.monotonic() < deadline and thread.is_alive(), "in-process server did not start"
            time.sleep(0.05)
        body = {"prompt": [5, 6, 7], "max_tokens": 4, "temperature": 0}
        assert httpx.post(url + "/v1/completions", json=body).status_code == 401
        wrong = httpx.post(url + "/v1/completions", json=body, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json()["error"]["type"] == "authentication_error"
        assert httpx.get(url + "/v1/models").status_code == 401
        assert httpx.get(url + "/health").status_code == 200
        c = openai.OpenAI(base_url=url + "/v1", api_key="sekrit", max_retries=0, timeout=HTTP_TIMEOUT_S)
        assert c.completions.create(model="tiny", prompt=[5, 6, 7], max_tokens=4, temperature=0).usage.total_tokens == 7
        # --enable-force-include-usage: the usage chunk comes unasked, and even when declined.
        for options in ({}, {"stream_options": {"include_usage": False}}):
            chunks = list(c.completions.create(model="tiny", prompt=[5, 6, 7], max_tokens=4, temperature=0,
                                               stream=True, **options))
            assert [chunk.choices == [] for chunk in chunks] == [False] * (len(chunks) - 1) + [True]
            usage = chunks[-1].usage
            assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (3, 4, 7)

        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        assert e.value.status_code == 400 and "chat template" in e.value.message
        assert e.value.body["param"] == "messages"

        # --max-queue 0 with max_num_seqs=4: four streams fill the server, the fifth request gets a 429.
        # The engine loop is paused meanwhile so that the four stay in flight however fast the engine is.
        auth = {"Authorization": "Bearer sekrit"}
        long_body = {"prompt": [9, 10, 11], "max_tokens": 200, "temperature": 0, "ignore_eos": True, "stream": True}
        app_server.engine_loop.pause()
        with httpx.Client(timeout=HTTP_TIMEOUT_S, headers=auth) as h:
            streams = [h.stream("POST", url + "/v1/completions", json=long_body) for _ in range(4)]
            responses = [s.__enter__() for s in streams]  # returns once the headers came: admitted
            try:
                assert [resp.status_code for resp in responses] == [200] * 4
                with pytest.raises(openai.RateLimitError) as e:
                    c.completions.create(model="tiny", prompt=[5], max_tokens=2)
                assert e.value.status_code == 429
                app_server.engine_loop.resume()
                for resp in responses:
                    assert len(_read_events(resp, 1)) == 1
            finally:
                app_server.engine_loop.resume()
                for s in streams:
                    s.__exit__(None, None, None)
        deadline = time.monotonic() + 60
        while engine.has_unfinished() or engine.num_free_pages != engine.num_pages:
            assert time.monotonic() < deadline, "aborted streams did not free their pages"
            time.sleep(0.05)

        # A non-streaming client that goes away: its request is aborted (taken off the waiting queue
        # without any step: the engine loop is paused throughout), its final output comes after resume.
        aborted_before = app_server.metrics.finished["abort"]
        app_server.engine_loop.pause()
        try:
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(url + "/v1/completions", headers=auth, timeout=1.0,
                           json={"prompt": list(range(3, 40)), "max_tokens": 100, "ignore_eos": True})
            deadline = time.monotonic() + 60
            while engine.num_free_pages != engine.num_pages or engine.scheduler.waiting or engine.scheduler.running:
                assert time.monotonic() < deadline, "the disconnected request was not aborted"
                time.sleep(0.05)
        finally:
            app_server.engine_loop.resume()
        deadline = time.monotonic() + 60
        while app_server.metrics.finished["abort"] != aborted_before + 1 or engine.has_unfinished():
            assert time.monotonic() < deadline, "no final 'abort' output for the disconnected request"
            time.sleep(0.05)
        assert c.completions.create(model="tiny", prompt=[5], max_tokens=2, temperature=0).usage.completion_tokens == 2
    finally:
        uv.should_exit = True
        thread.join(60)
    assert not thread.is_alive() and not app_server.engine_loop.alive
    assert_clean(engine)


def test_enable_force_include_usage_flag_reaches_the_server(monkeypatch):
    from jaxserve import cli, server as server_module

    seen = {}
    monkeypatch.setattr(cli, "engine_from_args", lambda args, **kw: None)
    monkeypatch.setattr(server_module, "serve", lambda engine, **kw: seen.update(kw) or 0)
    assert cli.main(["serve", "--model", "m", "--no-warmup", "--enable-force-include-usage"]) == 0
    assert seen["force_include_usage"] is True
    assert cli.main(["serve", "--model", "m", "--no-warmup"]) == 0
    assert seen["force_include_usage"] is False


# -- shutdown (keep last: it stops the module's server) ----------------------------------------------------

def test_sigterm_finishes_in_flight_requests_and_exits_0(server, reference_outputs):
    prompts = random_prompts([4, 8, 12], seed=21)
    max_tokens = [160, 200, 240]
    expected = reference_outputs(prompts, max_tokens)
    started = threading.Semaphore(0)
    results: dict[int, tuple[list[int], str]] = {}
    received = [0, 0, 0]  # tokens so far, per stream

    def run(i: int) -> None:
        ids, reason = [], None
        with httpx.Client(timeout=HTTP_TIMEOUT_S) as h:
            body = {"prompt": prompts[i], "max_tokens": max_tokens[i], "temperature": 0, "stream": True, **IDS_EXTRA}
            with h.stream("POST", server.url + "/v1/completions", json=body) as resp:
                signalled = False
                for line in resp.iter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        for ch in json.loads(line[6:])["choices"]:
                            ids += ch["token_ids"]
                            reason = ch["finish_reason"] or reason
                        received[i] = len(ids)
                        if ids and not signalled:
                            signalled = True
                            started.release()
        results[i] = (ids, reason)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for _ in threads:
        assert started.acquire(timeout=HTTP_TIMEOUT_S), "streams did not start"
    server.proc.send_signal(signal.SIGTERM)
    at_signal = sum(received)
    # New work is refused from now on: /health turns 503, then the port closes.
    deadline = time.monotonic() + 30
    refused = False
    while not refused and time.monotonic() < deadline:
        try:
            refused = httpx.get(server.url + "/health", timeout=5).status_code == 503
        except httpx.HTTPError:
            refused = True
        if not refused:
            time.sleep(0.02)
    assert refused
    try:
        late = httpx.post(server.url + "/v1/completions", json={"prompt": [5], "max_tokens": 2}, timeout=10)
        assert late.status_code == 503
    except httpx.HTTPError:
        pass  # the listener is closed: refused as well
    for t in threads:
        t.join(HTTP_TIMEOUT_S)
    assert [results[i][0] for i in range(3)] == expected
    assert all(results[i][1] == "length" for i in range(3))
    assert at_signal < sum(max_tokens)  # they were still generating when the signal came
    assert server.proc.wait(60) == 0, server.log_text()
