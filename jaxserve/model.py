"""The decoder (Llama, Mistral, Qwen2, Qwen3; Gemma 2/3; Qwen3-MoE, Mixtral) as a Flax Linen module.

Linen rather than NNX: the engine's step is a pure function ``(params, cache,
batch) -> (cache, tokens)`` that is jit-compiled once per bucket with the cache
donated, sharded with NamedSharding and saved with Orbax.  Linen keeps the
weights a plain dict pytree outside the module, which is exactly that shape,
with no split/merge of module state at each call.

The model runs one *ragged* step: ``T`` new tokens of many sequences packed back
to back.  Each layer writes the new tokens' K/V into the paged cache at
``slot_mapping`` and calls ``kernels_pallas.ragged_paged_attention``.  Logits are
computed only for the rows named by ``logits_indices`` (the last new token of
each sequence), not for every prompt token.

The layers run under one ``nn.scan`` (a ``lax.scan``): their weights are stacked
on a leading layer axis (``params["layers"]``) and the KV cache of all layers is
one array (``jaxserve/kv_cache.py``) carried through the loop, written in place
and read by layer index.  Compiling a step therefore costs about the same for 2
layers or 80.

Projections are fused: fewer, larger matmuls.  ``weights.py`` fuses the Hugging
Face tensors on load, in layouts that split over a tensor-parallel ``model``
mesh axis on one dimension for any number of shards dividing it:

* ``qkv_proj`` kernel ``[H, Hkv, G+2, D]``: for each KV head, its ``G = Hq/Hkv``
  query heads, then its K and V head (bias ``[Hkv, G+2, D]``).  Query head
  ``kv*G + g`` uses KV head ``kv``, the usual GQA order;
* ``gate_up_proj`` kernel ``[H, 2, I]``: gate then up.

Gemma adds norms around the attention output and the MLP (``sandwich_norms``),
``(1 + weight)`` RMSNorms, scaled embeddings, GeGLU, soft caps, and layers that
differ in their sliding window and RoPE base.  Those per-layer facts are small
constant tables indexed by the ``layer`` argument inside the layer body (a traced
scalar under the scan, or a Python int when layers are called one by one), so the
scan still compiles one body.  Mixture-of-experts layers replace the MLP with
routed experts (``jaxserve/moe.py``).

Both are contracted with ``dot_general`` on the n-d kernel, which on one device
is the same single matmul as a 2-d ``[H, N]`` kernel.  With a ``mesh``, the
cache write and the attention run under ``jax.shard_map`` over the ``model``
axis, each device on its KV heads (see ``jaxserve/sharding.py``); without one
(a single device) the code is exactly the unsharded program.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jax.sharding import Mesh, PartitionSpec as P

import numpy as np

from jaxserve import kv_cache, moe, quant
from jaxserve.config import ModelConfig
from jaxserve.sharding import DATA, MODEL, cache_spec as cache_spec_of, constrain, data_groups
from kernels_pallas import gemm_cpu, layer_cpu, ragged_paged_attention
from kernels_pallas.ragged_paged_attention import NO_WINDOW


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class AttentionMetadata:
    """Per-step ragged-batch metadata (vLLM names), all device arrays of fixed bucket shapes."""

    slot_mapping: jax.Array  # [T] flat cache slot of every new token; out of range for padding
    query_start_loc: jax.Array  # [S+1] cumulative query lengths
    seq_lens: jax.Array  # [S] kv length of each sequence including its new tokens
    block_tables: jax.Array  # [S, pages_per_seq] page table of each sequence
    num_seqs: jax.Array  # [] number of real sequences


def _init(std=0.02):
    return nn.initializers.normal(std)


def _dot_f32_accumulate(lhs, rhs, dimension_numbers, precision=None, **_):
    """The layers' matmuls: accumulate in float32, return the inputs' dtype.

    TPU and GPU accumulate bf16 products in f32 anyway, so there it changes nothing. XLA CPU, though,
    only has a fast bf16 matmul when the result is f32. A bf16-out dot is a slow loop there: the 56m
    model's 512 x 32000 LM head at 8 rows took 18 ms as a bf16-out dot and 1.2 ms with f32 output
    (jitted micro-benchmark, 2-core CPU)."""
    out = jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                              preferred_element_type=jnp.float32)
    return out.astype(lhs.dtype)


def _dot_f32_out(lhs, rhs, dimension_numbers, precision=None, **_):
    """The LM head's matmul: float32 logits straight from the f32 accumulator."""
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=jnp.float32)


