"""Hugging Face Hub ids (``--model ORG/NAME``), offline: checkpoints are written into a temporary
Hugging Face cache laid out as ``huggingface_hub`` lays it out (``models--ORG--NAME/{blobs,refs,snapshots}``)
and loaded by id with ``HF_HUB_OFFLINE=1``; nothing is downloaded."""

from __future__ import annotations

import argparse
import hashlib
import os

import numpy as np
import pytest

from conftest import greedy
from jaxserve import Engine, hub
from jaxserve.engine import load_model

REV_A = "a" * 40
REV_B = "b" * 40
SMALL_KW = dict(max_num_seqs=2, page_size=8, max_model_len=64, max_num_batched_tokens=32, min_prefill_bucket=32,
                compile_cache_dir=None)


def add_snapshot(hub_cache: str, repo_id: str, commit: str, files: dict[str, str], refs: tuple[str, ...] = ()) -> str:
    """Put ``files`` (name in the repo -> local file) into ``hub_cache`` as snapshot ``commit`` of
    ``repo_id``: the contents in ``blobs/<sha256>``, symlinked from ``snapshots/<commit>/<name>``; each
    ref in ``refs`` (e.g. ``main``) names the commit."""
    repo = os.path.join(hub_cache, "models--" + repo_id.replace("/", "--"))
    snap = os.path.join(repo, "snapshots", commit)
    os.makedirs(os.path.join(repo, "blobs"), exist_ok=True)
    os.makedirs(snap, exist_ok=True)
    for name, src in files.items():
        with open(src, "rb") as f:
            data = f.read()
        blob = os.path.join(repo, "blobs", hashlib.sha256(data).hexdigest())
        with open(blob, "wb") as f:
            f.write(data)
        dst = os.path.join(snap, name)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        os.symlink(os.path.relpath(blob, os.path.dirname(dst)), dst)
    for ref in refs:
        os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
        with open(os.path.join(repo, "refs", ref), "w") as f:
            f.write(commit)
    return snap


