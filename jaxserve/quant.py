"""Weight-only int8 quantization (W8A16): int8 weights with symmetric per-output-channel scales.

    params = quantize_params(cfg, params)          # numpy tree of hf_to_params -> int8 + scales
    CausalLM(cfg, ..., quantization="int8")        # runs it

Every linear layer's ``kernel`` (its input axis first, output axes after, as ``hf_to_params`` lays
them out) becomes an ``int8`` array of the same shape, and a float32 ``scale`` of its output shape is
added next to it: ``w ~= kernel * scale`` with ``scale = max|w| / 127`` over the input axis (one scale
per output channel, no zero point).  The layer computes ``(x @ kernel.astype(x.dtype)) * scale``: the
int8 weight is what lives in device memory; XLA TPU/GPU fuse the convert into the dot.  XLA CPU does
not (it converts the whole weight to f32 in a loop fusion, then calls its matmul), and tiling the
matmul over output or input chunks so that only a chunk is converted was slower still on this
2-core CPU (a jitted micro-benchmark of 8-32 rows x [512, 2816], numbers in the README, "Int8 weights"):
on CPU W8A16 saves memory, not time; ``quantization="w8a8"`` (int8 activations too) is the fast one.

Quantized: the fused ``qkv_proj`` (scale ``[Hkv, G+2, D]``, laid out like its bias, so it splits and
replicates with the KV heads), ``o_proj``, ``gate_up_proj`` (scale ``[2, I]``), ``down_proj``, the LM
head (scale ``[V]``) and the embedding, per vocabulary row (scale ``[V]``): the lookup is
``kernel[ids] * scale[ids]``, and a tied LM head uses the same per-row scales as its per-output-channel
scales.  Norms, biases, the MoE router and the MoE experts stay in the model's dtype.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# EngineConfig.quantization (None: the weights in the engine's dtype).  Both store the same int8 weights;
# "w8a8" also quantizes each row of a linear layer's input to int8 (one dynamic scale per token row) and
# runs an int8 x int8 -> int32 dot: faster than float32 on XLA CPU (and the MXU's int8 path on TPU
# v5e/v6e), at the cost of the activations' rounding.
QUANTIZATIONS = ("int8", "w8a8")
INT8_MAX = 127.0

# Layer kernels quantized per output channel, and the number of input (contracted) axes leading each
# kernel after the layer axis: qkv_proj [H, Hkv, G+2, D], o_proj [Hq*D, H], gate_up [H, 2, I], down [I, H].
LAYER_LINEARS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


def quantize_int8(w: np.ndarray, in_axes: Sequence[int] = (0,)) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 of ``w`` with one float32 scale per index of the axes not in ``in_axes``:
    ``(q int8 of w's shape, scale of the remaining axes)``; all-zero channels get scale 1."""
    w = np.asarray(w, np.float32)
    in_axes = tuple(a % w.ndim for a in in_axes)
    amax = np.max(np.abs(w), axis=in_axes, keepdims=True)
    scale = np.where(amax > 0, amax / INT8_MAX, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / scale), -INT8_MAX, INT8_MAX).astype(np.int8)
    return q, np.squeeze(scale, axis=in_axes)


def dequantize(q: Any, scale: Any, in_axes: Sequence[int] = (0,)) -> Any:
    """``q * scale`` in float32 with ``scale`` broadcast back over ``in_axes`` (the reference)."""
    xp = np if isinstance(q, np.ndarray) else jnp
    s = scale
    for a in sorted(a % q.ndim for a in in_axes):
        s = xp.expand_dims(s, a)
    return q.astype(xp.float32) * s


def is_quantized(params: dict[str, Any]) -> bool:
    """Whether a parameter tree holds int8 weights (from ``quantize_params`` or a quantized checkpoint)."""
    return any(getattr(x, "dtype", None) == np.int8 for x in jax.tree_util.tree_leaves(params))


def quantize_layer(layer: dict[str, Any], stacked: bool = True) -> dict[str, Any]:
    """One decoder layer's (or, ``stacked``, all layers') numpy weights with the linear kernels in int8
    and per-output-channel scales (the input axis of a kernel is its first, after the layer axis)."""
    out = dict(layer)
    for name in LAYER_LINEARS:
        if name in out and "scale" not in out[name]:  # MoE layers have no dense MLP
            q, s = quantize_int8(out[name]["kernel"], in_axes=(1 if stacked else 0,))
            out[name] = {**out[name], "kernel": q, "scale": s}
    return out


