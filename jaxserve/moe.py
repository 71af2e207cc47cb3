"""Mixture-of-experts FFN (Qwen3-MoE, Mixtral): top-k routing and the experts as one grouped matmul.

Routing is dropless: every token goes to its ``k`` experts, there is no capacity
factor.  The token copies (``T * k`` of them) are sorted by expert, and each
expert's FFN runs on its contiguous run of rows with ``jax.lax.ragged_dot``
(one grouped matmul for gate/up, one for down, over all experts); the outputs
are weighted by the routing weights and summed back onto their tokens.

Expert weights, as the model holds them (stacked at load from the per-expert
Hugging Face tensors, ``jaxserve/weights.py``): ``gate_up [E, H, 2, I]`` (gate
then up) and ``down [E, I, H]``.  On a mesh the expert axis is split over the
``model`` axis (expert parallelism): under ``shard_map`` each device runs the
grouped matmul for its own ``E / M`` experts on the token copies routed to
them (sorted to the front of its rows), and the partial outputs are summed with
one ``psum`` over ``model``, the same all-reduce a tensor-parallel MLP ends with.

``expert_ffn_dense`` (every expert on every token, weighted by a mask that is
zero for unselected experts) is the reference the tests hold the grouped matmul
to.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    if name == "silu":
        return jax.nn.silu
    if name == "gelu_pytorch_tanh":
        return functools.partial(jax.nn.gelu, approximate=True)
    raise ValueError(f"hidden_act: {name!r} is not supported")


def route(logits: jax.Array, k: int, norm_topk_prob: bool) -> tuple[jax.Array, jax.Array]:
    """Top-k routing as Hugging Face computes it: softmax over all experts (float32), the k largest,
    renormalized to sum to 1 when ``norm_topk_prob`` (Mixtral always; that equals a softmax over the
    top-k logits).  Returns (weights [T, k] float32, expert ids [T, k] int32)."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, experts = jax.lax.top_k(probs, k)
    if norm_topk_prob:
        weights = weights / weights.sum(axis=-1, keepdims=True)
    return weights, experts.astype(jnp.int32)


def expert_ffn_grouped(x: jax.Array, weights: jax.Array, experts: jax.Array, gate_up: jax.Array,
                       down: jax.Array, act: str = "silu", expert_offset: jax.Array | int = 0) -> jax.Array:
    """The routed experts' FFN as a grouped matmul (``jax.lax.ragged_dot``) over the token copies
    sorted by expert.

    x [T, H]; weights/experts [T, k] (routing); gate_up [El, H, 2, I], down [El, I, H]: the experts
    ``expert_offset .. expert_offset + El - 1`` (all of them, or one device's share under expert
    parallelism; copies routed to other experts contribute nothing here).  Returns [T, H] float32."""
    t, k = experts.shape
    num_local, h, _, inter = gate_up.shape
    local = experts.reshape(-1) - expert_offset  # [T*k]
    is_local = (local >= 0) & (local < num_local)
    key = jnp.where(is_local, local, num_local)  # other experts' copies sort to the end
    order = jnp.argsort(key, stable=True)
    group_sizes = jnp.bincount(key, length=num_local + 1)[:num_local].astype(jnp.int32)
    token = order // k
    rows = x[token]  # [T*k, H], grouped by expert
    gu = jax.lax.ragged_dot(rows, gate_up.reshape(num_local, h, 2 * inter), group_sizes,
                            preferred_element_type=jnp.float32).reshape(t * k, 2, inter)
    hidden = (activation(act)(gu[:, 0]) * gu[:, 1]).astype(x.dtype)
    # Rows past the last group (copies for other devices' experts) come out as zeros.
    y = jax.lax.ragged_dot(hidden, down, group_sizes, preferred_element_type=jnp.float32)  # [T*k, H]
    y = y * weights.reshape(-1)[order].astype(jnp.float32)[:, None]
    return jnp.zeros((t, h), jnp.float32).at[token].add(y)


def expert_ffn_dense(x: jax.Array, weights: jax.Array, experts: jax.Array, gate_up: jax.Array,
                     down: jax.Array, act: str = "silu") -> jax.Array:
    """Reference: every expert on every token, combined with a [T, E] mask of the routing weights
    (zero for the experts a token was not routed to).  Returns [T, H] float32."""
    t = x.shape[0]
    num_experts = gate_up.shape[0]
    combine = jnp.zeros((t, num_experts), jnp.float32).at[jnp.arange(t)[:, None], experts].add(
        weights.astype(jnp.float32))
    gu = jnp.einsum("th,ehci->etci", x, gate_up, preferred_element_type=jnp.float32)
    hidden = (activation(act)(gu[:, :, 0]) * gu[:, :, 1]).astype(x.dtype)
    y = jnp.einsum("eti,eih->eth", hidden, down, preferred_element_type=jnp.float32)
    return jnp.einsum("te,eth->th", combine, y)


MOE_IMPLS = ("grouped", "dense")
