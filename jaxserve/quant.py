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

Group-wise (``quantization="gguf"``: a GGUF file's quantized blocks kept as they are, see
``gguf_loader.gguf_blocks``): the same int8 ``kernel``, with a ``scale`` that also has the input axis,
divided into groups of G (the GGUF block or sub-block: 32, or 16 for Q6_K), and optionally a ``zero`` of
the scale's shape (the block minimum of Q4_1/Q5_1/Q4_K/Q5_K): ``w = kernel * scale + zero`` per group.
A linear kernel ``[in, *out]`` has ``scale [in/G, *out]``; the embedding ``[V, H]`` has ``scale [V, H/G]``
(GGUF blocks run along each ``[out, in]`` row, i.e. along the input axis).  A scale with as many axes
as its kernel is group-wise, one with fewer is per channel; a layer without a scale is dense (a GGUF
tensor of a type with no int8 form).  A group-wise kernel whose codes all lie in 0..15 (Q4_1, Q4_K, and
Q4_0, whose codes are stored +8 with a zero point of -8 * scale) is packed two codes per byte
(``pack_int4``): a ``uint8`` kernel with its input axis halved, the low nibble the even input row.
The layers unpack and dequantize the groups inside the step, then matmul (W8A16; no int8 activations).
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
# "gguf": a GGUF file's quantized tensors kept in their blocks (int8 codes, group scales and zero points).
QUANTIZATIONS = ("int8", "w8a8", "gguf")
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
    return any(getattr(x, "dtype", None) in (np.int8, np.uint8) for x in jax.tree_util.tree_leaves(params))


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
    """The float tree whose weights are exactly the int8 weights times their scales (plus their zero
    points; the plain-precision model a quantized one must reproduce, for tests and the quality gate)."""
    if not is_quantized(params):
        return params

    def dense(layer: dict[str, Any], key: str, in_axis: int) -> dict[str, Any]:
        if "scale" not in layer:
            return layer
        w = weight(np.asarray(layer[key]), np.asarray(layer["scale"]), layer.get("zero"), in_axis)
        return {**{k: v for k, v in layer.items() if k not in ("scale", "zero")}, key: np.asarray(w, dtype)}

    out = dict(params)
    layers = dict(params["layers"])
    for name in LAYER_LINEARS:
        if name in layers:
            layers[name] = dense(layers[name], "kernel", 1)
    out["layers"] = layers
    out["embed"] = dense(params["embed"], "embedding", 1)
    if "lm_head" in params:
        out["lm_head"] = dense(params["lm_head"], "kernel", 0)
    return out


