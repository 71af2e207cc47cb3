"""A whole decoder layer in one C++ call (``layer_impl``, ``csrc/layer_cpu/`` behind ``jax.ffi``): it is built
(a missing extension FAILS here, as the other CPU kernels' do); one layer equals the layer op by op with XLA's
dot and the reference attention (the pure-JAX path every kernel is tested against) on a ragged step (decode
rows, an empty decode slot, a new prompt, a prompt's later chunk, padding rows) over GQA groups 1-3, page
sizes 8 and 16 and float32 or bfloat16-held weights, writing the same K/V into the cache and nothing else;
``auto`` resolves to it only where it can serve and says why not elsewhere; and an engine with it gives the
op-by-op engine's greedy tokens with the same programs, running its steps op by op only where ``gemm_cpu`` would
take AMX (``serves_rows``).  (Greedy parity with Hugging Face: tests/test_hf_parity.py, whose engines use ``auto``,
i.e. this kernel.)
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import greedy_tokens, random_prompts

from jaxserve.config import ModelConfig
from jaxserve.model import AttentionMetadata, DecoderLayer, pack_linears, rope_tables
from kernels_pallas import layer_cpu


def test_extension_is_built():
    """Not a skip: without the extension the engine silently serves the layer op by op."""
    assert layer_cpu._load()[1] is None, layer_cpu._load()[1]


def _cfg(group: int, **kw) -> ModelConfig:
    base = dict(model_type="llama", vocab_size=64, hidden_size=64, intermediate_size=96, num_layers=2,
                num_heads=2 * group, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5, rope_theta=10000.0,
                rope_scaling=None, max_position_embeddings=512, tie_word_embeddings=False, attention_bias=False,
                qk_norm=False, sliding_window=None, bos_token_id=None, eos_token_ids=())
    base.update(kw)
    return ModelConfig(**base)


def _step(page_size: int, rng, chunks=((0, 7), (20, 11)), t: int = 32):
    """A ragged step of T = 32 rows: 4 decode slots (slot 2 empty), a new 7-token prompt, 11 rows of a prompt
    with 20 tokens cached, 10 padding rows (or other `chunks`: (tokens cached before, new rows), in `t` rows).
    Returns (metadata, positions, real rows, decode rows, pages)."""
    decode_ctx = [5, 17, 0, 40]  # kv lengths after this step's token (0: an empty slot)
    kv_lens = decode_ctx + [c + n for c, n in chunks]
    pages_per_seq = -(-max(64, *kv_lens) // page_size)
    num_pages = 6 * pages_per_seq + 3
    tables = rng.permutation(num_pages)[:6 * pages_per_seq].reshape(6, pages_per_seq).astype(np.int32)
    slots = np.full(t, num_pages * page_size, np.int32)  # out of range: dropped
    positions = np.zeros(t, np.int32)
    cu = [0, 1, 2, 3, 4]
    for s, n in enumerate(decode_ctx):
        if n:
            positions[s] = n - 1
            slots[s] = tables[s, (n - 1) // page_size] * page_size + (n - 1) % page_size
    row = 4
    for j, (cached, n) in enumerate(chunks):
        s = 4 + j
        for i in range(n):
            p = cached + i
            positions[row + i], slots[row + i] = p, tables[s, p // page_size] * page_size + p % page_size
        row += n
        cu.append(row)
    meta = AttentionMetadata(slot_mapping=jnp.asarray(slots), query_start_loc=jnp.asarray(cu, jnp.int32),
                             seq_lens=jnp.asarray(kv_lens, jnp.int32), block_tables=jnp.asarray(tables),
                             num_seqs=jnp.asarray(6, jnp.int32))
    return meta, jnp.asarray(positions), row, 4, num_pages


@pytest.mark.parametrize("group", [1, 2, 3])
@pytest.mark.parametrize("page_size", [8, 16])
@pytest.mark.parametrize("weights", ["float32", "bfloat16"])
def test_layer_equals_the_layer_op_by_op(group, page_size, weights):
    _check_layer(group, page_size, weights)


def test_a_long_prompt_chunk_equals_the_layer_op_by_op():
    """160 rows (a 110-row prompt chunk): the matmul phases' items are cut by rows too (gemm_cpu.cc Split)."""
    _check_layer(2, 16, "float32", chunks=((0, 7), (20, 110)), t=160)


