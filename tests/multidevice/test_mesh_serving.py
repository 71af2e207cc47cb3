"""Serving on a (data, model) mesh of 8 virtual devices gives the single-device engine's tokens,
with the weights and the KV cache really sharded (with data > 1: each data group its own pages)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from conftest import ENGINE_KW, greedy_tokens, random_prompts
from jaxserve import Engine, ModelConfig
from jaxserve.sharding import CACHE_SPEC, cache_spec, kv_replication, make_mesh

# Six requests on four slots (some wait), one prompt chunked over two steps.
PROMPTS = random_prompts([5, 70, 17, 33, 9, 120], seed=3)
MAX_TOKENS = [12, 8, 16, 10, 14, 6]
MESHES = [(1, 8), (8, 1)]  # data 2 x model 4: test_data_parallel_attention_groups_own_their_pages
HIDDEN, INTERMEDIATE, VOCAB, HEAD_DIM, LAYERS = 64, 176, 1024, 8, 2  # the "tiny" size with 8 heads


def run(engine: Engine) -> list[list[int]]:
    return greedy_tokens(engine, PROMPTS, MAX_TOKENS)


@pytest.fixture(scope="module")
def mha_tokens(mha_dir):
    return run(Engine.from_pretrained(mha_dir, **ENGINE_KW))


@pytest.fixture(scope="module")
def gqa_tokens(gqa_dir):
    return run(Engine.from_pretrained(gqa_dir, **ENGINE_KW))


def shard_shape(x) -> tuple[int, ...]:
    shapes = {s.data.shape for s in x.addressable_shards}
    assert len(shapes) == 1
    return shapes.pop()


@pytest.mark.parametrize("data,model", MESHES, ids=[f"{d}x{m}" for d, m in MESHES])
def test_mesh_gives_single_device_tokens(mha_dir, mha_tokens, data, model):
    kw = dict(ENGINE_KW, max_num_seqs=max(ENGINE_KW["max_num_seqs"], data))  # a slot per data group at least
    engine = Engine.from_pretrained(mha_dir, mesh_shape={"data": data, "model": model}, **kw)
    cspec = cache_spec(engine.mesh)  # KV heads on "model"; with data > 1, pages on "data"
    assert cspec == (CACHE_SPEC if data == 1 else P(None, "model", "data", None, None))
    assert dict(engine.mesh.shape) == {"data": data, "model": model}
    params = engine.runner.params
    layer = params["layers"]
    nl = LAYERS
    expect = {
        # tensor parallel on "model": heads (whole GQA groups), MLP intermediate, vocabulary; the
        # leading (scanned) layer axis is never split
        ("layers", "qkv_proj"): (P(None, None, "model", None, None), (nl, HIDDEN, 8 // model, 3, HEAD_DIM)),
        ("layers", "o_proj"): (P(None, "model", None), (nl, 8 * HEAD_DIM // model, HIDDEN)),
        ("layers", "gate_up_proj"): (P(None, None, None, "model"), (nl, HIDDEN, 2, INTERMEDIATE // model)),
        ("layers", "down_proj"): (P(None, "model", None), (nl, INTERMEDIATE // model, HIDDEN)),
        ("embed",): (P("model", None), (VOCAB // model, HIDDEN)),
        ("lm_head",): (P(None, "model"), (HIDDEN, VOCAB // model)),
    }
    for path, (spec, local_shape) in expect.items():
        leaf = params[path[0]][path[1]] if len(path) == 2 else params[path[0]]
        array = next(iter(leaf.values()))
        assert isinstance(array.sharding, NamedSharding) and array.sharding.mesh == engine.mesh, path
        assert array.sharding.spec == spec, path
        assert shard_shape(array) == local_shape, path
        assert len(array.sharding.device_set) == 8
    assert layer["input_norm"]["scale"].sharding.is_fully_replicated

    def check_cache():
        cache = engine.runner.cache  # [layers, kv heads, pages, page size, 2 * head_dim]
        assert cache.sharding.spec == cspec
        assert shard_shape(cache) == (nl, 8 // model, engine.num_pages // data, 8, 2 * HEAD_DIM)

    check_cache()
    assert run(engine) == mha_tokens
    check_cache()  # the step's out_shardings keep the donated cache in place, sharded by KV heads

    # Every compiled step declares its shardings: the weights and cache as placed, sampled tokens
    # (from the gathered logits) replicated on every device.
    assert engine.compile_count > 0
    for exe in engine.runner._executables.values():
        params_in, cache_in = exe.input_shardings[0][:2]  # (params, cache, step inputs, penalty state)
        assert params_in["layers"]["qkv_proj"]["kernel"].spec == P(None, None, "model", None, None)
        assert cache_in.spec == cspec
        cache_out, tokens_out = exe.output_shardings[:2]
        assert cache_out.spec == cspec
        assert tokens_out.is_fully_replicated


@pytest.mark.parametrize("model", [4, 8])
def test_gqa_kv_heads_replicated_on_wide_model_axis(gqa_dir, gqa_tokens, model):
    engine = Engine.from_pretrained(gqa_dir, mesh_shape={"data": 8 // model, "model": model}, **ENGINE_KW)
    assert engine.model_config.num_kv_heads == 2
    assert engine.run_config.num_kv_heads == model  # each of the 2 KV heads copied model/2 times
    qkv = engine.runner.params["layers"]["qkv_proj"]["kernel"]
    assert shard_shape(qkv) == (LAYERS, HIDDEN, 1, 8 // model + 2, HEAD_DIM)  # one KV head and its queries
    assert shard_shape(engine.runner.cache) == (LAYERS, 1, engine.num_pages // (8 // model), 8, 2 * HEAD_DIM)
    assert run(engine) == gqa_tokens


def test_heads_not_divisible_is_a_clear_error(model_factory):
    tiny = model_factory("llama")  # 4 query heads, 2 KV heads
    with pytest.raises(ValueError, match=r"num_attention_heads \(4\) must be divisible by the 'model' axis \(8\)"):
        Engine.from_pretrained(tiny, mesh_shape={"model": 8}, **ENGINE_KW)
    cfg = ModelConfig.from_dir(tiny)
    odd = dataclasses.replace(cfg, num_heads=12, num_kv_heads=3)
    with pytest.raises(ValueError, match=r"num_key_value_heads \(3\) must divide, or be a multiple of"):
        kv_replication(odd, 4)
    assert kv_replication(cfg, 2) == 1 and kv_replication(cfg, 4) == 2


def test_bad_mesh_shapes(mha_dir):
    with pytest.raises(ValueError, match="needs 16 devices, 8 available"):
        make_mesh({"data": 4, "model": 4})
    with pytest.raises(ValueError, match="unknown axis 'tensor'"):
        Engine.from_pretrained(mha_dir, mesh_shape={"tensor": 2}, **ENGINE_KW)
    with pytest.raises(ValueError, match="'model' must be a positive integer"):
        Engine.from_pretrained(mha_dir, mesh_shape={"model": 0}, **ENGINE_KW)


def test_rows_split_on_data_axis(mha_dir):
    engine = Engine.from_pretrained(mha_dir, mesh_shape={"data": 2, "model": 4}, **ENGINE_KW)
    engine.runner.warmup([(4, 64)])
    exe = engine.runner._executables[(4, 64)]
    inputs = exe.input_shardings[0][2]
    assert inputs.input_ids.spec == P("data") and inputs.positions.spec == P("data")  # 2 blocks of 2 + 32 rows
    # data-parallel attention: each group's page tables (local page ids), lengths and row offsets
    assert inputs.meta.block_tables.spec == P("data") and inputs.meta.query_start_loc.spec == P("data")
    assert inputs.sampling.temperature.is_fully_replicated


@pytest.mark.slow  # two more engines to compile: 145 s on the shared 2-core machine
def test_int8_kv_cache_on_the_mesh(mha_dir):
    """An int8 KV cache (the (kv, scales) pair, jaxserve/kv_cache.py) on a 2 x 4 mesh: both arrays split on
    KV heads, and the tokens of the single-device int8 engine."""
    one = run(Engine.from_pretrained(mha_dir, kv_cache_dtype="int8", **ENGINE_KW))
    engine = Engine.from_pretrained(mha_dir, kv_cache_dtype="int8", mesh_shape={"data": 2, "model": 4}, **ENGINE_KW)
    assert run(engine) == one
    kv, scales = engine.runner.cache
    assert kv.dtype == "int8" and scales.dtype == "float32"
    assert kv.sharding.spec == scales.sharding.spec == P(None, "model", "data", None, None)
    assert shard_shape(kv) == (LAYERS, 2, engine.num_pages // 2, 8, 2 * HEAD_DIM)
    assert shard_shape(scales) == (LAYERS, 2, engine.num_pages // 2, 8, 2)


def test_data_parallel_attention_groups_own_their_pages(mha_dir, mha_tokens):
    """data 2 x model 4 with data-parallel attention: each data group's devices hold only its half of the
    pages, every sequence's pages come from its group's half, both groups serve, a group short of pages
    preempts its own sequences, and the tokens are the single device's."""
    engine = Engine.from_pretrained(mha_dir, mesh_shape={"data": 2, "model": 4}, **dict(ENGINE_KW, num_pages=32))
    half = 16
    cache = engine.runner.cache
    assert shard_shape(cache) == (LAYERS, 2, half, 8, 2 * HEAD_DIM)  # [layers, KV heads / 4, pages / 2, ...]
    grid = engine.mesh.devices  # [data, model]
    for shard in cache.addressable_shards:
        group = int(np.argwhere(grid == shard.device)[0][0])
        assert shard.index[2] == slice(group * half, (group + 1) * half)
    scheduled = []  # (group, pages) of every scheduled sequence, as the step saw them
    schedule = engine.scheduler.schedule

    def recording_schedule():
        out = schedule()
        scheduled.extend((s.seq.data_group, list(s.seq.page_ids)) for s in out.decodes + out.prefills)
        return out

    engine.scheduler.schedule = recording_schedule
    assert run(engine) == mha_tokens
    assert {g for g, _ in scheduled} == {0, 1}
    assert all(p // half == g for g, pages in scheduled for p in pages)
    assert engine.scheduler.num_preemptions > 0  # the 120-token prompt needs its group's 16 pages
    assert engine.allocator.free_in(0) == engine.allocator.free_in(1) == half
    assert engine.runner.compile_count <= engine.runner.num_buckets  # no program beyond the bucket set