def linear(features, quantization: str | None, dtype, use_bias: bool = False, dot_general=_dot_f32_accumulate,
           name: str | None = None, packed: bool = False) -> nn.Module:
    """A linear layer over the last axis: Flax's ``Dense``/``DenseGeneral`` (kernel ``[in, *features]``),
    or with ``quantization`` ("int8", "w8a8", "gguf") the same kernel in int8 with per-output-channel or
    group-wise scales (``jaxserve/quant.py``), or with ``packed`` (``matmul_impl="cpu"``) the float32 kernel
    in the CPU matmul kernel's layout (``PackedDense``)."""
    if packed:
        return PackedDense(features, use_bias=use_bias, name=name)
    if quantization:
        return quant.QuantDense(features, use_bias=use_bias, dtype=dtype, out_f32=dot_general is _dot_f32_out,
                                w8a8=quantization == "w8a8", name=name)
    cls = nn.Dense if isinstance(features, int) else nn.DenseGeneral
    return cls(features, use_bias=use_bias, dtype=dtype, param_dtype=dtype, kernel_init=_init(),
               dot_general=dot_general, name=name)


# The linear layers that ``matmul_impl="cpu"`` runs with the CPU matmul kernel (``PackedDense``).
PACKED_LINEARS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj", "lm_head")


class PackedDense(nn.Module):
    """A float32 linear layer over the last axis whose weight is held in the CPU matmul kernel's packed layout:
    ``packed_kernel [ceil(N/32), in, 32]`` for ``N = prod(features)`` (``kernels_pallas/gemm_cpu.py``), the
    ``kernel [in, *features]`` of a checkpoint as ``pack_linears`` converts it once at load, so that no step
    repacks the weights (XLA CPU's dot does, every call); in bfloat16 (rows in pairs, ``gemm_cpu.pack``)
    when its values all are.  The kernel serves every row count; ``rows`` (an int32 scalar, ``real_rows``)
    leaves a step's padding rows out (zeros)."""

    features: int | tuple[int, ...]
    use_bias: bool = False

    @nn.compact
    def __call__(self, x, rows=None):
        features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
        k, n = x.shape[-1], int(np.prod(features))
        if self.has_variable("params", "packed_kernel"):  # float32's or bfloat16's layout: gemm_cpu checks it
            w = self.get_variable("params", "packed_kernel")
        else:
            w = self.param("packed_kernel", lambda key: gemm_cpu.pack(_init()(key, (k, n), jnp.float32)))
        y = gemm_cpu.gemm_cpu(x.reshape(-1, k), w, n, rows=rows).reshape(x.shape[:-1] + features)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, features, jnp.float32)
        return y


def real_rows(meta: AttentionMetadata, decode_only: bool = False) -> jax.Array:
    """The rows of a step that hold tokens: the decode block (all its rows) and the prefill rows up to the
    last sequence's end (``query_start_loc[num_seqs]``); after them, the prefill bucket's padding.  A
    decode-only step (``decode_only``, static: the bucket has no prefill rows) has row i for slot i, and
    its decodes in the first slots: its rows up to the last decode (``sampled_slots``)."""
    return sampled_slots(meta) if decode_only else meta.query_start_loc[meta.num_seqs]


def sampled_slots(meta: AttentionMetadata) -> jax.Array:
    """The sequence slots up to the last that holds a sequence (``seq_lens > 0``): ``ModelRunner.prepare``
    fills the first of the decode slots, then the first of the prefill slots, so the slots after it (of a
    bucket larger than its step) need no LM head row; the CPU head computes only these (``rows``)."""
    s = meta.seq_lens.shape[0]
    return jnp.max(jnp.where(meta.seq_lens > 0, jnp.arange(1, s + 1, dtype=jnp.int32), 0))


def gemm_rows(layer: "DecoderLayer", x: jax.Array, meta: AttentionMetadata) -> jax.Array | None:
    """The rows of hidden states ``x`` [T, H] that ``layer``'s CPU matmuls compute this step (``real_rows``;
    a decode-only step's padding too when ``layer.fixed_shape``), or None: every row (XLA's dot)."""
    if layer.matmul_impl != "cpu":
        return None
    return real_rows(meta, x.shape[0] == layer.num_decode_rows and not layer.fixed_shape)


def pack_linears(params: dict, greedy_head: bool = False) -> dict:
    """The parameter tree of ``CausalLM(matmul_impl="cpu")``: each ``PACKED_LINEARS`` ``kernel [in, *features]``
    (stacked layers: ``[L, in, *features]``) as ``packed_kernel`` (``PackedDense``), packed on the host.
    ``greedy_head``: an LM head held in float32 also gets ``greedy_hi`` and ``greedy_slack``, what
    ``gemm_cpu.argmax_head`` reads (the runner's greedy steps: ``ModelRunner._step``)."""
    def walk(tree: dict, stacked: bool) -> dict:
        out = {}
        for key, v in tree.items():
            if key in PACKED_LINEARS and isinstance(v, dict) and "kernel" in v:
                out[key] = {k: x for k, x in v.items() if k != "kernel"}
                out[key]["packed_kernel"] = _pack_leaf(v["kernel"], stacked)
                if key == "lm_head" and greedy_head and not stacked:
                    out[key].update(_greedy_leaves(v["kernel"], out[key]["packed_kernel"]))
            else:
                out[key] = walk(v, stacked or key == "layers") if isinstance(v, dict) else v
        return out
    return walk(params, False)