def dequantize_groups(kernel: Any, scale: Any, zero: Any = None, axis: int = 0) -> Any:
    """Group-wise ``kernel * scale + zero`` in float32: ``scale`` and ``zero`` have ``kernel``'s shape
    except on ``axis`` (the input axis), which holds one entry per group of ``kernel.shape[axis] //
    scale.shape[axis]`` consecutive elements."""
    xp = np if isinstance(kernel, np.ndarray) else jnp
    axis %= kernel.ndim
    if kernel.dtype == np.uint8:  # two 4-bit codes per byte (pack_int4)
        kernel = unpack_int4(kernel, axis)
    n = scale.shape[axis]
    grouped = kernel.reshape(*kernel.shape[:axis], n, kernel.shape[axis] // n, *kernel.shape[axis + 1:])
    w = grouped.astype(xp.float32) * xp.expand_dims(scale, axis + 1).astype(xp.float32)
    if zero is not None:
        w = w + xp.expand_dims(zero, axis + 1).astype(xp.float32)
    return w.reshape(kernel.shape)


def pack_int4(codes: np.ndarray, axis: int) -> np.ndarray:
    """int8 codes in 0..15 -> ``uint8`` with ``axis`` halved: byte j holds code 2j (low nibble) and 2j+1."""
    lo = np.take(codes, np.arange(0, codes.shape[axis], 2), axis).astype(np.uint8)
    hi = np.take(codes, np.arange(1, codes.shape[axis], 2), axis).astype(np.uint8)
    return lo | (hi << np.uint8(4))


def unpack_int4(packed: Any, axis: int) -> Any:
    """``pack_int4``'s inverse (numpy or jax): int8 codes with ``axis`` doubled."""
    xp = np if isinstance(packed, np.ndarray) else jnp
    codes = xp.stack([packed & 15, packed >> 4], axis=axis + 1).astype(xp.int8)
    return codes.reshape(*packed.shape[:axis], 2 * packed.shape[axis], *packed.shape[axis + 1:])


def pack_params(params: dict[str, Any]) -> dict[str, Any]:
    """Every group-wise kernel (stacked layers, embedding, LM head) whose codes lie in 0..15, packed
    two per byte along its input axis (``pack_int4``)."""
    def pack(layer: dict[str, Any], key: str, axis: int) -> dict[str, Any]:
        k = layer[key]
        if not is_grouped(layer, key) or k.dtype != np.int8 or k.shape[axis] % 2 or k.min() < 0 or k.max() > 15:
            return layer
        return {**layer, key: pack_int4(k, axis)}

    out = dict(params)
    out["layers"] = {name: (pack(v, "kernel", 1) if name in LAYER_LINEARS else v)
                     for name, v in params["layers"].items()}
    out["embed"] = pack(params["embed"], "embedding", 1)
    if "lm_head" in params:
        out["lm_head"] = pack(params["lm_head"], "kernel", 0)
    return out


def weight(kernel: Any, scale: Any, zero: Any = None, in_axis: int = 0) -> Any:
    """The float32 weight of an int8 ``kernel`` whose input (contracted) axis is ``in_axis``: group-wise
    when ``scale`` has the kernel's rank, else per channel (``scale`` lacks the input axis)."""
    if scale.ndim == kernel.ndim:
        return dequantize_groups(kernel, scale, zero, in_axis)
    return dequantize(kernel, scale, (in_axis,))


def is_grouped(layer: dict[str, Any], key: str = "kernel") -> bool:
    """Whether a layer's int8 weight has group-wise scales (GGUF blocks kept)."""
    return "scale" in layer and np.ndim(layer["scale"]) == np.ndim(layer[key])


def harmonize(parts: list[dict[str, Any]], axis: int, dtype: Any, key: str = "kernel") -> list[dict[str, Any]]:
    """Weights that are concatenated or stacked (q/k/v, gate/up, the layers) in one format: all dense
    (in ``dtype``) when any is dense, else group-wise with the smallest group (a scale of G elements is a
    scale of each of its G/g sub-groups), a zero point when any has one, and the widest scale dtype.
    ``axis``: the group axis of the scales."""
    if not any(is_grouped(p, key) for p in parts):
        return parts
    if any("scale" not in p for p in parts):
        return [p if "scale" not in p else
                {key: np.asarray(dequantize_groups(p[key], p["scale"], p.get("zero"), axis), dtype)}
                for p in parts]
    groups = [p[key].shape[axis] // p["scale"].shape[axis] for p in parts]
    g = min(groups)
    sdtype = np.result_type(*(p["scale"] for p in parts), *(p["zero"] for p in parts if "zero" in p))
    with_zero = any("zero" in p for p in parts)
    out = []
    for p, gp in zip(parts, groups):
        if gp % g:
            raise ValueError(f"model: GGUF block sizes {sorted(set(groups))} of one weight do not nest")
        q = {key: p[key], "scale": np.repeat(p["scale"], gp // g, axis=axis).astype(sdtype, copy=False)}
        if with_zero:
            z = p.get("zero", np.zeros_like(p["scale"]))
            q["zero"] = np.repeat(z, gp // g, axis=axis).astype(sdtype, copy=False)
        out.append(q)
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
                     w8a8: bool = False, zero: jax.Array | None = None) -> jax.Array:
    """``x [T, in] @ (kernel [in, *out] int8 * scale [*out])``: the per-output-channel scale is applied
    to the [T, *out] result, never to the weight (``w8a8``: see ``int8_dot``).  Group-wise (``scale
    [in/G, *out]``, optional ``zero``): the groups are dequantized in the step, then multiplied."""
    if scale.ndim == kernel.ndim:
        if w8a8:
            raise ValueError("quantization: w8a8 needs per-channel int8 weights; GGUF blocks (quantization="
                             "'gguf') are served as W8A16")
        w = dequantize_groups(kernel, scale, zero, 0).astype(x.dtype)
        return jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())),
                                   preferred_element_type=jnp.float32).astype(out_dtype)
    return (int8_dot(x, kernel, w8a8) * scale.astype(jnp.float32)).astype(out_dtype)


def _stored(module: nn.Module, name: str, shape: tuple[int, ...] | None = None, dtype: Any = jnp.float32,
            init: Any = nn.initializers.ones) -> jax.Array | None:
    """The parameter ``name`` as the tree holds it (per-channel or group-wise, float16 or float32, a
    packed kernel), or created with ``shape`` at initialization; None when the tree has no such parameter."""
    if module.has_variable("params", name):
        return module.get_variable("params", name)
    if shape is not None and module.is_initializing():
        return module.param(name, init, shape, dtype)
    return None


class QuantDense(nn.Module):
    """``nn.DenseGeneral`` over the last input axis with an int8 kernel ``[in, *features]`` and a float32
    ``scale [*features]`` (parameter names as Flax's Dense, plus ``scale``), or group-wise ``scale [in/G,
    *features]`` and ``zero`` (GGUF blocks), or no scale: a float kernel (a GGUF tensor kept dense)."""

    features: int | tuple[int, ...]
    use_bias: bool = False
    dtype: Any = jnp.float32
    out_f32: bool = False  # the LM head: float32 logits
    w8a8: bool = False  # int8 activations too (QUANTIZATIONS)

    @nn.compact
    def __call__(self, x):
        features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
        kernel = _stored(self, "kernel", (x.shape[-1], *features), jnp.int8, nn.initializers.zeros)
        scale = _stored(self, "scale", features)
        out_dtype = jnp.float32 if self.out_f32 else self.dtype
        if scale is None:  # dense
            y = jax.lax.dot_general(x, kernel.astype(x.dtype), (((x.ndim - 1,), (0,)), ((), ())),
                                    preferred_element_type=jnp.float32).astype(out_dtype)
        else:
            y = quantized_matmul(x, kernel, scale, out_dtype, self.w8a8, _stored(self, "zero"))
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, features, self.dtype).astype(y.dtype)
        return y