def quantize_globals(params: dict[str, Any]) -> dict[str, Any]:
    """The embedding (one scale per vocabulary row) and the untied LM head (one per vocabulary column)."""
    out = dict(params)
    if "scale" not in params["embed"]:
        q, s = quantize_int8(params["embed"]["embedding"], in_axes=(1,))  # [V, H]
        out["embed"] = {"embedding": q, "scale": s}
    if "lm_head" in params and "scale" not in params["lm_head"]:
        q, s = quantize_int8(params["lm_head"]["kernel"], in_axes=(0,))  # [H, V]
        out["lm_head"] = {"kernel": q, "scale": s}
    return out


def quantize_params(cfg: Any, params: dict[str, Any]) -> dict[str, Any]:
    """The host (numpy) tree of ``weights.hf_to_params`` (layers stacked under ``"layers"``) with every
    linear kernel and the embedding replaced by int8 + per-output-channel float32 scales.  (Loading
    with ``quantization="int8"`` does this layer by layer, never holding the float tree.)"""
    if is_quantized(params):
        return params
    out = quantize_globals(params)
    out["layers"] = quantize_layer(params["layers"], stacked=True)
    return out


def dequantize_params(params: dict[str, Any], dtype: Any = np.float32) -> dict[str, Any]:
    """The float tree whose weights are exactly the int8 weights times their scales (the plain-precision
    model a quantized one must reproduce, for tests and the quality gate)."""
    if not is_quantized(params):
        return params
    out = dict(params)
    layers = dict(params["layers"])
    for name in LAYER_LINEARS:
        if name in layers and "scale" in layers[name]:
            layer = {k: v for k, v in layers[name].items() if k != "scale"}
            layer["kernel"] = np.asarray(dequantize(np.asarray(layers[name]["kernel"]),
                                                    np.asarray(layers[name]["scale"]), (1,)), dtype)
            layers[name] = layer
    out["layers"] = layers
    emb = params["embed"]
    out["embed"] = {"embedding": np.asarray(dequantize(np.asarray(emb["embedding"]), np.asarray(emb["scale"]),
                                                       (1,)), dtype)}
    if "lm_head" in params:
        head = params["lm_head"]
        out["lm_head"] = {"kernel": np.asarray(dequantize(np.asarray(head["kernel"]), np.asarray(head["scale"]),
                                                          (0,)), dtype)}
    return out