def _pack_leaf(a: Any, stacked: bool) -> Any:
    lead = a.shape[:1] if stacked else ()
    k, n = a.shape[len(lead)], int(np.prod(a.shape[len(lead) + 1:]))
    if isinstance(a, jax.ShapeDtypeStruct):  # compile-only runs
        return jax.ShapeDtypeStruct(lead + gemm_cpu.packed_shape(k, n, a.dtype), a.dtype, sharding=a.sharding)
    host = np.asarray(a).reshape(lead + (k, n))
    # A weight whose float32 values are all bfloat16 values (a bf16 checkpoint run in float32) is held in
    # bf16: the same values and the same float32 arithmetic (gemm_cpu.bf16_exact), half the bytes a step reads.
    held = jnp.bfloat16 if gemm_cpu.bf16_exact(host) else jnp.float32
    packed = np.stack([gemm_cpu.pack(h, held) for h in host]) if stacked else gemm_cpu.pack(host, held)
    packed = np.ascontiguousarray(packed)
    return jax.device_put(packed, a.sharding) if isinstance(a, jax.Array) else packed


def _greedy_leaves(a: Any, packed: Any) -> dict:
    """``greedy_hi`` / ``greedy_slack`` of an LM head kernel ``a [in, vocab]`` held in float32 (none for one held
    in bfloat16, whose full product AMX already runs, or with a non-finite value)."""
    k, n = a.shape
    if packed.dtype != jnp.float32:
        return {}
    if isinstance(a, jax.ShapeDtypeStruct):  # compile-only runs
        return {"greedy_hi": jax.ShapeDtypeStruct(gemm_cpu.packed_shape(k, n, jnp.bfloat16), jnp.bfloat16,
                                                  sharding=a.sharding),
                "greedy_slack": jax.ShapeDtypeStruct((n,), jnp.float32, sharding=a.sharding)}
    host = np.asarray(a, np.float32)
    slack = gemm_cpu.greedy_slack(host)
    if slack is None:
        return {}
    out = {"greedy_hi": np.ascontiguousarray(gemm_cpu.greedy_hi(host)), "greedy_slack": slack}
    return {key: jax.device_put(x, a.sharding) for key, x in out.items()} if isinstance(a, jax.Array) else out


class RMSNorm(nn.Module):
    eps: float
    dtype: Any
    offset: float = 0.0  # Gemma: the weight is stored as (scale - 1); multiplied as (1 + weight) in float32

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.zeros if self.offset else nn.initializers.ones
        scale = self.param("scale", init, (x.shape[-1],), self.dtype)
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        if self.offset:
            return (xf * (self.offset + scale.astype(jnp.float32))).astype(self.dtype)
        return scale * xf.astype(self.dtype)


def per_layer(values, layer, fill=None):
    """``values[layer]`` of a per-layer table: a Python value when ``layer`` is a Python int (a layer
    called on its own), else an int32 scalar gathered from a constant table (the traced layer index
    of the scan), with ``fill`` for None entries."""
    if isinstance(layer, (int, np.integer)):
        return values[int(layer)]
    return jnp.asarray([fill if v is None else v for v in values], jnp.int32)[layer]


class MoEBlock(nn.Module):
    """Routed experts in place of the MLP (see ``jaxserve/moe.py``)."""

    cfg: ModelConfig
    dtype: Any
    mesh: Mesh | None = None
    impl: str = "auto"  # jaxserve.moe.MOE_IMPLS ("dense": every expert on every token, the reference)
    backend: str | None = None

    @nn.compact
    def __call__(self, h):
        cfg, dt = self.cfg, self.dtype
        e, hid, inter = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        logits = nn.Dense(e, use_bias=False, dtype=dt, param_dtype=dt, kernel_init=_init(),
                          dot_general=_dot_f32_out, name="router")(h)  # [T, E] float32
        weights, experts = moe.route(logits, cfg.num_experts_per_tok, cfg.norm_topk_prob)
        gate_up = self.param("gate_up", _init(), (e, hid, 2, inter), dt)  # [E, H, 2, I]
        down = self.param("down", _init(), (e, inter, hid), dt)  # [E, I, H]
        ffn = moe.expert_ffn(self.impl, self.backend)
        mesh = self.mesh
        if self.impl == "dense" or mesh is None or mesh.shape[MODEL] == 1:
            return ffn(h, weights, experts, gate_up, down, cfg.hidden_act).astype(dt)

        def local_experts(x, w, ids, gu, dn):
            # This device's E/M experts (expert parallel): their copies of the tokens, summed over devices.
            offset = jax.lax.axis_index(MODEL) * gu.shape[0]
            out = ffn(x, w, ids, gu, dn, cfg.hidden_act, expert_offset=offset)
            return jax.lax.psum(out, MODEL)

        experts_spec = P(MODEL)
        out = jax.shard_map(local_experts, mesh=mesh, in_specs=(P(), P(), P(), experts_spec, experts_spec),
                            out_specs=P(), check_vma=False)(h, weights, experts, gate_up, down)
        return out.astype(dt)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotary embedding in the Hugging Face (rotate-half) layout; x [T, H, D], cos/sin [T, D]."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[:, None, :].astype(x.dtype), sin[:, None, :].astype(x.dtype)
    return x * cos + rotated * sin


