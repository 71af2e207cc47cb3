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


@pytest.mark.slow  # (~56 s on the shared 2-core machine: two engines of a 256-wide model)
def test_gguf_blocks_on_mesh_give_one_device_tokens(tmp_path):
    """A GGUF file kept in blocks (quantization="gguf", tests/test_gguf_quant.py's per-tensor mix: group scales
    of 32 and 16, zero points, a dense down_proj) on a 2x4 mesh: its scales and zero points split like their
    kernels (o_proj's on its 16 input groups), the KV heads' replicated with them; the one-device tokens."""
    import numpy as np
    from test_gguf import write_gguf
    from test_gguf_quant import SIZES, blocks, mixed

    from jaxserve.make_model import hf_config, random_hf_tensors

    cfg = hf_config("llama", "tiny", **SIZES)
    path = write_gguf(str(tmp_path / "mixed.gguf"), "llama", cfg, random_hf_tensors(cfg, seed=5), qtype=mixed,
                      quantize=blocks)
    kw = dict(ENGINE_KW, max_num_seqs=2, max_num_batched_tokens=32, min_prefill_bucket=32)
    prompts, max_tokens = PROMPTS[:4], [6, 4, 7, 5]
    expected = greedy_tokens(Engine.from_pretrained(path, quantization="gguf", **kw), prompts, max_tokens)
    engine = Engine.from_pretrained(path, quantization="gguf", mesh_shape={"data": 2, "model": 4}, **kw)
    layers = engine.runner.params["layers"]
    assert layers["qkv_proj"]["kernel"].dtype == jnp.int8 and layers["down_proj"]["kernel"].dtype == np.float32
    assert layers["qkv_proj"]["scale"].sharding.spec == P(None, None, "model", None, None)
    assert layers["qkv_proj"]["zero"].shape[2] == 4  # 2 KV heads replicated on a model axis of 4
    assert layers["o_proj"]["scale"].sharding.spec == P(None, "model", None)
    assert greedy_tokens(engine, prompts, max_tokens) == expected
