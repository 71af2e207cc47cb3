"""GGUF quantized tensors kept quantized (``quantization="gguf"``): int8 codes with their block scales and
zero points (``jaxserve/quant.py``, group-wise; ``gguf_loader.gguf_blocks``).

Files are written with ``gguf.GGUFWriter`` (``test_gguf.write_gguf``) from random weights: blocks from
``gguf.quants.quantize`` where the gguf package implements it (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1), random
blocks with small scales for the K-quants (which it only dequantizes).  The reference is always
``gguf.quants.dequantize`` of the stored blocks (the float32 load of the same file)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from conftest import greedy_tokens, random_prompts  # noqa: E402
from test_gguf import _flatten as flatten, write_gguf  # noqa: E402

from jaxserve import Engine  # noqa: E402
from jaxserve.engine import load_model  # noqa: E402
from jaxserve.gguf_loader import KEPT_TYPES, gguf_blocks, load_gguf  # noqa: E402
from jaxserve.make_model import hf_config, random_hf_tensors  # noqa: E402
from jaxserve.model import linear  # noqa: E402
from jaxserve.quant import (QuantEmbed, dequantize_groups, dequantize_params, pack_int4, param_bytes,  # noqa: E402
                            unpack_int4)

T = gguf.GGMLQuantizationType
LINEARS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
# rows of 256 so that the K-quants' 256-element super-blocks fit; 2 layers, GQA group 2
SIZES = dict(hidden_size=256, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64)


def blocks(t: np.ndarray, qtype) -> np.ndarray:
    """``gguf.quants.quantize``, or for a K-quant (not implemented there) random blocks whose f16 scale
    fields are small, so that the weights stay in a sane range."""
    try:
        return gguf.quants.quantize(t, qtype)
    except NotImplementedError:
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        rng = np.random.default_rng(t.shape[0] * 7 + int(qtype))
        data = rng.integers(0, 256, (t.shape[0], t.shape[1] // block * size), dtype=np.uint8)
        b = data.reshape(-1, size)
        small = np.frombuffer(np.float16(1e-4).tobytes(), np.uint8)
        for offset in ((208,) if qtype == T.Q6_K else (0, 2)):  # d (and dmin)
            b[:, offset:offset + 2] = small
        return data


@pytest.mark.parametrize("qtype", list(KEPT_TYPES))
def test_blocks_equal_gguf_dequantize(qtype):
    """The int8 codes, scales and zero points of every kept type give gguf.quants.dequantize exactly."""
    w = np.random.default_rng(0).standard_normal((6, 512)).astype(np.float32)
    data = blocks(w, T[qtype])
    b = gguf_blocks(data, qtype)
    group = KEPT_TYPES[qtype][0]
    assert b["kernel"].dtype == np.int8 and b["kernel"].shape == (6, 512)
    assert b["scale"].shape == (6, 512 // group)
    assert b["scale"].dtype == (np.float32 if qtype.endswith("_K") else np.float16)
    assert ("zero" in b) == (qtype in ("Q4_0", "Q4_1", "Q5_1", "Q4_K", "Q5_K"))  # Q4_0: codes + 8, zero -8 d
    ref = gguf.quants.dequantize(data, T[qtype]).reshape(6, 512)
    np.testing.assert_array_equal(dequantize_groups(b["kernel"], b["scale"], b.get("zero"), -1), ref)


def mixed(name: str):
    """A per-tensor mix as llama.cpp's _M files have, also across layers: q Q4_K, k Q8_0, v Q6_K (groups
    of 32 and 16, with and without zero points, in one fused qkv), o Q4_0 / Q6_K by layer, gate Q4_1, up
    Q4_K (4-bit codes: gate_up packed), down F16 in layer 0 and Q8_0 in layer 1 (so kept dense), embedding
    Q8_0, LM head Q5_1."""
    layer1 = ".1." in name
    for key, qtype in (("q_proj", T.Q4_K), ("k_proj", T.Q8_0), ("v_proj", T.Q6_K),
                       ("o_proj", T.Q6_K if layer1 else T.Q4_0), ("gate_proj", T.Q4_1), ("up_proj", T.Q4_K),
                       ("down_proj", T.Q8_0 if layer1 else T.F16), ("embed_tokens", T.Q8_0), ("lm_head", T.Q5_1)):
        if key in name:
            return qtype
    return T.F32


@pytest.fixture(scope="module")
def mixed_path(tmp_path_factory):
    cfg = hf_config("llama", "tiny", **SIZES)
    path = str(tmp_path_factory.mktemp("gguf") / "mixed.gguf")
    return write_gguf(path, "llama", cfg, random_hf_tensors(cfg, seed=5), qtype=mixed, quantize=blocks)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1", "mixed"])
def test_kept_weights_equal_dequantized_load(tmp_path, mixed_path, qtype):
    """Loaded with quantization="gguf": int8 kernels with group scales, laid out (fused qkv, gate_up, the
    q/k un-permutation, transposes) so that codes * scale + zero is the float32 load (gguf.quants.dequantize
    of every tensor) up to float rounding."""
    if qtype == "mixed":
        path = mixed_path
    else:  # a tied LM head, like SmolLM2
        cfg = hf_config("llama", "tiny", tie_word_embeddings=True, **SIZES)
        path = write_gguf(str(tmp_path / "q.gguf"), "llama", cfg, random_hf_tensors(cfg, seed=4), qtype=T[qtype])
    _, reference, _ = load_gguf(path, np.float32)
    _, kept, _ = load_gguf(path, np.float32, quantization="gguf")
    layers = kept["layers"]
    dense = {"down_proj"} if qtype == "mixed" else set()
    # 4-bit codes packed two per byte (uint8, input axis halved): every linear of a Q4_0/Q4_1 file, and
    # the mix's gate_up (Q4_1 + Q4_K); 8-bit codes (Q8_0, or a fused mix with Q8_0/Q6_K) stay int8.
    packed = set(LINEARS) if qtype in ("Q4_0", "Q4_1") else {"gate_up_proj"} if qtype == "mixed" else set()
    for name in LINEARS:
        kernel, full = layers[name]["kernel"], reference["layers"][name]["kernel"]
        dtype = np.float32 if name in dense else np.uint8 if name in packed else np.int8
        assert kernel.dtype == dtype, name
        assert kernel.shape == (full.shape[0], full.shape[1] // 2 if name in packed else full.shape[1], *full.shape[2:])
        if name not in dense:  # scale [L, in/G, *out]: G = 32, or 16 where a Q6_K tensor is fused in
            group = 16 if qtype == "mixed" and name in ("qkv_proj", "o_proj") else 32
            assert layers[name]["scale"].shape == (full.shape[0], full.shape[1] // group, *full.shape[2:])
            assert ("zero" in layers[name]) == (qtype != "Q8_0"), name  # Q4_0: codes + 8, zero -8 d
            assert layers[name]["scale"].dtype == (np.float32 if qtype == "mixed" else np.float16)
    embedding = kept["embed"]["embedding"]  # [V, H], packed along H when its codes are 4-bit
    assert embedding.dtype == (np.uint8 if packed == set(LINEARS) else np.int8)
    assert embedding.shape == (1024, 256 // 2 if packed == set(LINEARS) else 256)
    assert kept["embed"]["scale"].shape == (1024, 256 // 32)
    assert ("lm_head" in kept) == (qtype == "mixed")
    deq = dequantize_params(kept)
    flat_ref, flat = dict(flatten(reference)), dict(flatten(deq))
    assert flat.keys() == flat_ref.keys()
    for key, value in flat_ref.items():
        np.testing.assert_allclose(flat[key], value, rtol=1e-6, atol=1e-7, err_msg=key)
    assert param_bytes(kept) < param_bytes(reference) / 2.5


def test_group_layers_match_dequantized_reference():
    """A group-wise layer (with zero points), embedding lookup and tied LM head against numpy on the
    dequantized weight."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5, 64)).astype(np.float32)
    codes = rng.integers(0, 16, (64, 2, 24)).astype(np.int8)
    params = {"kernel": codes, "scale": rng.random((2, 2, 24)).astype(np.float16),
              "zero": -rng.random((2, 2, 24)).astype(np.float16)}
    w = dequantize_groups(params["kernel"], params["scale"], params["zero"], 0)
    np.testing.assert_array_equal(unpack_int4(pack_int4(codes, 0), 0), codes)
    for kernel in (codes, pack_int4(codes, 0)):  # int8 codes, and packed two per byte
        y = linear((2, 24), "gguf", jnp.float32).apply({"params": {**params, "kernel": kernel}}, jnp.asarray(x))
        np.testing.assert_allclose(y, np.tensordot(x, w, axes=1), rtol=1e-5, atol=1e-5)
    table = {"embedding": rng.integers(-127, 128, (100, 64)).astype(np.int8),
             "scale": rng.random((100, 2)).astype(np.float16)}
    deq = dequantize_groups(table["embedding"], table["scale"], None, 1)
    ids = jnp.asarray([3, 99, 0, 3])
    module = QuantEmbed(100, 64)
    np.testing.assert_array_equal(module.apply({"params": table}, ids), deq[np.asarray(ids)])
    logits = module.apply({"params": table}, jnp.asarray(x), method="attend")
    np.testing.assert_allclose(logits, x @ deq.T, rtol=1e-5, atol=1e-4)