def write_and_attend(q: jax.Array, k: jax.Array, v: jax.Array, cache: jax.Array, layer: jax.Array,
                     meta: AttentionMetadata, window: jax.Array | None = None, *, sm_scale: float,
                     num_decode_rows: int, sliding_window: int | None, soft_cap: float | None, impl: str,
                     backend: str | None):
    """Write the new tokens' K/V of ``layer`` into the cache at ``meta.slot_mapping``, then ragged paged
    attention over that layer's pages.

    q [T, Hq, D], k/v [T, Hkv, D], cache [L, Hkv, pages, page_size, 2D] (a device's local heads under
    shard_map; int8: the (kv, scales) pair, quantized on write).  ``window`` (an int32 scalar, may be traced: this layer's window when layers differ)
    overrides the static ``sliding_window``.  Returns (attention output [T, Hq, D], cache)."""
    cache = kv_cache.write_kv(cache, layer, k, v, meta.slot_mapping)
    attn = paged_attention(q, cache, layer, meta, window, sm_scale=sm_scale, num_decode_rows=num_decode_rows,
                           sliding_window=sliding_window, soft_cap=soft_cap, impl=impl, backend=backend)
    return attn, cache


def paged_attention(q: jax.Array, cache: jax.Array, layer: jax.Array, meta: AttentionMetadata,
                    window: jax.Array | None = None, *, sm_scale: float, num_decode_rows: int,
                    sliding_window: int | None, soft_cap: float | None, impl: str, backend: str | None):
    """Ragged paged attention of ``layer`` over pages already written (``write_and_attend``'s second half)."""
    return ragged_paged_attention(
        q, cache, layer, meta.seq_lens, meta.block_tables, meta.query_start_loc, meta.num_seqs,
        sm_scale=sm_scale, num_decode_rows=num_decode_rows,
        sliding_window=sliding_window if window is None else window, soft_cap=soft_cap, impl=impl,
        backend=backend)


def _group_local(attend):
    """``attend`` on one data group's shard: its metadata's leading group axis (of size 1 there) dropped."""
    def local(q, k, v, cache, layer, meta: AttentionMetadata, *window):
        meta = AttentionMetadata(slot_mapping=meta.slot_mapping, query_start_loc=meta.query_start_loc[0],
                                 seq_lens=meta.seq_lens[0], block_tables=meta.block_tables[0],
                                 num_seqs=meta.num_seqs[0])
        return attend(q, k, v, cache, layer, meta, *window)
    return local


