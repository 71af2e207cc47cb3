"""Ragged paged attention on the CPU: a C++ kernel behind ``jax.ffi`` (``csrc/attention_cpu/``).

Same arguments and semantics as ``ragged_paged_attention_ref``; it reads the engine's cache
(``jaxserve/kv_cache.py``) in place, page by page, with an online softmax per (rows of a sequence, KV
head) and the GQA group's query heads together, in float32, vectorised with AVX2/FMA when the CPU has
them (a portable path otherwise), its work items spread over the cores on XLA's CPU thread pool.

The kernel is the extension module ``kernels_pallas._attention_cpu``, built by ``pip install -e .``
(``setup.py``).  When it is missing (not built, or built for another Python), ``cpu_unavailable_reason()``
says why and ``attention_impl="auto"`` runs the reference instead.  Caches it does not read (int8 with
scales, fp8) are for the reference too (``cpu_unsupported_reason``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from kernels_pallas.ffi_extension import load_extension
from kernels_pallas.ragged_paged_attention import NO_WINDOW, ragged_paged_attention_ref, split_cache

TARGET = "jaxserve_ragged_paged_attention_cpu"
ISAS = {"auto": 0, "portable": 1, "avx2": 2, "avx512": 3}  # the kernel's ``isa`` attribute
_CACHE_TYPES = {"float32": 0, "bfloat16": 1, "float16": 2}  # the cache's value dtype -> ``cache_type``


@functools.lru_cache(maxsize=None)
def _load() -> tuple[object | None, str | None]:
    """(the extension module, None) once its handler is registered with XLA, or (None, why not)."""
    return load_extension("_attention_cpu")


def cpu_unavailable_reason() -> str | None:
    """Why the CPU kernel cannot run in this process (the extension is not built), or None."""
    return _load()[1]


def best_isa() -> str:
    """The instruction set the kernel picks on this CPU: ``"avx512"`` (AVX2, and AVX-512 for the decode rows
    of a float32 cache), ``"avx2"`` or ``"portable"``."""
    module, reason = _load()
    if module is None:
        raise RuntimeError(reason)
    return module.best_isa()


def cpu_unsupported_reason(*, head_dim: int, num_q_heads: int, num_kv_heads: int, dtype, kv_dtype=None,
                           **_) -> str | None:
    """Why the CPU kernel cannot serve this shape and cache, or None when it can."""
    value = np.dtype(kv_dtype if kv_dtype is not None else dtype)
    if value.name not in _CACHE_TYPES:
        return f"KV cache dtype {value.name} (the CPU kernel reads float32, bfloat16 and float16 caches)"
    if head_dim % 8:
        return f"head_dim {head_dim} is not a multiple of 8"
    if num_q_heads % num_kv_heads:
        return f"{num_q_heads} query heads do not split into {num_kv_heads} KV heads"
    return cpu_unavailable_reason()


PREFILL_ROWS = ("kernel", "reference")


@functools.partial(jax.jit, static_argnames=("sm_scale", "num_decode_rows", "soft_cap", "num_threads", "isa",
                                             "prefill_rows"))
def ragged_paged_attention_cpu(q, kv_cache, layer, kv_lens, page_indices, cu_q_lens, num_seqs, *,
                               sm_scale: float, sliding_window=None, soft_cap: float | None = None,
                               num_decode_rows: int = 0, num_threads: int = 0, isa: str = "auto",
                               prefill_rows: str = "kernel") -> jax.Array:
    """The attention of ``ragged_paged_attention_ref`` (same arguments) in the C++ kernel.

    ``prefill_rows``: who computes the rows past the first ``num_decode_rows`` (the engine's static split):
    ``"kernel"`` (the default: every row in the kernel, which finds every row's sequence from
    ``cu_q_lens`` and skips the bucket's padding rows) or ``"reference"`` (the reference's tiled in-step
    attention over the whole padded chunk).  Since the kernel's exps run 8 at a time the kernel is the
    faster one at every prefill size measured (``python bench/attention_cpu.py --seqs 1 --context 10
    --prefill N --heads 8 --kv-heads 4 --head-dim 64``, one layer, 2-core Xeon): 32 rows 0.05 vs 0.61 ms,
    128 rows 0.36 vs 0.77, 256 rows 1.21 vs 1.98, 500 rows 4.23 vs 7.09; 32 decode rows with a 190-row
    prompt 1.25 vs 1.66 ms.

    ``sliding_window``: None, an int, or an int32 scalar that may be traced.  ``num_threads``: 0 for
    every core this process may use.  ``isa``: ``"auto"`` (the best the CPU has: ``best_isa``),
    ``"portable"``, ``"avx2"`` or ``"avx512"``: the tests check each."""
    if prefill_rows not in PREFILL_ROWS:
        raise ValueError(f"prefill_rows: one of {', '.join(PREFILL_ROWS)}, got {prefill_rows!r}")
    t, nd = q.shape[0], min(num_decode_rows, q.shape[0])
    if prefill_rows == "reference" and t > nd:
        rest = ragged_paged_attention_ref(q, kv_cache, layer, kv_lens, page_indices, cu_q_lens, num_seqs,
                                          sm_scale=sm_scale, num_decode_rows=nd, sliding_window=sliding_window,
                                          soft_cap=soft_cap, prefill_rows_only=True)
        if not nd:
            return rest
        # q[:nd]: the kernel's rows are the decode rows alone (row i: sequence i); the others are empty
        decode = _kernel(q[:nd], kv_cache, layer, kv_lens, page_indices, cu_q_lens, num_seqs, sm_scale=sm_scale,
                         sliding_window=sliding_window, soft_cap=soft_cap, num_threads=num_threads, isa=isa)
        return jnp.concatenate([decode, rest[nd:]], axis=0)
    return _kernel(q, kv_cache, layer, kv_lens, page_indices, cu_q_lens, num_seqs, sm_scale=sm_scale,
                   sliding_window=sliding_window, soft_cap=soft_cap, num_threads=num_threads, isa=isa)


def _kernel(q, kv_cache, layer, kv_lens, page_indices, cu_q_lens, num_seqs, *, sm_scale, sliding_window,
            soft_cap, num_threads, isa):
    """The FFI call: every row of ``q`` (rows past ``q``'s end belong to no one)."""
    _, reason = _load()
    if reason is not None:
        raise RuntimeError(f"attention_impl: the CPU kernel is unavailable: {reason}")
    kv, scales = split_cache(kv_cache)
    if scales is not None or kv.dtype == jnp.uint8 or jnp.dtype(kv.dtype).name in ("int8", "float8_e4m3fn"):
        raise ValueError("attention_impl: the CPU kernel does not read 8-bit caches; use the reference")
    # The value dtype: a 16-bit cache stored as its uint16 bits holds values of q's dtype (as_values).
    value = q.dtype if kv.dtype == jnp.uint16 else kv.dtype
    cache_type = _CACHE_TYPES.get(jnp.dtype(value).name)
    if cache_type is None:
        raise ValueError(f"attention_impl: the CPU kernel does not read a {jnp.dtype(value).name} cache")
    window = NO_WINDOW if sliding_window is None else sliding_window
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(q.shape, jnp.float32), vmap_method="sequential")
    out = call(q.astype(jnp.float32), kv, jnp.asarray(layer, jnp.int32), kv_lens.astype(jnp.int32),
               page_indices.astype(jnp.int32), cu_q_lens.astype(jnp.int32), jnp.asarray(num_seqs, jnp.int32),
               jnp.asarray(window, jnp.int32), sm_scale=np.float32(sm_scale),
               soft_cap=np.float32(0.0 if soft_cap is None else soft_cap), cache_type=np.int64(cache_type),
               num_threads=np.int64(num_threads), isa=np.int64(ISAS[isa]))
    return out.astype(q.dtype)
