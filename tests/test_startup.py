"""Start-up: the persistent compile cache, the visible warm-up, lazy compiles for generate, the KV
cache sized to the device's memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from jaxserve import compile_cache

# Three step programs: decode buckets [0, 2] x prefill buckets [0, 32], less the empty one.
SMALL_KW = dict(max_num_seqs=2, page_size=8, max_model_len=64, max_num_batched_tokens=32, min_prefill_bucket=32)

START_SCRIPT = r"""
import json, sys
from jaxserve import Engine, SamplingParams
engine = Engine.from_pretrained(sys.argv[1], **json.loads(sys.argv[2]))
engine.warmup()
out = engine.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
r = engine.runner
print(json.dumps({"programs": r.compile_count, "hits": r.cache_hits, "compiled": r.programs_compiled,
                  "buckets": r.num_buckets, "tokens": out[0].token_ids}))
"""


def _start(model_dir: str, env: dict[str, str], **kw) -> dict:
    proc = subprocess.run([sys.executable, "-c", START_SCRIPT, model_dir, json.dumps({**SMALL_KW, **kw})],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_resolve_cache_dir(monkeypatch, tmp_path):
    monkeypatch.delenv(compile_cache.ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compile_cache.resolve_cache_dir("auto") == str(tmp_path / "xdg" / "jaxserve" / "xla")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert compile_cache.resolve_cache_dir("auto") == str(tmp_path / "home" / ".cache" / "jaxserve" / "xla")
    monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "env"))
    assert compile_cache.resolve_cache_dir("auto") == str(tmp_path / "env")
    assert compile_cache.resolve_cache_dir(str(tmp_path / "x")) == str(tmp_path / "x")
    monkeypatch.setenv(compile_cache.ENV, "off")
    assert compile_cache.resolve_cache_dir("auto") is None
    assert compile_cache.resolve_cache_dir(None) is None


def test_cli_compile_cache_flags():
    import argparse

    from jaxserve.cli import _add_engine_args, compile_cache_from_args

    p = argparse.ArgumentParser()
    _add_engine_args(p)
    assert compile_cache_from_args(p.parse_args([])) == "auto"
    assert compile_cache_from_args(p.parse_args(["--compile-cache-dir", "/tmp/c"])) == "/tmp/c"
    assert compile_cache_from_args(p.parse_args(["--no-compile-cache"])) is None


def test_second_start_loads_every_program_from_the_cache(llama_dir, tmp_path):
    """Two engine starts (two processes) with one cache dir: the first compiles every program, the
    second compiles none (each comes from the cache) and generates the same tokens."""
    cache = tmp_path / "xla"
    env = {**os.environ, compile_cache.ENV: str(cache)}
    first = _start(llama_dir, env)
    assert first["programs"] == first["buckets"] == 3
    assert first["compiled"] == 3 and first["hits"] == 0
    assert any(cache.iterdir())
    second = _start(llama_dir, env)
    assert second["programs"] == 3
    assert second["compiled"] == 0 and second["hits"] == 3
    assert second["tokens"] == first["tokens"]
    # Turned off: everything is compiled again.
    off = _start(llama_dir, {**os.environ, compile_cache.ENV: "off"})
    assert off["compiled"] == 3 and off["hits"] == 0


def test_health_is_503_while_warming_up_then_200(shared_engine):
    """The server answers /health during the warm-up (which runs in the engine thread after the
    app started): 503 with a JSON reason, then 200 once the warm-up returned."""
    import threading
    import time

    from starlette.testclient import TestClient

    from jaxserve.server import OpenAIServer, ServerConfig

    release = threading.Event()

    def warmup(loop):
        loop.warmup_progress = (1, 3)
        assert release.wait(60)

    server = OpenAIServer(shared_engine, ServerConfig("tiny"), warmup=warmup)
    with TestClient(server.app) as client:
        r = client.get("/health")
        assert r.status_code == 503
        body = r.json()
        assert body["status"] == "warming_up"
        assert body["error"]["message"] == "warming up: 1/3 step programs compiled or loaded"
        release.set()
        deadline = time.monotonic() + 30
        while (r := client.get("/health")).status_code != 200:
            assert time.monotonic() < deadline, r.text
            time.sleep(0.05)
        assert r.json() == {"status": "ok"}


def test_ready_line(shared_engine):
    line = shared_engine.ready_line("tiny", "http://127.0.0.1:8000")
    assert line.startswith("ready on http://127.0.0.1:8000: model tiny, KV cache ")
    assert f"{shared_engine.num_pages * shared_engine.config.page_size:,} tokens" in line
    r = shared_engine.runner
    assert "start-up: load " in line and "compile " in line
    assert f"programs compiled, {r.cache_hits} loaded from the compile cache" in line


def test_generate_compiles_only_the_buckets_it_hits(llama_dir, monkeypatch, capsys):
    """`jaxserve generate` warms nothing up: one short prompt compiles the programs of its steps only
    (a prefill-only and a decode-only bucket), not all of them."""
    from jaxserve import cli

    engines = []
    make = cli.engine_from_args

    def capture(args, **kw):
        engines.append(make(args, **kw))
        return engines[-1]

    monkeypatch.setattr(cli, "engine_from_args", capture)
    assert cli.main(["generate", "--model", llama_dir, "--prompt-ids", "5,6,7", "--max-tokens", "3",
                     "--ignore-eos", "--max-num-seqs", "4", "--max-model-len", "64", "--page-size", "8",
                     "--no-compile-cache"]) == 0
    runner = engines[0].runner
    assert runner.num_buckets > 2
    assert runner.compile_count == 2 and set(runner._executables) == {(0, 32), (4, 0)}


def test_kv_pages_for_memory():
    from jaxserve.kv_cache import kv_pages_for_memory

    gib = 1 << 30
    # 0.9 * 16 GiB - 2 GiB weights - 1 GiB temporaries = 11.4 GiB of 1 MiB pages.
    assert kv_pages_for_memory(bytes_limit=16 * gib, memory_utilization=0.9, weight_bytes=2 * gib, temp_bytes=gib,
                               page_bytes_per_device=1 << 20) == int((0.9 * 16 - 3) * 1024)
    assert kv_pages_for_memory(bytes_limit=gib, memory_utilization=0.5, weight_bytes=gib, temp_bytes=0,
                               page_bytes_per_device=1 << 20) == 0
    with pytest.raises(ValueError, match="memory_utilization"):
        kv_pages_for_memory(bytes_limit=gib, memory_utilization=1.5, weight_bytes=0, temp_bytes=0,
                            page_bytes_per_device=1)


def test_engine_sizes_the_cache_to_a_fake_device(shared_engine, monkeypatch):
    """The engine's GPU/TPU path against a fake ``memory_stats()``: weights and the largest step's
    temporary bytes come off the top, the rest at memory_utilization goes to pages."""
    import numpy as np

    from jaxserve import engine as engine_mod
    from jaxserve.kv_cache import page_bytes, per_device_bytes

    e = shared_engine
    weights = per_device_bytes(e.runner.params)
    limit = weights + (64 << 20)
    monkeypatch.setattr(engine_mod, "device_memory_stats", lambda device: {"bytes_limit": limit})
    monkeypatch.setattr(e.config, "memory_utilization", 0.95)
    pages, how = e._pages_for_device_memory(e.runner.params, np.float32, e.max_model_len)
    per_page = page_bytes(e.run_config, e.config.page_size, np.float32)
    free = 0.95 * limit - weights
    assert 0 < pages < free // per_page  # the temporaries took their share
    temp = free - pages * per_page
    assert 0 < temp < 64 << 20
    assert "95% of" in how and "step temporaries" in how
    # Memory in use besides the weights (another engine's cache, say) is not the cache's to take.
    other = 16 << 20
    monkeypatch.setattr(engine_mod, "device_memory_stats",
                        lambda device: {"bytes_limit": limit, "bytes_in_use": weights + other})
    fewer, how = e._pages_for_device_memory(e.runner.params, np.float32, e.max_model_len)
    assert abs((pages - fewer) * per_page - other) < per_page
    assert "in use" in how
    monkeypatch.setattr(engine_mod, "device_memory_stats",
                        lambda device: {"bytes_limit": limit, "bytes_in_use": limit})
    with pytest.raises(ValueError, match="memory_utilization: .* leaves no room for a KV cache after what is in use"):
        e._pages_for_device_memory(e.runner.params, np.float32, e.max_model_len)
    monkeypatch.setattr(engine_mod, "device_memory_stats", lambda device: {})
    with pytest.raises(ValueError, match="memory_utilization: .* reports no memory limit"):
        e._pages_for_device_memory(e.runner.params, np.float32, e.max_model_len)


def test_cpu_default_cache_and_max_model_len(llama_dir, caplog):
    """On CPU the default cache keeps today's cap and the log says why; max_model_len defaults to
    the model's context, or to what a small cache holds for one sequence, and says which."""
    import logging

    from jaxserve import Engine

    with caplog.at_level(logging.INFO, logger="jaxserve.engine"):
        e = Engine.from_pretrained(llama_dir, max_num_seqs=2, page_size=8, num_pages=10, compile_cache_dir=None)
    assert e.max_model_len == 80
    assert any("what the KV cache holds for one sequence" in r.message for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="jaxserve.engine"):
        e = Engine.from_pretrained(llama_dir, max_num_seqs=2, page_size=8, compile_cache_dir=None)
    assert e.max_model_len == e.model_config.max_position_embeddings
    assert any("CPU: no device memory limit" in r.message for r in caplog.records)