def test_kept_engine_tokens_equal_dequantized_load(mixed_path):
    """Engine greedy tokens with the blocks kept equal those of the float32 load of the same file (six
    requests on two slots, so slots are refilled; one prompt prefilled in two chunks)."""
    kw = dict(max_num_seqs=2, page_size=8, max_model_len=128, max_num_batched_tokens=32, min_prefill_bucket=32,
              dtype="float32")
    prompts, max_tokens = random_prompts([5, 40, 17, 9, 12, 3], seed=2), [8, 6, 10, 7, 9, 5]
    kept = Engine.from_pretrained(mixed_path, quantization="gguf", **kw)
    assert kept.quantization == "gguf"
    params = kept.runner.params  # on CPU, one weight tree per layer ("switch" layer loop)
    assert params.get("layers", params.get("layers_0"))["qkv_proj"]["kernel"].dtype == jnp.int8
    tokens = greedy_tokens(kept, prompts, max_tokens)
    assert tokens == greedy_tokens(Engine.from_pretrained(mixed_path, **kw), prompts, max_tokens)


def test_gguf_quantization_needs_a_gguf_file(llama_dir):
    with pytest.raises(ValueError, match="quantization: 'gguf' keeps the quantized blocks of a GGUF file"):
        load_model(llama_dir, quantization="gguf")
