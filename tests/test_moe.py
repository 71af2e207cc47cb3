"""The mixture-of-experts FFN: the grouped matmul (``jax.lax.ragged_dot`` over token copies sorted by
expert) and its loop form (``tiled``, the CPU default) equal the dense reference (every expert on every
token, masked) for uneven loads and empty experts; routing follows HF."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve import moe


def weights(rng, e, h, i):
    gate_up = rng.standard_normal((e, h, 2, i)).astype(np.float32) * 0.2
    down = rng.standard_normal((e, i, h)).astype(np.float32) * 0.2
    return jnp.asarray(gate_up), jnp.asarray(down)


def uneven_routing(rng, t, k, e, empty=(1, 5)):
    """Top-k expert ids per token with very uneven loads: expert 0 on most tokens, the experts in
    ``empty`` on none, the rest sparse."""
    used = [x for x in range(e) if x not in empty]
    ids = np.zeros((t, k), np.int32)
    for r in range(t):
        first = 0 if r % 4 else int(rng.choice(used))
        rest = rng.choice([x for x in used if x != first], size=k - 1, replace=False)
        ids[r] = [first, *rest]
    w = rng.random((t, k)).astype(np.float32)
    return jnp.asarray(w / w.sum(1, keepdims=True)), jnp.asarray(ids)


GROUPED = {"ragged_dot": moe.expert_ffn_grouped, "tiled": moe.expert_ffn_tiled}


@pytest.mark.parametrize("impl", list(GROUPED))
@pytest.mark.parametrize("t,k,e", [(64, 2, 8), (7, 3, 8), (1, 2, 4), (33, 1, 6)])
@pytest.mark.parametrize("act", ["silu", "gelu_pytorch_tanh"])
def test_grouped_matches_dense(impl, t, k, e, act):
    rng = np.random.default_rng(t * 100 + k)
    h, i = 32, 24
    gate_up, down = weights(rng, e, h, i)
    x = jnp.asarray(rng.standard_normal((t, h)).astype(np.float32))
    w, ids = uneven_routing(rng, t, k, e)
    loads = np.bincount(np.asarray(ids).ravel(), minlength=e)
    assert loads[1] == 0 and loads[5 % e] == 0 and loads.max() > loads.sum() / e  # empty and hot experts
    got = jax.jit(GROUPED[impl], static_argnames="act")(x, w, ids, gate_up, down, act=act)
    want = jax.jit(moe.expert_ffn_dense, static_argnames="act")(x, w, ids, gate_up, down, act=act)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-5)
    # And the numpy definition: sum over the token's k experts of weight * FFN_expert(x).
    xf, gu, dn = np.asarray(x, np.float64), np.asarray(gate_up, np.float64), np.asarray(down, np.float64)
    f = (lambda z: z / (1 + np.exp(-z))) if act == "silu" else (
        lambda z: 0.5 * z * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z ** 3))))
    ref = np.zeros((t, h))
    for r in range(t):
        for j in range(k):
            x_e = int(ids[r, j])
            a = np.einsum("h,hci->ci", xf[r], gu[x_e])  # [2, I]
            ref[r] += float(w[r, j]) * ((f(a[0]) * a[1]) @ dn[x_e])
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("impl", list(GROUPED))
def test_expert_shards_sum_to_the_whole(impl):
    """Expert parallelism's arithmetic: each shard of E/M experts (``expert_offset``) contributes only
    its experts' copies; the shards' outputs sum to the unsharded FFN (the psum of the model)."""
    rng = np.random.default_rng(0)
    t, k, e, h, i = 40, 2, 8, 16, 8
    gate_up, down = weights(rng, e, h, i)
    x = jnp.asarray(rng.standard_normal((t, h)).astype(np.float32))
    w, ids = uneven_routing(rng, t, k, e)
    ffn = GROUPED[impl]
    whole = ffn(x, w, ids, gate_up, down)
    for m in (2, 4):
        n = e // m
        parts = [ffn(x, w, ids, gate_up[s * n:(s + 1) * n], down[s * n:(s + 1) * n], expert_offset=s * n)
                 for s in range(m)]
        np.testing.assert_allclose(np.asarray(sum(parts)), np.asarray(whole), rtol=2e-5, atol=2e-5)


def test_routing_matches_hf():
    """Softmax over all experts, top k, renormalized or not (HF's Qwen3-MoE and Mixtral routers)."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((16, 8)).astype(np.float32)
    for norm in (False, True):
        w, ids = moe.route(jnp.asarray(logits), 2, norm)
        p = torch.softmax(torch.tensor(logits), dim=-1)
        tw, ti = torch.topk(p, 2, dim=-1)
        if norm:
            tw = tw / tw.sum(-1, keepdim=True)
        np.testing.assert_array_equal(np.asarray(ids), ti.numpy())
        np.testing.assert_allclose(np.asarray(w), tw.numpy(), rtol=1e-6)


def test_auto_picks_tiled_on_cpu_and_ragged_dot_elsewhere():
    assert moe.expert_ffn("auto", "cpu") is moe.expert_ffn_tiled
    assert moe.expert_ffn("auto", "tpu") is moe.expert_ffn_grouped
    assert moe.expert_ffn("auto", "gpu") is moe.expert_ffn_grouped
    with pytest.raises(ValueError, match="moe_impl"):
        moe.expert_ffn("nope")


def test_unsupported_moe_layouts_are_clear_errors():
    transformers = pytest.importorskip("transformers")
    from jaxserve.config import ModelConfig

    for kw in (dict(mlp_only_layers=[0]), dict(decoder_sparse_step=2)):
        hf = transformers.AutoConfig.for_model("qwen3_moe", num_hidden_layers=2, **kw)
        with pytest.raises(ValueError, match="mlp_only_layers"):
            ModelConfig.from_hf(hf)
    hf = transformers.AutoConfig.for_model("qwen3_moe", num_experts=4, num_experts_per_tok=5)
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        ModelConfig.from_hf(hf)
    mc = ModelConfig.from_hf(transformers.AutoConfig.for_model("mixtral"))
    assert mc.norm_topk_prob and mc.moe_intermediate_size == 14336 and mc.num_experts == 8
