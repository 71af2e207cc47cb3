"""Orbax checkpoints of converted weights: round trip, and restore straight into a mesh's sharding."""

from __future__ import annotations

import json
import os

import jax
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from conftest import ENGINE_KW, assert_clean, greedy, greedy_tokens, random_prompts
from jaxserve import Engine, ModelConfig
from jaxserve.checkpoint import MARKER, convert, restore_params, restore_targets, stored_shapes
from jaxserve.cli import main as cli_main
from jaxserve.model import pack_linears, unstack_layers
from jaxserve.sharding import MODEL, make_mesh, param_specs, replicate_kv_heads
from jaxserve.weights import load_params

PROMPTS = random_prompts([6, 70, 21, 40, 11], seed=5)
MAX_TOKENS = [10, 6, 12, 8, 9]


def run(engine: Engine) -> list[list[int]]:
    return greedy_tokens(engine, PROMPTS, MAX_TOKENS)


def flat(tree) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def assert_same_params(a, b) -> None:
    fa, fb = flat(a), flat(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        assert fa[k].dtype == fb[k].dtype and fa[k].shape == fb[k].shape, k
        np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


@pytest.fixture(scope="module")
def mha_ckpt(mha_dir, tmp_path_factory):
    return convert(mha_dir, str(tmp_path_factory.mktemp("ckpt") / "mha"), dtype="float32")


@pytest.fixture(scope="module")
def hf_engine(mha_dir):
    """Single-device engine on the Hugging Face checkpoint: the reference."""
    return Engine.from_pretrained(mha_dir, **ENGINE_KW)


@pytest.fixture(scope="module")
def mha_tokens(hf_engine):
    return run(hf_engine)


def test_round_trip_identical_weights_and_tokens(mha_dir, mha_ckpt, mha_tokens):
    names = set(os.listdir(mha_ckpt))
    assert {MARKER, "config.json", "tokenizer.json", "params"} <= names
    assert not any(n.endswith(".safetensors") for n in names)
    engine = Engine.from_pretrained(mha_ckpt, **ENGINE_KW)
    cfg = ModelConfig.from_dir(mha_dir)
    assert engine.model_config == cfg
    expected = load_params(mha_dir, cfg, np.float32)
    if engine.runner.layer_loop == "switch":  # one CPU device: per-layer weight buffers (model.resolve_layer_loop)
        expected = unstack_layers(expected, cfg.num_layers)
    if engine.runner.matmul_impl == "cpu":  # the CPU matmul kernel's weights, packed once at load
        expected = pack_linears(expected, greedy_head=engine.runner.greedy_head)
    assert_same_params(engine.runner.params, expected)
    assert run(engine) == mha_tokens
    assert engine.tokenizer is not None and engine.generate("Hello", greedy(4))[0].text is not None
    assert_clean(engine)


def test_restore_into_mesh_reads_only_each_devices_shards(mha_dir, mha_ckpt, mha_tokens):
    cfg = ModelConfig.from_dir(mha_ckpt)
    mesh = make_mesh({"data": 2, "model": 4})
    targets = restore_targets(mha_ckpt, cfg, np.float32, mesh)
    specs = param_specs(cfg, 4)
    flat_specs = {jax.tree_util.keystr(k): v for k, v in
                  jax.tree_util.tree_leaves_with_path(specs, is_leaf=lambda x: isinstance(x, P))}
    sharded = 0
    for key, target in jax.tree_util.tree_leaves_with_path(targets):
        key = jax.tree_util.keystr(key)
        # Orbax is told the final sharding of every weight: each device reads its slice only.
        assert isinstance(target.sharding, NamedSharding) and target.sharding.mesh == mesh, key
        assert target.sharding.spec == flat_specs[key], key
        if MODEL in tuple(target.sharding.spec):
            sharded += 1
            assert target.sharding.shard_shape(target.shape) != target.shape, key
    assert sharded == 2 + 4  # embedding, lm_head, the 4 stacked layer kernels

    params = restore_params(mha_ckpt, cfg, np.float32, mesh)
    total = sum(x.nbytes for x in jax.tree_util.tree_leaves(params))
    per_device: dict = {}
    for x, target in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(targets)):
        assert x.sharding == target.sharding  # restored as asked, no re-layout afterwards
        for shard in x.addressable_shards:
            per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
    assert len(per_device) == 8
    # No device holds the whole model: each holds its quarter of the sharded weights + the norms.
    assert max(per_device.values()) < total / 3
    assert_same_params(params, load_params(mha_dir, cfg, np.float32))

    engine = Engine.from_pretrained(mha_ckpt, mesh_shape={"data": 2, "model": 4}, **ENGINE_KW)
    assert engine.runner.params["layers"]["down_proj"]["kernel"].sharding.spec == P(None, "model", None)
    assert run(engine) == mha_tokens