def quantize_rows(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Dynamic symmetric int8 of each row of ``x [T, in]``: ``(int8 [T, in], float32 scale [T, 1])``."""
    xf = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(xf), axis=-1, keepdims=True)
    xs = jnp.where(amax > 0, amax / INT8_MAX, 1.0)
    return jnp.clip(jnp.round(xf / xs), -INT8_MAX, INT8_MAX).astype(jnp.int8), xs


def int8_dot(x: jax.Array, kernel: jax.Array, w8a8: bool, contract: int = 0) -> jax.Array:
    """float32 ``x [T, in]`` contracted with the int8 ``kernel`` on its axis ``contract`` (before the
    weight scales): W8A16 converts the weight in the dot's operand and accumulates in float32; ``w8a8``
    quantizes the rows of ``x`` and accumulates int8 x int8 in int32, then applies the row scales."""
    dims = (((x.ndim - 1,), (contract,)), ((), ()))
    if not w8a8:
        return jax.lax.dot_general(x, kernel.astype(x.dtype), dims, preferred_element_type=jnp.float32)
    xq, xs = quantize_rows(x)
    y = jax.lax.dot_general(xq, kernel, dims, preferred_element_type=jnp.int32).astype(jnp.float32)
    return y * xs.reshape(xs.shape[0], *([1] * (y.ndim - 1)))


def quantized_matmul(x: jax.Array, kernel: jax.Array, scale: jax.Array, out_dtype: Any,
                     w8a8: bool = False) -> jax.Array:
    """``x [T, in] @ (kernel [in, *out] int8 * scale [*out])``: the per-output-channel scale is applied
    to the [T, *out] result, never to the weight (``w8a8``: see ``int8_dot``)."""
    return (int8_dot(x, kernel, w8a8) * scale.astype(jnp.float32)).astype(out_dtype)


class QuantDense(nn.Module):
    """``nn.DenseGeneral`` over the last input axis with an int8 kernel ``[in, *features]`` and a float32
    ``scale [*features]`` (parameter names as Flax's Dense, plus ``scale``)."""

    features: int | tuple[int, ...]
    use_bias: bool = False
    dtype: Any = jnp.float32
    out_f32: bool = False  # the LM head: float32 logits
    w8a8: bool = False  # int8 activations too (QUANTIZATIONS)

    @nn.compact
    def __call__(self, x):
        features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
        kernel = self.param("kernel", nn.initializers.zeros, (x.shape[-1], *features), jnp.int8)
        scale = self.param("scale", nn.initializers.ones, features, jnp.float32)
        y = quantized_matmul(x, kernel, scale, jnp.float32 if self.out_f32 else self.dtype, self.w8a8)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, features, self.dtype).astype(y.dtype)
        return y


class QuantEmbed(nn.Module):
    """``nn.Embed`` with int8 rows and one float32 scale per row; ``attend`` is the tied LM head."""

    num_embeddings: int
    features: int
    dtype: Any = jnp.float32
    w8a8: bool = False  # the tied LM head with int8 activations (QUANTIZATIONS)

    def setup(self):
        self.embedding = self.param("embedding", nn.initializers.zeros, (self.num_embeddings, self.features),
                                    jnp.int8)
        self.scale = self.param("scale", nn.initializers.ones, (self.num_embeddings,), jnp.float32)

    def __call__(self, ids):
        return (self.embedding[ids].astype(jnp.float32) * self.scale[ids][..., None]).astype(self.dtype)

    def attend(self, x):
        """The tied LM head: float32 logits ``x [N, H] @ (embedding * scale).T``."""
        return embed_logits(x, self.embedding, self.scale, self.w8a8)


def embed_logits(x: jax.Array, embedding: jax.Array, scale: jax.Array, w8a8: bool = False) -> jax.Array:
    """float32 logits of a tied LM head on an int8 embedding ``[V, H]`` with row scales ``[V]``."""
    return int8_dot(x, embedding, w8a8, contract=1) * scale.astype(jnp.float32)


def param_specs(specs: dict[str, Any]) -> dict[str, Any]:
    """``sharding.param_specs`` of the unquantized model -> those of the quantized one: each scale is
    split like its kernel's output axes (qkv's like its bias: on the KV heads; gate_up's on I; the
    embedding's and LM head's on the vocabulary when the kernel is), others replicated."""
    from jax.sharding import PartitionSpec as P

    out = dict(specs)
    layers = dict(specs["layers"])
    for name in LAYER_LINEARS:
        if name in layers:
            k = tuple(layers[name]["kernel"])  # (layer, in, *out)
            layers[name] = {**layers[name], "scale": P(k[0], *k[2:])}
    out["layers"] = layers
    emb = tuple(specs["embed"]["embedding"])  # (V, H)
    out["embed"] = {**specs["embed"], "scale": P(emb[0] if emb else None)}
    if "lm_head" in specs:
        head = tuple(specs["lm_head"]["kernel"])  # (H, V)
        out["lm_head"] = {**specs["lm_head"], "scale": P(head[1] if len(head) > 1 else None)}
    return out


def stored_dtypes(shapes: dict[str, Any], dtype: Any) -> dict[str, Any]:
    """Restore dtypes of a stored tree of ``(shape, dtype)`` leaves: the engine's ``dtype``, except in a
    quantized layer (one holding an int8 ``kernel`` or ``embedding``), whose int8 weight and float32
    scale keep their stored dtypes."""
    def walk(node):
        if isinstance(node, tuple):
            return np.dtype(dtype)
        quantized = any(isinstance(v, tuple) and np.dtype(v[1]) == np.int8 for v in node.values())
        return {k: (np.dtype(v[1]) if quantized and isinstance(v, tuple) and k != "bias" else walk(v))
                for k, v in node.items()}

    return walk(shapes)


def param_bytes(params: Any) -> int:
    """Bytes of a parameter tree as stored (int8 weights count one byte per element)."""
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(params))


__all__ = ["QUANTIZATIONS", "quantize_int8", "dequantize", "is_quantized", "quantize_layer", "quantize_globals", "quantize_params",
           "dequantize_params", "quantize_rows", "int8_dot", "quantized_matmul", "embed_logits", "QuantDense", "QuantEmbed", "param_specs", "stored_dtypes", "param_bytes"]
