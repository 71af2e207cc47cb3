"""Weight-only int8 (``jaxserve/quant.py``): the quantized layers against the dequantized reference, the
engine with int8 weights against the engine running the same weights dequantized to float32, a
quantized Orbax checkpoint, GGUF tensors loaded as int8, and the errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ENGINE_KW, greedy_tokens, random_prompts
from jaxserve import Engine, EngineConfig, ModelConfig
from jaxserve.model import linear
from jaxserve.quant import (QuantEmbed, dequantize, dequantize_params, is_quantized, quantize_int8,
                            quantize_params)
from jaxserve.weights import load_params

# Six requests on four slots (two wait for a slot to free), one prompt prefilled in two chunks.
PROMPTS = random_prompts([5, 70, 17, 33, 9, 40], seed=11)
MAX_TOKENS = [12, 8, 16, 10, 14, 6]


def run(engine: Engine) -> list[list[int]]:
    return greedy_tokens(engine, PROMPTS, MAX_TOKENS)


@pytest.fixture(scope="module")
def f32_params(llama_dir):
    return load_params(llama_dir, ModelConfig.from_dir(llama_dir), np.float32)


def test_quantize_int8_error_bound():
    w = np.random.default_rng(0).standard_normal((64, 3, 40)).astype(np.float32)
    w[:, 1, 7] = 0.0  # an all-zero output channel
    q, scale = quantize_int8(w, in_axes=(0,))
    assert q.dtype == np.int8 and q.shape == w.shape and scale.shape == (3, 40)
    assert np.abs(q).max() == 127 and scale[1, 7] == 1.0 and not q[:, 1, 7].any()
    err = np.abs(dequantize(q, scale, (0,)) - w)
    assert np.all(err <= scale[None] / 2 + 1e-7)  # round to nearest: half a step per channel


# Each layer type with its kernel layout [in, *out]: fused qkv (with bias), o_proj, gate_up, down, LM head.
LAYERS = {"qkv_proj": ((2, 4, 16), True), "o_proj": (64, False), "gate_up_proj": ((2, 176), False),
          "down_proj": (64, False), "lm_head": (1024, False)}


@pytest.mark.parametrize("name", list(LAYERS))
def test_int8_linear_matches_dequantized_reference(name):
    features, bias = LAYERS[name]
    rng = np.random.default_rng(1)
    fan_in = 176 if name == "down_proj" else 64
    out_shape = (features,) if isinstance(features, int) else features
    w = rng.standard_normal((fan_in, *out_shape)).astype(np.float32) * 0.02
    x = jnp.asarray(rng.standard_normal((7, fan_in)).astype(np.float32))
    q, scale = quantize_int8(w, in_axes=(0,))
    params = {"kernel": q, "scale": scale}
    if bias:
        params["bias"] = rng.standard_normal(out_shape).astype(np.float32)
    y = linear(features, "int8", jnp.float32, use_bias=bias).apply({"params": params}, x)
    ref = jnp.tensordot(x, dequantize(q, scale, (0,)), axes=1) + (params["bias"] if bias else 0)
    assert y.shape == (7, *out_shape) and y.dtype == jnp.float32
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-6)
    # ... and within int8's error of the full-precision layer
    full = jnp.tensordot(x, w, axes=1) + (params["bias"] if bias else 0)
    np.testing.assert_allclose(y, full, atol=float(np.abs(np.asarray(x)).sum(1).max() * scale.max() / 2))


@pytest.mark.parametrize("name", ["qkv_proj", "lm_head"])
def test_w8a8_linear_matches_integer_reference(name):
    """quantization="w8a8": each input row quantized to int8 (scale max|row| / 127), an exact integer
    matmul, then the row and channel scales: as numpy computes it in int64."""
    features, bias = LAYERS[name]
    rng = np.random.default_rng(3)
    out_shape = (features,) if isinstance(features, int) else features
    w = rng.standard_normal((64, *out_shape)).astype(np.float32) * 0.02
    x = rng.standard_normal((5, 64)).astype(np.float32)
    x[2] = 0.0  # a zero row
    q, scale = quantize_int8(w, in_axes=(0,))
    params = {"kernel": q, "scale": scale}
    if bias:
        params["bias"] = rng.standard_normal(out_shape).astype(np.float32)
    y = linear(features, "w8a8", jnp.float32, use_bias=bias).apply({"params": params}, jnp.asarray(x))
    xs = np.abs(x).max(1, keepdims=True) / 127
    xs[xs == 0] = 1
    xq = np.clip(np.rint(x / xs), -127, 127).astype(np.int64)
    acc = np.tensordot(xq, q.astype(np.int64), axes=1)  # exact
    ref = acc * xs.reshape(5, *([1] * len(out_shape))) * scale + (params["bias"] if bias else 0)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-6)
    assert not np.asarray(y[2] - (params["bias"] if bias else 0)).any()


def test_int8_embedding_and_tied_head_match_dequantized_reference():
    rng = np.random.default_rng(2)
    table = rng.standard_normal((1024, 64)).astype(np.float32)
    q, scale = quantize_int8(table, in_axes=(1,))  # one scale per vocabulary row
    module = QuantEmbed(1024, 64)
    ids = jnp.asarray([0, 5, 1023, 5])
    deq = dequantize(q, scale, (1,))
    np.testing.assert_allclose(module.apply({"params": {"embedding": q, "scale": scale}}, ids), deq[ids],
                               rtol=1e-6)
    x = jnp.asarray(rng.standard_normal((3, 64)).astype(np.float32))
    logits = module.apply({"params": {"embedding": q, "scale": scale}}, x, method="attend")
    np.testing.assert_allclose(logits, x @ deq.T, rtol=1e-5, atol=1e-5)


def test_quantize_params_layout(llama_dir, f32_params):
    cfg = ModelConfig.from_dir(llama_dir)
    qp = quantize_params(cfg, f32_params)
    assert is_quantized(qp) and not is_quantized(f32_params)
    layers = qp["layers"]
    hkv, g, d, L = cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads, cfg.head_dim, cfg.num_layers
    assert layers["qkv_proj"]["kernel"].dtype == np.int8
    assert layers["qkv_proj"]["scale"].shape == (L, hkv, g + 2, d)
    assert layers["gate_up_proj"]["scale"].shape == (L, 2, cfg.intermediate_size)
    assert layers["o_proj"]["scale"].shape == layers["down_proj"]["scale"].shape == (L, cfg.hidden_size)
    assert qp["embed"]["scale"].shape == qp["lm_head"]["scale"].shape == (cfg.vocab_size,)
    assert layers["input_norm"]["scale"].dtype == np.float32  # norms untouched
    deq = dequantize_params(qp)
    np.testing.assert_allclose(deq["layers"]["qkv_proj"]["kernel"], f32_params["layers"]["qkv_proj"]["kernel"],
                               atol=float(layers["qkv_proj"]["scale"].max()) / 2 + 1e-7)


def test_engine_int8_tokens_equal_dequantized_float_engine(llama_dir, f32_params):
    """Int8 weights quantized at load (EngineConfig.quantization) give, token for token, what the float32
    engine gives with those same weights dequantized, over a batch in which slots are refilled."""
    cfg = ModelConfig.from_dir(llama_dir)
    int8 = Engine.from_pretrained(llama_dir, quantization="int8", **ENGINE_KW)
    assert int8.quantization == "int8" and int8.runner.quantization == "int8"
    assert all(x.dtype == jnp.int8 for k, x in jax.tree_util.tree_leaves_with_path(int8.runner.params)
               if jax.tree_util.keystr(k).endswith(("['kernel']", "['embedding']")))
    reference = Engine(cfg, dequantize_params(quantize_params(cfg, f32_params)), None, EngineConfig(**ENGINE_KW))
    assert reference.runner.quantization is None
    tokens = run(int8)
    assert tokens == run(reference)
    assert int8.runner.compile_count <= int8.runner.num_buckets  # no program beyond the bucket set


def test_quantized_orbax_checkpoint_restores_int8(llama_dir, f32_params, tmp_path):
    from jaxserve.checkpoint import convert, read_marker, restore_params
    from jaxserve.cli import main as cli_main

    out = str(tmp_path / "q8")
    assert cli_main(["convert", "--model", llama_dir, "--out", out, "--dtype", "float32",
                     "--quantization", "int8", "--no-progress"]) == 0
    assert read_marker(out)["quantization"] == "int8"
    cfg = ModelConfig.from_dir(llama_dir)
    restored = restore_params(out, cfg, np.float32)
    expected = quantize_params(cfg, f32_params)
    flat_r = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(restored)}
    flat_e = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(expected)}
    assert flat_r.keys() == flat_e.keys()
    for k, v in flat_e.items():
        assert flat_r[k].dtype == v.dtype, k
        np.testing.assert_array_equal(np.asarray(flat_r[k]), v, err_msg=k)
    with pytest.raises(ValueError, match="quantization"):
        convert(llama_dir, str(tmp_path / "bad"), quantization="int4")


def test_bad_quantization_is_named():
    with pytest.raises(ValueError, match="quantization: must be None or one of int8, w8a8, gguf, got 'int4'"):
        EngineConfig(quantization="int4").validate()


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_1"])
def test_gguf_quantized_tensors_load_as_int8(tmp_path, qtype):
    """GGUF Q8_0 / Q4_1 tensors written by gguf.GGUFWriter load as int8 weights (quantization="int8"),
    within int8's half step per channel of gguf.quants.dequantize of the stored blocks."""
    gguf = pytest.importorskip("gguf")
    from test_gguf import write_gguf

    from jaxserve.gguf_loader import load_gguf
    from jaxserve.make_model import hf_config, random_hf_tensors

    cfg = hf_config("llama", "tiny")
    path = write_gguf(str(tmp_path / "q.gguf"), "llama", cfg, random_hf_tensors(cfg, seed=4),
                      qtype=gguf.GGMLQuantizationType[qtype])
    _, reference, _ = load_gguf(path, np.float32)  # gguf.quants.dequantize of every tensor
    _, params, _ = load_gguf(path, np.float32, quantization="int8")
    assert is_quantized(params)
    for name in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"):
        layer = params["layers"][name]
        assert layer["kernel"].dtype == np.int8, name
        got = dequantize(layer["kernel"], layer["scale"], (1,))
        bound = np.expand_dims(layer["scale"], 1) / 2 + 1e-7
        assert np.all(np.abs(got - reference["layers"][name]["kernel"]) <= bound), name
    emb = params["embed"]
    assert emb["embedding"].dtype == np.int8
    assert np.all(np.abs(dequantize(emb["embedding"], emb["scale"], (1,)) - reference["embed"]["embedding"])
                  <= emb["scale"][:, None] / 2 + 1e-7)