def test_restore_with_kv_head_replication(gqa_dir, tmp_path):
    ckpt = convert(gqa_dir, str(tmp_path / "gqa"), dtype="float32")
    cfg = ModelConfig.from_dir(gqa_dir)
    # The stored qkv (2 KV heads) cannot split 8 ways on its heads: it is restored split on the
    # hidden axis, then re-laid out on the mesh into 8 replicated KV heads, one per device.
    targets = restore_targets(ckpt, cfg, np.float32, make_mesh({"model": 8}))
    assert targets["layers"]["qkv_proj"]["kernel"].sharding.spec == P(None, MODEL, None, None, None)
    engine = Engine.from_pretrained(ckpt, mesh_shape={"model": 8}, **ENGINE_KW)
    qkv = engine.runner.params["layers"]["qkv_proj"]["kernel"]
    assert qkv.shape == (cfg.num_layers, 64, 8, 3, 8) and qkv.sharding.spec == P(None, None, MODEL, None, None)
    expected = replicate_kv_heads(load_params(gqa_dir, cfg, np.float32), cfg, 4)
    assert_same_params(engine.runner.params, expected)
    assert run(engine) == run(Engine.from_pretrained(gqa_dir, **ENGINE_KW))


def test_cli_convert_bfloat16(gqa_dir, tmp_path):
    out = str(tmp_path / "bf16")
    assert cli_main(["convert", "--model", gqa_dir, "--out", out, "--dtype", "bfloat16"]) == 0
    with open(os.path.join(out, MARKER)) as f:
        assert json.load(f)["dtype"] == "bfloat16"
    assert {dt for _, dt in jax.tree_util.tree_leaves(stored_shapes(out), is_leaf=lambda x: isinstance(x, tuple))} \
        == {np.dtype(ml_dtypes.bfloat16)}
    cfg = ModelConfig.from_dir(out)
    restored = restore_params(out, cfg, ml_dtypes.bfloat16)
    assert_same_params(restored, load_params(gqa_dir, cfg, ml_dtypes.bfloat16))
    assert cli_main(["convert", "--model", gqa_dir, "--out", out]) == 2  # refuses to overwrite


def test_cli_generate_from_checkpoint_on_mesh(mha_ckpt, hf_engine, capsys):
    expected = hf_engine.generate([[1, 5, 9]], greedy(5))[0]  # the checkpoint has a tokenizer: text
    assert_clean(hf_engine)
    assert len(expected.token_ids) == 5 and expected.text
    capsys.readouterr()
    rc = cli_main(["generate", "--model", mha_ckpt, "--mesh-data", "2", "--mesh-model", "4", "--prompt-ids", "1,5,9",
                   "--max-tokens", "5", "--ignore-eos", "--max-num-seqs", "4", "--page-size", "8",
                   "--max-model-len", "256", "--max-num-batched-tokens", "64"])
    assert rc == 0
    assert capsys.readouterr().out == expected.text + "\n"