class QuantEmbed(nn.Module):
    """``nn.Embed`` with int8 rows and one float32 scale per row (or group-wise ``scale [V, H/G]`` and
    ``zero``: GGUF blocks; the rows are gathered, then dequantized); ``attend`` is the tied LM head."""

    num_embeddings: int
    features: int
    dtype: Any = jnp.float32
    w8a8: bool = False  # the tied LM head with int8 activations (QUANTIZATIONS)

    def setup(self):
        self.embedding = _stored(self, "embedding", (self.num_embeddings, self.features), jnp.int8,
                                 nn.initializers.zeros)
        self.scale = _stored(self, "scale", (self.num_embeddings,))
        self.zero = _stored(self, "zero")

    def __call__(self, ids):
        if self.scale is None:
            return self.embedding[ids].astype(self.dtype)
        zero = None if self.zero is None else self.zero[ids]
        return weight(self.embedding[ids], self.scale[ids], zero, in_axis=-1).astype(self.dtype)

    def attend(self, x):
        """The tied LM head: float32 logits ``x [N, H] @ (embedding * scale).T``."""
        return embed_logits(x, self.embedding, self.scale, self.w8a8, self.zero)


def embed_logits(x: jax.Array, embedding: jax.Array, scale: jax.Array | None, w8a8: bool = False,
                 zero: jax.Array | None = None) -> jax.Array:
    """float32 logits of a tied LM head on an int8 embedding ``[V, H]`` with row scales ``[V]`` (or
    group-wise ``[V, H/G]`` and ``zero``, dequantized first; or none: a float embedding)."""
    if scale is not None and scale.ndim == embedding.ndim:
        if w8a8:
            raise ValueError("quantization: w8a8 needs per-channel int8 weights; GGUF blocks (quantization="
                             "'gguf') are served as W8A16")
        embedding, scale = dequantize_groups(embedding, scale, zero, 1).astype(x.dtype), None
    if scale is None:
        return jax.lax.dot_general(x, embedding.astype(x.dtype), (((1,), (1,)), ((), ())),
                                   preferred_element_type=jnp.float32)
    return int8_dot(x, embedding, w8a8, contract=1) * scale.astype(jnp.float32)