def checkpoint_files(model_dir: str) -> dict[str, str]:
    return {name: os.path.join(model_dir, name) for name in os.listdir(model_dir)}


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty Hugging Face cache under HF_HOME=tmp/hf, offline; returns its hub directory."""
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = str(tmp_path / "hf" / "hub")
    os.makedirs(cache)
    return cache


def test_is_repo_id():
    for ok in ("Qwen/Qwen2.5-7B-Instruct", "meta-llama/Llama-3.1-8B-Instruct", "gpt2", "org/name.v1_2"):
        assert hub.is_repo_id(ok), ok
    for bad in ("/abs/path", "./rel", "a/b/c", "../x/y", "org/..", "org/model.gguf", "", "org/", "org/na me"):
        assert not hub.is_repo_id(bad), bad


def test_hub_cache_dir_follows_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert hub.hub_cache_dir() == str(tmp_path / "home" / "hub")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    assert hub.hub_cache_dir() == str(tmp_path / "cache")
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.delenv("HF_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hub.hub_cache_dir() == str(tmp_path / "xdg" / "huggingface" / "hub")


def test_load_by_hub_id_offline(offline_hub, llama_dir):
    snap = add_snapshot(offline_hub, "testorg/tiny-llama", REV_A, checkpoint_files(llama_dir), refs=("main",))
    assert hub.resolve_model("testorg/tiny-llama") == snap
    cfg_id, params_id, tok_id = load_model("testorg/tiny-llama")
    cfg_dir, params_dir, tok_dir = load_model(llama_dir)
    assert cfg_id == cfg_dir
    assert tok_id is not None and tok_id.get_vocab() == tok_dir.get_vocab()
    import jax

    for a, b in zip(jax.tree_util.tree_leaves(params_id), jax.tree_util.tree_leaves(params_dir)):
        np.testing.assert_array_equal(a, b)
    # The engine by id generates what it generates from the directory.
    prompt = [[5, 6, 7, 8]]
    by_id = Engine.from_pretrained("testorg/tiny-llama", **SMALL_KW).generate(prompt, greedy(4))
    by_dir = Engine.from_pretrained(llama_dir, **SMALL_KW).generate(prompt, greedy(4))
    assert by_id[0].token_ids == by_dir[0].token_ids and len(by_id[0].token_ids) == 4


def test_hub_cache_env_and_revisions(tmp_path, monkeypatch, llama_dir, mha_dir):
    """HF_HUB_CACHE points anywhere; --revision takes a branch or a commit of the cache."""
    cache = str(tmp_path / "elsewhere")
    monkeypatch.setenv("HF_HUB_CACHE", cache)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snap_a = add_snapshot(cache, "testorg/m", REV_A, checkpoint_files(llama_dir), refs=("main",))
    snap_b = add_snapshot(cache, "testorg/m", REV_B, checkpoint_files(mha_dir), refs=("v2",))
    assert hub.resolve_model("testorg/m") == snap_a
    assert hub.resolve_model("testorg/m", revision="v2") == snap_b
    assert hub.resolve_model("testorg/m", revision=REV_B) == snap_b
    cfg, _, _ = load_model("testorg/m", revision="v2")
    assert cfg.num_kv_heads == 8
    with pytest.raises(FileNotFoundError, match="testorg/m"):
        hub.resolve_model("testorg/m", revision="v3")


def test_unknown_hub_id_fails_clearly(offline_hub):
    with pytest.raises(FileNotFoundError, match=r"'testorg/no-such-model'.*HF_HUB_OFFLINE") as e:
        Engine.from_pretrained("testorg/no-such-model")
    assert offline_hub in str(e.value)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model("a/b/c")  # neither a path nor an id


def test_gguf_repo(offline_hub, tmp_path):
    gguf = tmp_path / "model-Q4_1.gguf"
    gguf.write_bytes(b"GGUF not really")
    readme = tmp_path / "README.md"
    readme.write_text("a GGUF repo")
    snap = add_snapshot(offline_hub, "testorg/tiny-GGUF", REV_A, {"model-Q4_1.gguf": str(gguf),
                                                                  "README.md": str(readme)}, refs=("main",))
    assert hub.resolve_model("testorg/tiny-GGUF", gguf_file="model-Q4_1.gguf") == os.path.join(snap, "model-Q4_1.gguf")
    with pytest.raises(FileNotFoundError, match=r"model-Q4_1\.gguf.*--gguf-file"):
        hub.resolve_model("testorg/tiny-GGUF")
    with pytest.raises(FileNotFoundError, match="other.gguf"):
        hub.resolve_model("testorg/tiny-GGUF", gguf_file="other.gguf")


def test_local_path_wins(offline_hub, llama_dir, tmp_path, monkeypatch):
    """A local directory named like an id is loaded as a directory; --revision needs a Hub id."""
    local = tmp_path / "work"
    os.makedirs(local / "org")
    os.symlink(llama_dir, local / "org" / "name")
    monkeypatch.chdir(local)
    assert hub.resolve_model("org/name") == "org/name"
    with pytest.raises(ValueError, match="revision"):
        hub.resolve_model("org/name", revision="main")


def test_cli_flags():
    from jaxserve.cli import _add_engine_args, _served_name

    p = argparse.ArgumentParser()
    _add_engine_args(p)
    args = p.parse_args(["--model", "Qwen/Qwen2.5-0.5B-Instruct-GGUF", "--revision", "v1",
                         "--gguf-file", "qwen2.5-0.5b-instruct-q4_0.gguf"])
    assert (args.model, args.revision, args.gguf_file) == ("Qwen/Qwen2.5-0.5B-Instruct-GGUF", "v1",
                                                           "qwen2.5-0.5b-instruct-q4_0.gguf")
    assert _served_name("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"
    assert _served_name("/some/dir/m56/") == "m56"


def test_huggingface_hub_is_a_dependency():
    import tomllib

    from conftest import ROOT

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        deps = tomllib.load(f)["project"]["dependencies"]
    assert any(d.split(">")[0].split("=")[0].strip() == "huggingface_hub" for d in deps), deps