class DecoderLayer(nn.Module):
    """One decoder layer: ``pre_attention`` (norm, fused QKV projection, q/k norms, RoPE), the paged
    attention of ``attend`` (no weights), then ``post_attention`` (output projection, MLP or routed
    experts, residuals, Gemma's extra norms).  The two weighted halves are separate methods so that the
    CPU layer loop can pick each layer's weights around one shared attention (``CausalLM``,
    ``layer_loop="switch"``).  Per-layer facts (window, RoPE table) come from the ``layer`` index: a
    traced scalar under the scan, or a Python int."""

    cfg: ModelConfig
    dtype: Any
    attention_impl: str
    num_decode_rows: int
    mesh: Mesh | None = None
    backend: str | None = None
    moe_impl: str = "auto"
    quantization: str | None = None  # "int8" / "w8a8": int8 linear layers (jaxserve/quant.py)
    matmul_impl: str = "xla"  # "cpu": the linear layers' weights packed for kernels_pallas/gemm_cpu.py (PackedDense)
    fixed_shape: bool = False  # a decode-only step computes every row of its bucket (static batching), see real_rows

    def setup(self):
        cfg, dt, qz = self.cfg, self.dtype, self.quantization
        dense = functools.partial(linear, quantization=qz, dtype=dt, packed=self.matmul_impl == "cpu")
        hkv, g, d = cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads, cfg.head_dim
        norm = functools.partial(RMSNorm, cfg.rms_norm_eps, dt, cfg.norm_offset)
        self.input_norm = norm()
        # qkv: [T, Hkv, G+2, D]
        self.qkv_proj = dense((hkv, g + 2, d), use_bias=cfg.attention_bias)
        if cfg.qk_norm:
            self.q_norm = norm()
            self.k_norm = norm()
        self.o_proj = dense(cfg.hidden_size)
        # Llama: the norm before the MLP; Gemma (sandwich_norms): the norm of the attention output, with
        # pre/post feed-forward norms around the MLP.  Both are HF's post_attention_layernorm.
        self.post_attention_norm = norm()
        if cfg.sandwich_norms:
            self.pre_feedforward_norm = norm()
            self.post_feedforward_norm = norm()
        if cfg.is_moe:
            self.moe = MoEBlock(cfg, dt, self.mesh, self.moe_impl, self.backend)
        else:
            self.gate_up_proj = dense((2, cfg.intermediate_size))  # [T, 2, I]
            self.down_proj = dense(cfg.hidden_size)

    def _linear(self, layer: nn.Module, x, rows):
        """``layer(x)``; a ``PackedDense`` (``matmul_impl="cpu"``) computes only ``rows`` rows (``real_rows``)."""
        return layer(x, rows) if self.matmul_impl == "cpu" else layer(x)

    def pre_attention(self, x, cos, sin, rows=None):
        """Hidden states [T, H] -> q [T, Hq, D], k, v [T, Hkv, D] (rotated with this layer's cos/sin,
        see ``layer_rope``).  ``rows``: the step's ``real_rows`` (or None: all)."""
        cfg = self.cfg
        t, hq, d, g = x.shape[0], cfg.num_heads, cfg.head_dim, cfg.num_heads // cfg.num_kv_heads
        qkv = self._linear(self.qkv_proj, self.input_norm(x), rows)
        q = qkv[:, :, :g].reshape(t, hq, d)
        k, v = qkv[:, :, g], qkv[:, :, g + 1]
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def post_attention(self, x, attn, rows=None):
        """Residual stream [T, H] and attention output [T, Hq, D] -> the layer's output [T, H]."""
        cfg, mesh = self.cfg, self.mesh
        attn = constrain(attn.reshape(x.shape[0], -1), mesh, DATA, MODEL)
        attn = self._linear(self.o_proj, attn, rows)
        if cfg.sandwich_norms:  # Gemma: the attention output is normed before the residual add
            attn = self.post_attention_norm(attn)
        x = constrain(x + attn, mesh, DATA, None)
        h = (self.pre_feedforward_norm if cfg.sandwich_norms else self.post_attention_norm)(x)
        if cfg.is_moe:
            mlp = self.moe(h)
        else:
            gate_up = self._linear(self.gate_up_proj, h, rows)
            mlp = self._linear(self.down_proj, moe.activation(cfg.hidden_act)(gate_up[:, 0]) * gate_up[:, 1], rows)
        if cfg.sandwich_norms:
            mlp = self.post_feedforward_norm(mlp)
        return constrain(x + mlp, mesh, DATA, None)

    def _window(self, layer) -> tuple[int | None, jax.Array | None]:
        """This layer's sliding window: (static window, None), or (None, traced window) when the layers
        differ in it and ``layer`` is traced."""
        windows = self.cfg.layer_windows()
        if not self.cfg.mixed_windows:
            return windows[0], None
        w = per_layer(windows, layer, fill=NO_WINDOW)
        return (None, w) if isinstance(w, jax.Array) else (w, None)

    def _attention_opts(self, static_window: int | None) -> dict:
        return dict(sm_scale=self.cfg.attn_scale, sliding_window=static_window, soft_cap=self.cfg.attn_logit_softcap,
                    impl=self.attention_impl, backend=self.backend)

    def attend(self, q, k, v, cache, layer, meta: AttentionMetadata):
        """Write the new K/V of ``layer`` and attend over its pages (per KV-head shard on a mesh), with
        this layer's sliding window: one for every layer (static), or looked up by ``layer``."""
        mesh = self.mesh
        static_window, window = self._window(layer)
        groups = data_groups(mesh)
        attend = functools.partial(write_and_attend, **self._attention_opts(static_window),
                                   num_decode_rows=self.num_decode_rows // groups)
        args = (q, k, v, cache, layer, meta) + (() if window is None else (window,))
        if mesh is not None:
            # Each device writes and attends with its own KV heads (and their query groups).  One data
            # group: the token rows are gathered from the data axis, as attention needs every row of a
            # sequence.  Data-parallel attention (data groups): each group's devices take its block of
            # rows, its shard of the pages and its metadata (a leading group axis, dropped inside).
            heads = P(DATA if groups > 1 else None, MODEL, None)
            meta_spec = P(DATA) if groups > 1 else P()
            cache_spec = cache_spec_of(mesh, cache)  # one spec, or the int8 (kv, scales) pair's
            specs = (heads, heads, heads, cache_spec, P(), meta_spec) + (() if window is None else (P(),))
            attend = jax.shard_map(_group_local(attend) if groups > 1 else attend, mesh=mesh, in_specs=specs,
                                   out_specs=(heads, cache_spec), check_vma=False)
        return attend(*args)

    def attend_rows(self, q, cache, layer, meta: AttentionMetadata, query_rows=None):
        """Attention of ``layer`` over pages already written (one device, no mesh): of every row, or of only
        the rows ``query_rows`` names, each the last new token of the sequence slot at its index
        (``logits_indices``), so one query row per slot over the slot's pages: a decode-shaped call."""
        static_window, window = self._window(layer)
        num_decode_rows = self.num_decode_rows
        if query_rows is not None:
            q, num_decode_rows = q[query_rows], query_rows.shape[0]
            meta = dataclasses.replace(meta, query_start_loc=jnp.arange(num_decode_rows + 1, dtype=jnp.int32))
        return paged_attention(q, cache, layer, meta, window, **self._attention_opts(static_window),
                               num_decode_rows=num_decode_rows)

    def __call__(self, carry: tuple[jax.Array, jax.Array], layer: jax.Array, cos, sin, meta: AttentionMetadata):
        """One layer as a scan body: ``carry`` is (hidden states [T, H], the cache of all layers),
        ``layer`` this layer's index (scanned, or a Python int), the rest broadcast to every layer.
        ``cos``/``sin`` as ``rope_tables`` gives them."""
        x, cache = carry
        rows = gemm_rows(self, x, meta)
        q, k, v = self.pre_attention(x, *layer_rope(self.cfg, cos, sin, layer), rows)
        attn, cache = self.attend(q, k, v, cache, layer, meta)
        return (self.post_attention(x, attn, rows), cache), None


def layer_rope(cfg: ModelConfig, cos, sin, layer):
    """This layer's cos/sin: ``rope_tables``' ``[T, D]`` tables, or of its ``[2, T, D]`` (global, local)
    the local one on sliding layers (Gemma 3)."""
    local_rope = cfg.layer_local_rope()
    if local_rope is None:
        return cos, sin
    which = per_layer([int(v) for v in local_rope], layer)
    return cos[which], sin[which]


def resolve_layer_loop(layer_loop: str, platform: str, mesh: Mesh | None = None) -> str:
    """``auto``: ``switch`` on one CPU device, ``scan`` elsewhere (a CPU mesh of virtual devices stands in
    for a TPU mesh, so it runs the program a TPU runs).

    ``scan``: each iteration slices its layer's weights out of the stacked arrays.  XLA TPU and GPU feed the
    slice to the matmul in place; XLA CPU copies it first, every layer of every step (11.8 MB per layer for
    the 56m model: a 32-sequence decode step went from 16.5 to 21 ms, ``bench/step_profile.py``).
    ``switch``: the same scan, but each layer's weights are their own buffers (``unstack_layers``), and the
    body picks them with a ``lax.switch`` over the layers around the weighted halves of the layer, which
    XLA CPU runs on the buffers in place.  The attention is still compiled once; an unrolled loop
    compiled 4-8x longer for SmolLM2's 30 layers."""
    if layer_loop == "auto":
        return "switch" if platform == "cpu" and mesh is None else "scan"
    return layer_loop


def unstack_layers(params: dict, num_layers: int) -> dict:
    """``params["layers"]`` (stacked on a leading layer axis) -> ``params["layers_0"]`` ... as separate
    arrays: the parameter tree of ``CausalLM(layer_loop="switch")``."""
    leaves, treedef = jax.tree_util.tree_flatten(params["layers"])
    parts = [_split_layers(a, num_layers) for a in leaves]
    out = {k: v for k, v in params.items() if k != "layers"}
    for i in range(num_layers):
        out[f"layers_{i}"] = jax.tree_util.tree_unflatten(treedef, [p[i] for p in parts])
    return out


def _split_layers(a: Any, num_layers: int) -> list:
    """One stacked leaf -> its ``num_layers`` slices. A single-device array is sliced on the host: an eager
    ``a[i]`` compiles one XLA program per layer and leaf (13 s of SmolLM2's warm start, 180 slices)."""
    if isinstance(a, jax.ShapeDtypeStruct):  # compile-only runs
        sharding = a.sharding
        if isinstance(sharding, jax.sharding.NamedSharding):  # drop the layer axis
            sharding = jax.sharding.NamedSharding(sharding.mesh, P(*sharding.spec[1:]))
        return [jax.ShapeDtypeStruct(a.shape[1:], a.dtype, sharding=sharding)] * num_layers
    if isinstance(a, jax.Array) and a.is_fully_addressable and len(a.devices()) == 1:
        host = np.asarray(a)
        return [jax.device_put(host[i], a.sharding) for i in range(num_layers)]
    return [a[i] for i in range(num_layers)]


class CausalLM(nn.Module):
    """Decoder + LM head over one ragged batch of new tokens."""

    cfg: ModelConfig
    dtype: Any = jnp.float32
    attention_impl: str = "reference"
    num_decode_rows: int = 0  # static: rows 0..D-1 are single-token sequences 0..D-1 (of each data group: D/groups)
    mesh: Mesh | None = None  # a (data, model) mesh: sharded step (see jaxserve/sharding.py)
    backend: str | None = None  # platform compiled for (default: jax.default_backend())
    layer_loop: str = "scan"  # "scan" (params["layers"] stacked) or "switch" (params["layers_{i}"])
    moe_impl: str = "auto"  # mixture-of-experts FFN (jaxserve.moe.MOE_IMPLS); "dense" is the reference
    return_hidden: bool = False  # also return every row's last hidden state [T, hidden] (prompt logprobs)
    quantization: str | None = None  # "int8" / "w8a8": int8 weights + per-channel scales (jaxserve/quant.py)
    skip_head: bool = False  # return (None, cache, hidden): the caller runs ``head_logits`` on rows of its choice
    matmul_impl: str = "xla"  # "cpu": PACKED_LINEARS by kernels_pallas/gemm_cpu.py (params: pack_linears)
    # "switch" loop: the last layer past its K/V only for the rows of logits_indices (see _last_layer)
    sampled_last_layer: bool = False
    defer_head: bool = False  # return the LM head's input (the sampled rows, final-normed) for the logits
    # static batching: a decode-only step computes its whole bucket, finished members' idle slots included,
    # as a fixed-shape batch does (else it computes its rows up to the last decode: real_rows)
    fixed_shape: bool = False
    # "fused": each layer (with "switch" and matmul_impl="cpu") in one call, kernels_pallas/layer_cpu.py
    layer_impl: str = "ops"

    @nn.compact
    def __call__(self, input_ids, positions, cache: jax.Array, meta: AttentionMetadata, logits_indices,
                 every_row=None):
        """``every_row`` (a traced bool, with ``sampled_last_layer``): run the last layer for every row this
        step, as ``return_hidden``'s prompt logprobs need; None: only for the sampled rows."""
        cfg, dt = self.cfg, self.dtype
        if self.quantization:
            embed = quant.QuantEmbed(cfg.vocab_size, cfg.hidden_size, dt, self.quantization == "w8a8", name="embed")
        else:
            embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dt, param_dtype=dt,
                             embedding_init=_init(), name="embed")
        x = embed(input_ids)
        if cfg.embed_scale is not None:  # Gemma: sqrt(hidden), rounded to the weights' dtype as HF does
            x = x * jnp.asarray(cfg.embed_scale, dt)
        x = constrain(x, self.mesh, DATA, None)
        cos, sin = rope_tables(cfg, positions)
        layer_args = (cfg, dt, self.attention_impl, self.num_decode_rows, self.mesh, self.backend, self.moe_impl,
                      self.quantization, self.matmul_impl, self.fixed_shape)
        steps = jnp.arange(cfg.num_layers, dtype=jnp.int32)
        sampled = False
        if self.layer_loop == "scan":
            layers = nn.scan(DecoderLayer, variable_axes={"params": 0}, split_rngs={"params": True},
                             in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast), length=cfg.num_layers)
            (x, cache), _ = layers(*layer_args, name="layers")((x, cache), steps, cos, sin, meta)
        else:  # "switch": per-layer weight buffers params["layers_{i}"] (see resolve_layer_loop)
            if self.is_initializing():
                raise ValueError("layer_loop: 'switch' applies existing per-layer weights; initialize with "
                                 "'scan' and split them with unstack_layers")
            layer = DecoderLayer(*layer_args)
            weights = [{"params": self.variables["params"][f"layers_{i}"]} for i in range(cfg.num_layers)]
            rows = gemm_rows(layer, x, meta)

            def body(carry, i):
                x, cache = carry
                q, k, v = jax.lax.switch(i, [functools.partial(layer.apply, w, method="pre_attention")
                                             for w in weights], x, *layer_rope(cfg, cos, sin, i), rows)
                attn, cache = layer.attend(q, k, v, cache, i, meta)
                x = jax.lax.switch(i, [functools.partial(layer.apply, w, method="post_attention")
                                       for w in weights], x, attn, rows)
                return (x, cache), None

            sampled = (self.sampled_last_layer and not self.skip_head and self.mesh is None
                       and logits_indices.shape[0] < x.shape[0])
            # "fused": one call a layer, unrolled (each its own weight buffers); op by op where gemm_cpu
            # would take AMX for this many rows (layer_cpu.serves_rows)
            if self.layer_impl == "fused" and layer_cpu.serves_rows(x.shape[0], [w["params"] for w in weights]):
                for i in range(cfg.num_layers - sampled):
                    x, cache = layer_cpu.decoder_layer_cpu(
                        x, weights[i]["params"], cos, sin, cache, i, meta.slot_mapping, meta.seq_lens,
                        meta.block_tables, meta.query_start_loc, meta.num_seqs, rows, num_heads=cfg.num_heads,
                        intermediate_size=cfg.intermediate_size, eps=cfg.rms_norm_eps, sm_scale=cfg.attn_scale)
            else:
                (x, cache), _ = jax.lax.scan(body, (x, cache), steps[:cfg.num_layers - sampled])
            if sampled:
                x, hidden, cache = _last_layer(layer, weights[-1], x, cache, cos, sin, meta, logits_indices, rows,
                                               every_row)
        if not sampled:
            hidden = x
            if self.skip_head:
                return None, cache, hidden
            x = x[logits_indices]
        x = RMSNorm(cfg.rms_norm_eps, dt, cfg.norm_offset, name="final_norm")(x)
        if self.defer_head:
            return x, cache, hidden
        if cfg.tie_word_embeddings and self.quantization:
            logits = embed.attend(x)
        elif cfg.tie_word_embeddings:
            logits = _dot_f32_out(x, embed.embedding, (((1,), (1,)), ((), ())))
        else:
            logits = linear(cfg.vocab_size, self.quantization, dt, dot_general=_dot_f32_out, name="lm_head",
                            packed=self.matmul_impl == "cpu")(x)
        # The LM head runs vocab-parallel (each device its slice of the vocabulary); then sampling
        # sees whole rows: the [S, V] logits, not the [H, V] weights, are gathered onto every device.
        logits = constrain(logits, self.mesh, None, MODEL)
        if cfg.final_logit_softcap is not None:
            cap = cfg.final_logit_softcap
            logits = cap * jnp.tanh(logits.astype(jnp.float32) / cap)
        logits = constrain(logits.astype(jnp.float32), self.mesh, None, None)
        if self.return_hidden:
            return logits, cache, hidden
        return logits, cache