def test_serving_warmup_covers_every_step_and_compiles_the_rest_in_the_background(llama_dir):
    """serve's warm-up: the buckets that hold every step first; a step whose bucket is not compiled
    yet runs padded in the smallest compiled bucket that holds it (same tokens, no compile); the rest
    compile in a background thread."""
    from conftest import greedy, random_prompts
    from jaxserve import Engine

    kw = dict(max_num_seqs=4, page_size=8, max_model_len=128, max_num_batched_tokens=64, min_prefill_bucket=32,
              min_decode_bucket=2, compile_cache_dir=None)
    prompts = random_prompts([5, 40, 9, 17, 60, 3])
    params = [greedy(n) for n in (6, 3, 8, 5, 4, 7)]
    exact = Engine.from_pretrained(llama_dir, **kw)
    want = [o.token_ids for o in exact.generate(prompts, params)]

    engine = Engine.from_pretrained(llama_dir, **kw)
    r = engine.runner
    # decode buckets [0, 2, 4] x prefill buckets [0, 32, 64]: 8 programs
    assert r.serving_buckets() == [(2, 0), (4, 0), (0, 64), (4, 64)]
    r.warmup(r.serving_buckets())
    r.use_compiled_cover = True
    got = [o.token_ids for o in engine.generate(prompts, params)]
    assert got == want
    assert r.compile_count == 4 and r.cover_steps > 0  # nothing compiled while serving
    assert r._compiled_cover(1, 0) == (2, 0) and r._compiled_cover(1, 20) == (4, 64)
    assert r._compiled_cover(0, 20) == (0, 64)

    engine = Engine.from_pretrained(llama_dir, **kw)
    engine.warmup_for_serving()
    assert engine.runner.use_compiled_cover
    engine._background_compile.join(300)
    assert not engine.background_compile_pending and engine.compile_count == engine.num_buckets == 8
    assert [o.token_ids for o in engine.generate(prompts, params)] == want
    engine.stop_background_compile()


def test_full_warmup_flag_reaches_serve(monkeypatch):
    from jaxserve import cli, server as server_module

    seen = {}
    monkeypatch.setattr(cli, "engine_from_args", lambda args, **kw: None)
    monkeypatch.setattr(server_module, "serve", lambda engine, **kw: seen.update(kw) or 0)
    assert cli.main(["serve", "--model", "m"]) == 0
    assert seen["full_warmup"] is False and seen["model_name"] == "m"
    assert cli.main(["serve", "--model", "org/name", "--full-warmup"]) == 0
    assert seen["full_warmup"] is True and seen["model_name"] == "org/name"