def param_specs(specs: dict[str, Any], params: dict[str, Any] | None = None, model_size: int = 1) -> dict[str, Any]:
    """``sharding.param_specs`` of the unquantized model -> those of the quantized one: each scale is
    split like its kernel's output axes (qkv's like its bias: on the KV heads; gate_up's on I; the
    embedding's and LM head's on the vocabulary when the kernel is), others replicated.  Group-wise
    scales and zero points of ``params`` (GGUF blocks) are split exactly like their kernel, except on an
    axis whose number of groups ``model_size`` does not divide (replicated there); a dense layer of
    ``params`` keeps its kernel's spec alone."""
    from jax.sharding import PartitionSpec as P

    def quantized(spec: Any, layer: dict[str, Any] | None, key: str, channel_spec: Any) -> dict[str, Any]:
        out = dict(spec)
        if layer is None:
            out["scale"] = channel_spec
        elif "scale" in layer and np.ndim(layer["scale"]) == np.ndim(layer[key]):
            axes = tuple(spec[key]) + (None,) * (np.ndim(layer[key]) - len(tuple(spec[key])))
            fit = P(*(a if a is None or np.shape(layer["scale"])[i] % model_size == 0 else None
                      for i, a in enumerate(axes)))
            out.update({k: fit for k in ("scale", "zero") if k in layer})
            out[key] = P(*(a if a is None or np.shape(layer[key])[i] % model_size == 0 else None  # packed: in/2
                           for i, a in enumerate(axes)))
        elif "scale" in layer:
            out["scale"] = channel_spec
        return out

    tree = params or {}
    out = dict(specs)
    layers = dict(specs["layers"])
    for name in LAYER_LINEARS:
        if name in layers:
            k = tuple(layers[name]["kernel"])  # (layer, in, *out)
            layers[name] = quantized(layers[name], tree.get("layers", {}).get(name) if params else None,
                                     "kernel", P(k[0], *k[2:]))
    out["layers"] = layers
    emb = tuple(specs["embed"]["embedding"])  # (V, H)
    out["embed"] = quantized(specs["embed"], tree.get("embed") if params else None, "embedding",
                             P(emb[0] if emb else None))
    if "lm_head" in specs:
        head = tuple(specs["lm_head"]["kernel"])  # (H, V)
        out["lm_head"] = quantized(specs["lm_head"], tree.get("lm_head") if params else None, "kernel",
                                   P(head[1] if len(head) > 1 else None))
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
           "dequantize_params", "dequantize_groups", "pack_int4", "unpack_int4", "pack_params", "weight", "is_grouped", "harmonize", "quantize_rows", "int8_dot", "quantized_matmul", "embed_logits", "QuantDense", "QuantEmbed", "param_specs", "stored_dtypes", "param_bytes"]