def _check_layer(group, page_size, weights, chunks=((0, 7), (20, 11)), t=32):
    cfg = _cfg(group)
    rng = np.random.default_rng(group * 100 + page_size)
    meta, positions, real, decode_rows, num_pages = _step(page_size, rng, chunks, t)
    h = cfg.hidden_size
    ref_layer = DecoderLayer(cfg, jnp.float32, "reference", decode_rows)
    x = jnp.asarray(rng.standard_normal((t, h)), jnp.float32)
    cache = jnp.asarray(rng.standard_normal((2, cfg.num_kv_heads, num_pages, page_size, 2 * cfg.head_dim)),
                        jnp.float32)  # the context's K/V: whatever is in the pages
    cos, sin = rope_tables(cfg, positions)
    params = ref_layer.init(jax.random.PRNGKey(group), (x, cache), 1, cos, sin, meta)["params"]
    params = jax.tree_util.tree_map(lambda a: a + 0.01 * jnp.asarray(rng.standard_normal(a.shape), a.dtype), params)
    if weights == "bfloat16":  # values bf16 holds exactly: pack_linears keeps them in bf16 (half the bytes)
        params = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16).astype(jnp.float32), params)
    (want, want_cache), _ = ref_layer.apply({"params": params}, (x, cache), 1, cos, sin, meta)
    packed = pack_linears({"layers_1": params})["layers_1"]
    assert packed["down_proj"]["packed_kernel"].dtype == weights
    got, got_cache = jax.jit(_fused_layer(cfg))(x, packed, cos, sin, cache, meta, jnp.asarray(real, jnp.int32))
    np.testing.assert_allclose(np.asarray(got[:real]), np.asarray(want[:real]), rtol=2e-5, atol=2e-5)
    # padding rows pass through (the op-by-op CPU path's zero matmul rows add nothing to them)
    np.testing.assert_array_equal(np.asarray(got[real:]), np.asarray(x[real:]))
    np.testing.assert_allclose(np.asarray(got_cache), np.asarray(want_cache), rtol=2e-5, atol=2e-5)
    written = np.asarray(got_cache != cache).any(axis=-1)  # [L, Hkv, pages, page_size]
    expect = np.zeros_like(written)
    for s in np.asarray(meta.slot_mapping)[:real]:
        if s < num_pages * page_size:
            expect[1, :, s // page_size, s % page_size] = True
    np.testing.assert_array_equal(written, expect)  # this layer's new tokens' slots, and no other entry


def _fused_layer(cfg):
    def run(x, params, cos, sin, cache, meta, rows):
        return layer_cpu.decoder_layer_cpu(
            x, params, cos, sin, cache, 1, meta.slot_mapping, meta.seq_lens, meta.block_tables,
            meta.query_start_loc, meta.num_seqs, rows, num_heads=cfg.num_heads,
            intermediate_size=cfg.intermediate_size, eps=cfg.rms_norm_eps, sm_scale=cfg.attn_scale)
    return run


def test_no_rows_leaves_everything_as_it_was():
    cfg = _cfg(2)
    rng = np.random.default_rng(0)
    meta, positions, _, decode_rows, num_pages = _step(16, rng)
    x = jnp.asarray(rng.standard_normal((32, cfg.hidden_size)), jnp.float32)
    cache = jnp.asarray(rng.standard_normal((2, 2, num_pages, 16, 32)), jnp.float32)
    cos, sin = rope_tables(cfg, positions)
    params = DecoderLayer(cfg, jnp.float32, "reference", decode_rows).init(
        jax.random.PRNGKey(0), (x, cache), 1, cos, sin, meta)["params"]
    packed = pack_linears({"layers_1": params})["layers_1"]
    got, got_cache = jax.jit(_fused_layer(cfg))(x, packed, cos, sin, cache, meta, jnp.asarray(0, jnp.int32))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(x))
    np.testing.assert_array_equal(np.asarray(got_cache), np.asarray(cache))


def test_resolve_layer():
    llama = _cfg(2)
    ok = dict(matmul_impl="cpu", attention_impl="cpu", kv_dtype=np.float32)
    assert layer_cpu.resolve_layer("auto", llama, **ok) == "fused"
    assert layer_cpu.resolve_layer("fused", llama, **ok) == "fused"
    assert layer_cpu.resolve_layer("ops", llama, **ok) == "ops"
    cases = [(dict(matmul_impl="xla"), llama, "matmul_impl"), (dict(attention_impl="reference"), llama, "attention_impl"),
             (dict(kv_dtype=jnp.bfloat16), llama, "KV cache is bfloat16"),
             (dict(quantization="int8"), llama, "quantized"), (dict(layer_loop="scan"), llama, "scan loop"),
             ({}, _cfg(2, qk_norm=True), "q/k norms"), ({}, _cfg(2, attention_bias=True), "attention biases"),
             ({}, _cfg(2, sliding_window=8), "sliding window"), ({}, _cfg(2, hidden_act="gelu_pytorch_tanh"),
                                                                 "activation")]
    for change, cfg, why in cases:
        kw = {**ok, **change}
        assert layer_cpu.resolve_layer("auto", cfg, **kw) == "ops"
        with pytest.raises(ValueError, match=f"layer_impl: the fused CPU layer cannot serve: .*{why}"):
            layer_cpu.resolve_layer("fused", cfg, **kw)
    with pytest.raises(ValueError, match="layer_impl: must be one of"):
        layer_cpu.resolve_layer("fast", llama, **ok)