def _last_layer(layer: DecoderLayer, weights: dict, x, cache, cos, sin, meta: AttentionMetadata, logits_indices,
                rows, every_row):
    """The last layer of a step with prompt rows, where only the sampled rows (``logits_indices``: each
    sequence slot's last new token) go on to the LM head: every row's K/V is computed and written, but the
    attention, output projection and MLP run on the sampled rows only (the other rows' outputs would feed
    nothing).  Exact: each sampled row's value is what the full layer gives it.  For the 56m model that
    leaves out 10% of a prompt token's matmul FLOPs; every layer but the last needs all rows, as its output
    feeds the next layer's K/V.  ``every_row`` (traced bool or None): when true, the full layer (prompt
    logprobs read every row's hidden state).  Returns (sampled rows [S, H], hidden [T, H]: every row's
    output when ``every_row``, else the layer's input, unused, and the cache)."""
    last = layer.cfg.num_layers - 1
    q, k, v = layer.apply(weights, x, *layer_rope(layer.cfg, cos, sin, last), rows, method="pre_attention")
    cache = kv_cache.write_kv(cache, last, k, v, meta.slot_mapping)

    def sampled_rows():
        attn = layer.attend_rows(q, cache, last, meta, logits_indices)
        real = None if rows is None else meta.num_seqs  # the slots past num_seqs are padding
        return layer.apply(weights, x[logits_indices], attn, real, method="post_attention"), x

    def all_rows():
        out = layer.apply(weights, x, layer.attend_rows(q, cache, last, meta), rows, method="post_attention")
        return out[logits_indices], out

    if every_row is None:
        return *sampled_rows(), cache
    return *jax.lax.cond(every_row, all_rows, sampled_rows), cache


