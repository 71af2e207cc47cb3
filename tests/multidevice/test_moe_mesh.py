"""Mixture of experts on a mesh: experts split over the 'model' axis (expert parallelism) give the
single-device tokens on 1x1, 1x2 and 1x4 meshes, with each device holding only its E/M experts."""

from __future__ import annotations

import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from conftest import ENGINE_KW, greedy_tokens, random_prompts
from jaxserve import Engine

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

PROMPTS = random_prompts([5, 70, 17, 33, 9, 120], seed=4)
MAX_TOKENS = [12, 8, 16, 10, 14, 6]
LAYERS, HIDDEN, EXPERTS, MOE_I, HEADS, KV_HEADS, HEAD_DIM = 2, 64, 8, 32, 8, 4, 8


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    cfg = transformers.AutoConfig.for_model(
        "qwen3_moe", hidden_size=HIDDEN, intermediate_size=128, moe_intermediate_size=MOE_I,
        num_experts=EXPERTS, num_experts_per_tok=2, norm_topk_prob=True, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM, vocab_size=1024,
        max_position_embeddings=2048, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    d = str(tmp_path_factory.mktemp("qwen3_moe"))
    model.save_pretrained(d)
    return d


def run(engine: Engine) -> list[list[int]]:
    return greedy_tokens(engine, PROMPTS, MAX_TOKENS)


@pytest.fixture(scope="module")
def single_device_tokens(moe_dir):
    return run(Engine.from_pretrained(moe_dir, **ENGINE_KW))


def shard_shape(x):
    shapes = {s.data.shape for s in x.addressable_shards}
    assert len(shapes) == 1
    return shapes.pop()


@pytest.mark.parametrize("model", [1, 2, 4])
def test_experts_sharded_give_single_device_tokens(moe_dir, single_device_tokens, model):
    engine = Engine.from_pretrained(moe_dir, mesh_shape={"data": 1, "model": model}, **ENGINE_KW)
    moe = engine.runner.params["layers"]["moe"]
    gate_up, down, router = moe["gate_up"], moe["down"], moe["router"]["kernel"]
    assert isinstance(gate_up.sharding, NamedSharding)
    assert gate_up.sharding.spec == P(None, "model", None, None, None)
    assert shard_shape(gate_up) == (LAYERS, EXPERTS // model, HIDDEN, 2, MOE_I)  # E/M whole experts
    assert shard_shape(down) == (LAYERS, EXPERTS // model, MOE_I, HIDDEN)
    assert router.sharding.is_fully_replicated and router.shape == (LAYERS, HIDDEN, EXPERTS)
    assert run(engine) == single_device_tokens


def test_orbax_checkpoint_restores_into_the_expert_sharding(moe_dir, single_device_tokens, tmp_path):
    """``jaxserve convert`` stores the stacked experts; a restore onto a 1x4 mesh reads each device's
    E/4 experts straight into their shards and gives the same tokens."""
    from jaxserve.checkpoint import convert

    ckpt = convert(moe_dir, str(tmp_path / "moe"), dtype="float32")
    engine = Engine.from_pretrained(ckpt, mesh_shape={"data": 1, "model": 4}, **ENGINE_KW)
    gate_up = engine.runner.params["layers"]["moe"]["gate_up"]
    assert gate_up.sharding.spec == P(None, "model", None, None, None)
    assert shard_shape(gate_up) == (LAYERS, EXPERTS // 4, HIDDEN, 2, MOE_I)
    assert run(engine) == single_device_tokens