def test_engine_config_rejects_unknown_layer_impl(llama_dir):
    from jaxserve import Engine

    with pytest.raises(ValueError, match="layer_impl"):
        Engine.from_pretrained(llama_dir, layer_impl="one_call")


@pytest.mark.parametrize("scheduling", ["continuous", "static"])
def test_engine_tokens_equal_the_op_by_op_engine_and_programs_per_bucket(llama_dir, scheduling):
    """Greedy tokens with the fused layer equal those op by op over decode and mixed buckets (prompts of
    several chunks, more requests than slots; static batching's fixed-shape decode steps), and it adds no
    program."""
    from jaxserve import Engine

    lengths = [3, 90, 17, 40, 64, 5, 33, 71, 9, 50]
    prompts = random_prompts(lengths, seed=5)
    tokens, compiles = {}, {}
    for impl in ("fused", "ops"):
        engine = Engine.from_pretrained(llama_dir, max_num_seqs=6, max_model_len=256, max_num_batched_tokens=64,
                                        layer_impl=impl, scheduling=scheduling)
        assert engine.runner.layer_impl == impl
        tokens[impl] = greedy_tokens(engine, prompts, max_tokens=[12] * len(prompts))
        compiles[impl] = engine.runner.compile_count
        assert compiles[impl] <= engine.runner.num_buckets
    assert tokens["fused"] == tokens["ops"]
    assert compiles["fused"] == compiles["ops"]


def test_auto_picks_the_fused_layer_for_a_llama_on_this_cpu(llama_dir):
    from jaxserve import Engine

    engine = Engine.from_pretrained(llama_dir, max_num_seqs=2, max_model_len=64)
    assert engine.runner.layer_impl == "fused"  # with AMX too: steps of fewer than AMX_MIN_ROWS rows (serves_rows)
    assert dataclasses.asdict(engine.config)["layer_impl"] == "auto"


@pytest.mark.parametrize("amx", [True, False])
def test_steps_that_gemm_cpu_runs_on_amx_go_op_by_op(llama_dir, monkeypatch, amx):
    """On a CPU with AMX (reported to the Python side here: the kernels' own choice follows the CPU), a bucket
    of AMX_MIN_ROWS rows or more runs its layers op by op, where gemm_cpu takes AMX, and the smaller ones in
    the fused kernel; without AMX every bucket is fused.  (float32 weights: from 112 rows; bfloat16: from 16.)"""
    from jaxserve import Engine
    from kernels_pallas import gemm_cpu

    isas = [i for i in gemm_cpu.available_isas() if i != "amx"]
    monkeypatch.setattr(gemm_cpu, "available_isas", lambda: (["amx"] if amx else []) + isas)
    engine = Engine.from_pretrained(llama_dir, max_num_seqs=4, max_model_len=256, max_num_batched_tokens=128,
                                    layer_impl="fused")
    runner = engine.runner
    big = gemm_cpu.AMX_MIN_ROWS["float32"]
    keys = [(4, 0), (4, 64), (0, 128), (4, 128)]  # 4, 68, 128 and 132 rows
    for key in keys:
        text = runner._lower(key, runner._bucket_inputs(key)).as_text()
        fused = text.count(layer_cpu.TARGET)
        rows = key[0] + key[1]
        assert fused == (0 if amx and rows >= big else runner.model_cfg.num_layers - (key[1] > 0)), (key, fused)
    layers = [runner.params[f"layers_{i}"] for i in range(runner.model_cfg.num_layers)]
    assert layer_cpu.serves_rows(big - 1, layers) and layer_cpu.serves_rows(big, layers) == (not amx)
    bf16 = [jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), layer) for layer in layers]
    assert layer_cpu.serves_rows(15, bf16) and layer_cpu.serves_rows(16, bf16) == (not amx)
