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
    if name in ("silu", "swish"):
        return jax.nn.silu
    if name in ("gelu_pytorch_tanh", "gelu_new", "gelu_fast"):
        return functools.partial(jax.nn.gelu, approximate=True)
    if name == "gelu":  # the exact (erf) GELU
        return functools.partial(jax.nn.gelu, approximate=False)
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


def expert_ffn_tiled(x: jax.Array, weights: jax.Array, experts: jax.Array, gate_up: jax.Array,
                     down: jax.Array, act: str = "silu", expert_offset: jax.Array | int = 0,
                     tile: int = 16) -> jax.Array:
    """The same grouped matmul as ``expert_ffn_grouped``, as loops: over the experts, and for each over
    ``tile``-row blocks of its sorted rows (``ceil(rows / tile)`` of them, a dynamic trip count).

    This is the CPU path: XLA CPU lowers ``ragged_dot`` to one dense matmul of every row against every
    expert, masked (``E`` times the work of the grouped matmul, more than the dense reference), while
    here the work is the routed rows plus at most one partial tile per expert.  A tile that runs past
    its expert's rows writes rows of the next experts, which overwrite them afterwards (experts run in
    order); rows past the last local expert are zeroed."""
    t, k = experts.shape
    num_local, h, _, inter = gate_up.shape
    n = t * k
    local = experts.reshape(-1) - expert_offset
    is_local = (local >= 0) & (local < num_local)
    key = jnp.where(is_local, local, num_local)
    order = jnp.argsort(key, stable=True)
    group_sizes = jnp.bincount(key, length=num_local + 1)[:num_local].astype(jnp.int32)
    starts = jnp.cumsum(group_sizes) - group_sizes
    token = order // k
    rows = jnp.pad(x[token], ((0, tile), (0, 0)))  # [N + tile, H]: the last tile stays in bounds
    f = activation(act)

    def expert(e, out):
        gu = gate_up[e].reshape(h, 2 * inter)
        dn = down[e]

        def block(j, out):
            pos = starts[e] + j * tile
            r = jax.lax.dynamic_slice_in_dim(rows, pos, tile)
            a = jnp.dot(r, gu, preferred_element_type=jnp.float32)
            hidden = (f(a[:, :inter]) * a[:, inter:]).astype(x.dtype)
            y = jnp.dot(hidden, dn, preferred_element_type=jnp.float32)
            return jax.lax.dynamic_update_slice_in_dim(out, y, pos, axis=0)

        return jax.lax.fori_loop(0, (group_sizes[e] + tile - 1) // tile, block, out)

    y = jax.lax.fori_loop(0, num_local, expert, jnp.zeros((n + tile, h), jnp.float32))[:n]
    valid = jnp.arange(n) < group_sizes.sum()
    y = jnp.where(valid[:, None], y * weights.reshape(-1)[order].astype(jnp.float32)[:, None], 0.0)
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


MOE_IMPLS = ("auto", "ragged_dot", "tiled", "dense")


def expert_ffn(impl: str, backend: str | None = None):
    """The FFN function of ``impl``: ``auto`` is ``ragged_dot`` on TPU/GPU and ``tiled`` on CPU."""
    if impl not in MOE_IMPLS:
        raise ValueError(f"moe_impl: must be one of {', '.join(MOE_IMPLS)}, got {impl!r}")
    if impl == "auto":
        impl = "tiled" if (backend or jax.default_backend()) == "cpu" else "ragged_dot"
    return {"ragged_dot": expert_ffn_grouped, "tiled": expert_ffn_tiled, "dense": expert_ffn_dense}[impl]
