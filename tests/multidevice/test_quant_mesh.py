"""Int8 weights (jaxserve/quant.py) on a mesh of 8 virtual devices: the same tokens as one device, with the
int8 kernels and their scales sharded like today's tensor-parallel layout (KV heads replicated on a wide
'model' axis, scales included), quantized at load and restored from a quantized Orbax checkpoint."""

from __future__ import annotations

import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

from conftest import ENGINE_KW, greedy_tokens, random_prompts
from jaxserve import Engine

PROMPTS = random_prompts([5, 70, 17, 33, 9, 40], seed=7)
MAX_TOKENS = [10, 6, 12, 8, 9, 7]


def run(engine: Engine) -> list[list[int]]:
    return greedy_tokens(engine, PROMPTS, MAX_TOKENS)


@pytest.fixture(scope="module")
def one_device_tokens(gqa_dir):
    return run(Engine.from_pretrained(gqa_dir, quantization="int8", **ENGINE_KW))


def test_int8_on_mesh_gives_one_device_tokens(gqa_dir, one_device_tokens):
    # 2 KV heads on a model axis of 4: each KV head (and its qkv scales) replicated twice.
    engine = Engine.from_pretrained(gqa_dir, quantization="int8", mesh_shape={"data": 2, "model": 4}, **ENGINE_KW)
    layers = engine.runner.params["layers"]
    assert layers["qkv_proj"]["kernel"].dtype == jnp.int8
    assert layers["qkv_proj"]["kernel"].sharding.spec == P(None, None, "model", None, None)
    assert layers["qkv_proj"]["scale"].sharding.spec == P(None, "model", None, None)
    assert layers["qkv_proj"]["scale"].shape[1] == 4  # replicated KV heads
    assert layers["gate_up_proj"]["scale"].sharding.spec == P(None, None, "model")
    assert engine.runner.params["embed"]["scale"].sharding.spec == P("model")
    assert run(engine) == one_device_tokens


@pytest.mark.slow  # (~20 s; the quantized checkpoint restore is covered on one device by tests/test_quant.py)
def test_quantized_checkpoint_restores_sharded(gqa_dir, one_device_tokens, tmp_path):
    from jaxserve.checkpoint import convert

    ckpt = convert(gqa_dir, str(tmp_path / "q8"), dtype="float32", quantization="int8")
    engine = Engine.from_pretrained(ckpt, mesh_shape={"data": 1, "model": 8}, **ENGINE_KW)
    assert engine.quantization == "int8"
    assert engine.runner.params["lm_head"]["kernel"].dtype == jnp.int8
    assert run(engine) == one_device_tokens