def head_logits(cfg: ModelConfig, params: dict, hidden: jax.Array, dtype: Any,
                quantization: str | None = None, mesh: Mesh | None = None) -> jax.Array:
    """``CausalLM``'s final norm, LM head and final soft cap on hidden states of any rows ([N, hidden] ->
    float32 [N, V]): the logits of every prompt position (prompt logprobs), of the verified rows of
    speculative decoding.  With ``mesh``, computed vocab-parallel and gathered as ``CausalLM`` does."""
    x = RMSNorm(cfg.rms_norm_eps, dtype, cfg.norm_offset).apply({"params": params["final_norm"]}, hidden)
    head = params["embed"] if cfg.tie_word_embeddings else params["lm_head"]
    if "scale" in head:  # int8 weights (jaxserve/quant.py; group-wise with a zero point: GGUF blocks)
        w8a8 = quantization == "w8a8"
        logits = (quant.embed_logits(x, head["embedding"], head["scale"], w8a8, head.get("zero"))
                  if cfg.tie_word_embeddings
                  else quant.quantized_matmul(x, head["kernel"], head["scale"], jnp.float32, w8a8, head.get("zero")))
    elif cfg.tie_word_embeddings:
        logits = _dot_f32_out(x, params["embed"]["embedding"], (((1,), (1,)), ((), ())))
    elif "packed_kernel" in head:  # matmul_impl="cpu" (PackedDense)
        logits = gemm_cpu.gemm_cpu(x, head["packed_kernel"], cfg.vocab_size)
    else:
        logits = _dot_f32_out(x, params["lm_head"]["kernel"], (((1,), (0,)), ((), ())))
    logits = constrain(logits, mesh, None, MODEL)
    if cfg.final_logit_softcap is not None:
        logits = cfg.final_logit_softcap * jnp.tanh(logits.astype(jnp.float32) / cfg.final_logit_softcap)
    return constrain(logits.astype(jnp.float32), mesh, None, None)


def rope_tables(cfg: ModelConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos/sin ``[T, D]`` of the positions, or ``[2, T, D]`` (global, local) when the sliding layers
    have a RoPE of their own (each layer picks its table by index)."""
    def tables(inv_freq):
        angles = positions.astype(jnp.float32)[:, None] * jnp.asarray(inv_freq)[None, :]
        angles = jnp.concatenate([angles, angles], axis=-1)
        return jnp.cos(angles), jnp.sin(angles)

    cos, sin = tables(cfg.inv_freq())
    if cfg.layer_local_rope() is not None:
        cos_l, sin_l = tables(cfg.inv_freq(local=True))
        cos, sin = jnp.stack([cos, cos_l]), jnp.stack([sin, sin_l])
    return cos, sin
