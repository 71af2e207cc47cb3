"""A whole Llama-shaped decoder layer on the CPU in one call: a C++ kernel behind ``jax.ffi``
(``csrc/layer_cpu/``), built from the matmul kernel's (``gemm_cpu.py``) and the attention kernel's
(``ragged_paged_attention_cpu.py``) code.

The layer op by op (``jaxserve.model.DecoderLayer`` with ``matmul_impl="cpu"``, ``attention_impl="cpu"``) is
five custom calls and about six XLA loops: the norms, RoPE, the cache write, SwiGLU and the residual adds.
Each call schedules its helper on XLA's pool at its start, the second core is slow to start from a halt, and
XLA runs the small loops on one thread; ``bench/step_profile.py --batches 64 --contexts 256`` (56m, 2-core
EPYC) found 15% of a 64-row decode step outside the kernels.  Here one call runs the layer's ten phases on
the calling thread and its helpers, with a spin wait at each phase's end (``csrc/layer_cpu/layer_cpu.cc``).
The matmuls are ``gemm_cpu``'s sums bit for bit (its AVX-512 / AVX2 path); the norms, RoPE and SwiGLU round as
float32 code does, not as XLA's loops do (last bits).  On a CPU with AMX, ``gemm_cpu`` takes the AMX path from
``AMX_MIN_ROWS`` rows (prompt chunks), which this kernel does not have: a step with that many rows runs its
layers op by op (``serves_rows``), the others here.  Measured (README, "A decoder layer in one call"): 2-6% off
64-row decode steps, about 1% off 32-row ones, nothing measurable off prompt steps or small decode steps.

``layer_impl="auto"`` (``resolve_layer``) takes it where the model is Llama-shaped (RMSNorm, no q/k norms, no
biases, SiLU, no sliding window or soft cap, dense MLP), the weights are packed (``matmul_impl="cpu"``), the
attention is the CPU kernel's on a float32 cache, on one device, and the extension is built.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from kernels_pallas import gemm_cpu
from kernels_pallas.ffi_extension import load_extension
from kernels_pallas.ragged_paged_attention import NO_WINDOW

TARGET = "jaxserve_decoder_layer_cpu"
LAYER_IMPLS = ("auto", "fused", "ops")


@functools.lru_cache(maxsize=None)
def _load() -> tuple[object | None, str | None]:
    """(the extension module, None) once its handler is registered with XLA, or (None, why not)."""
    return load_extension("_layer_cpu", lambda m: None if m.serves() else "this CPU has neither AVX-512 nor AVX2/FMA")


def unsupported_reason(cfg, *, matmul_impl: str, attention_impl: str, kv_dtype, mesh=None,
                       quantization: str | None = None, layer_loop: str = "switch") -> str | None:
    """Why the fused layer cannot run this model and step, or None when it can."""
    if layer_loop != "switch":
        return f"the layers run in a {layer_loop} loop, not switch (per-layer weight buffers)"
    if matmul_impl != "cpu":
        return f"the matmuls are {matmul_impl}'s, not the CPU kernel's (matmul_impl)"
    if attention_impl != "cpu":
        return f"the attention is {attention_impl}'s, not the CPU kernel's (attention_impl)"
    if mesh is not None:
        return "the step runs on a device mesh"
    if quantization:
        return f"the weights are quantized ({quantization})"
    if np.dtype(kv_dtype) != np.float32:
        return f"the KV cache is {np.dtype(kv_dtype).name}, not float32"
    shape = [(cfg.is_moe, "routed experts"), (cfg.qk_norm, "q/k norms"), (cfg.sandwich_norms, "sandwich norms"),
             (cfg.attention_bias, "attention biases"), (cfg.norm_offset, "an offset norm weight"),
             (cfg.hidden_act not in ("silu", "swish"), f"activation {cfg.hidden_act}"),
             (cfg.attn_logit_softcap is not None, "an attention soft cap"),
             (any(w is not None for w in cfg.layer_windows()), "a sliding window"),
             (cfg.layer_local_rope() is not None, "per-layer RoPE tables"),
             (cfg.head_dim % 8 != 0, f"head_dim {cfg.head_dim} (a multiple of 8)")]
    for bad, what in shape:
        if bad:
            return f"the model has {what}"
    return _load()[1]


def serves_rows(num_rows: int, layers: list[dict]) -> bool:
    """Whether a step of ``num_rows`` rows (its bucket's, static) runs its layers in this kernel, with the layers'
    parameter trees ``layers``.  On a CPU with AMX, ``gemm_cpu`` takes the AMX path from ``AMX_MIN_ROWS`` rows
    (by the weights' dtype: prompt chunks), which this kernel does not run; such a step goes op by op, so that
    every step computes the sums ``gemm_cpu`` gives it (below that, both are its AVX-512 path, bit for bit)."""
    if "amx" not in gemm_cpu.available_isas():
        return True
    dtypes = {jnp.dtype(layer[name]["packed_kernel"].dtype).name for layer in layers
              for name in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")}
    return num_rows < min(gemm_cpu.AMX_MIN_ROWS[d] for d in dtypes)


def resolve_layer(layer_impl: str, cfg, **kw) -> str:
    """``"fused"`` (this kernel) or ``"ops"`` (the layer op by op).  ``auto``: fused where it can serve
    (``unsupported_reason``); ``fused`` raises where it cannot."""
    if layer_impl not in LAYER_IMPLS:
        raise ValueError(f"layer_impl: must be one of {', '.join(LAYER_IMPLS)}, got {layer_impl!r}")
    if layer_impl == "ops":
        return "ops"
    why = unsupported_reason(cfg, **kw)
    if why is None:
        return "fused"
    if layer_impl == "fused":
        raise ValueError(f"layer_impl: the fused CPU layer cannot serve: {why}")
    return "ops"


def decoder_layer_cpu(x: jax.Array, params: dict, cos: jax.Array, sin: jax.Array, cache: jax.Array, layer: int,
                      slot_mapping, kv_lens, page_indices, cu_q_lens, num_seqs, rows, *, num_heads: int,
                      intermediate_size: int, eps: float, sm_scale: float, num_threads: int = 0) -> tuple[jax.Array, jax.Array]:
    """One decoder layer: ``x [T, H]`` -> (``x`` after the layer, the cache with this layer's new K/V written at
    ``slot_mapping``).  ``params``: the layer's parameter tree as ``DecoderLayer`` holds it with packed weights
    (``input_norm``, ``qkv_proj``, ``o_proj``, ``post_attention_norm``, ``gate_up_proj``, ``down_proj``).
    ``cos``/``sin [T, D]`` as ``rope_tables`` gives them; ``cache [L, Hkv, pages, page_size, 2D]`` float32
    (aliased: donate it); ``layer`` a Python int; the metadata as ``ragged_paged_attention``'s; ``rows`` (int32
    scalar, may be traced): the rows computed (``model.real_rows``), the rest pass through unchanged."""
    _, reason = _load()
    if reason is not None:
        raise RuntimeError(f"layer_impl: the fused CPU layer is unavailable: {reason}")
    if x.dtype != jnp.float32 or cache.dtype != jnp.float32:
        raise ValueError(f"decoder_layer_cpu: x and the cache must be float32, got {x.dtype} and {cache.dtype}")
    call = jax.ffi.ffi_call(TARGET, (jax.ShapeDtypeStruct(x.shape, jnp.float32), jax.ShapeDtypeStruct(cache.shape,
                                                                                                    cache.dtype)),
                            input_output_aliases={9: 1}, vmap_method="sequential")
    i32 = functools.partial(jnp.asarray, dtype=jnp.int32)
    return call(x, params["input_norm"]["scale"].astype(jnp.float32), params["qkv_proj"]["packed_kernel"],
                params["o_proj"]["packed_kernel"], params["post_attention_norm"]["scale"].astype(jnp.float32),
                params["gate_up_proj"]["packed_kernel"], params["down_proj"]["packed_kernel"], cos.astype(jnp.float32), sin.astype(jnp.float32),
                cache, i32(slot_mapping), i32(kv_lens), i32(page_indices), i32(cu_q_lens), i32(num_seqs), i32(rows),
                layer=np.int64(layer), num_heads=np.int64(num_heads), intermediate_size=np.int64(intermediate_size),
                eps=np.float32(eps), sm_scale=np.float32(sm_scale), window=np.int64(NO_WINDOW),
                num_threads=np.int64(num_threads))
