"""Attention kernels for jaxserve.

``ragged_paged_attention`` is the one entry point the model calls; ``impl`` picks
the implementation (``EngineConfig.attention_impl``):

* ``"reference"``: the pure-JAX reference (``ragged_paged_attention_ref``).
* ``"cpu"``: the C++ CPU kernel behind ``jax.ffi`` (``ragged_paged_attention_cpu``,
  ``csrc/attention_cpu/``), built by ``pip install -e .``; CPU only.
* ``"auto"``: by ``jax.default_backend()``: the TPU kernel on TPU, the GPU
  kernel on GPU, the CPU kernel on CPU (the engine falls back to the reference
  when the extension is not built or the cache is 8-bit: ``unsupported_reason``).
* ``"pallas"``: the Pallas kernel of the backend (TPU kernel on TPU, GPU
  kernel on GPU); on CPU the GPU kernel in Pallas interpret mode (slow: for
  checking the kernel's logic, e.g. the engine's tokens, not for serving).
* ``"pallas_tpu"`` / ``"pallas_gpu"``: that kernel explicitly; interpreted when
  the backend is not the kernel's own (TPU interpret mode for the TPU kernel,
  ``interpret=True`` for the GPU one).

All of them have the semantics of the reference; ``num_decode_rows`` is a static
hint only the reference and the GPU kernel use (the GPU kernel runs the decode rows as
a launch of their own with decode-sized tiles).  ``gpu_unsupported_reason`` says
when the GPU kernel cannot serve a model's attention shape (the engine then falls
back to the reference).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels_pallas.ragged_paged_attention import (
    ragged_paged_attention_dense,
    ragged_paged_attention_ref,
)
from kernels_pallas.ragged_paged_attention_cpu import (
    cpu_unavailable_reason,
    cpu_unsupported_reason,
    ragged_paged_attention_cpu,
)
from kernels_pallas.ragged_paged_attention_gpu import gpu_unsupported_reason, ragged_paged_attention_gpu
from kernels_pallas.ragged_paged_attention_tpu import ragged_paged_attention_tpu

ATTENTION_IMPLS = ("reference", "auto", "cpu", "pallas", "pallas_tpu", "pallas_gpu")


def resolve_impl(impl: str, backend: str | None = None) -> tuple[str, bool]:
    """``(kernel, interpret)`` for ``impl`` on ``backend`` (default: ``jax.default_backend()``).

    ``kernel`` is ``"reference"``, ``"cpu"``, ``"tpu"`` or ``"gpu"``; ``interpret`` says whether a
    Pallas kernel runs in interpret mode.  ``auto`` on CPU is ``"cpu"`` even when the extension is not
    built: ``unsupported_reason`` says so, and the engine (``resolve_attention``) then takes the reference.
    """
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl: unknown implementation {impl!r}; "
                         f"available: {', '.join(ATTENTION_IMPLS)}")
    backend = backend or jax.default_backend()
    if impl == "reference":
        return "reference", False
    if impl == "cpu":
        if backend != "cpu":
            raise ValueError(f"attention_impl: 'cpu' (the C++ CPU kernel) runs on the CPU only, not on {backend}")
        return "cpu", False
    if impl == "auto":
        return (backend, False) if backend in ("tpu", "gpu") else ("cpu", False)
    if impl == "pallas":
        return (backend, False) if backend in ("tpu", "gpu") else ("gpu", True)
    kernel = impl.removeprefix("pallas_")
    return kernel, backend != kernel


# The 8-bit KV caches (int8 with scales, fp8_e4m3) and the kernels that read each: the TPU kernel reads fp8
# (upcast in VMEM), not int8 (the int8 scales' [.., page_size, 2] layout pads to whole lane tiles in TPU HBM).
KV8_DTYPES = ("int8", "float8_e4m3fn")
KV8_KERNELS: dict[str, tuple[str, ...]] = {"gpu": KV8_DTYPES, "tpu": ("float8_e4m3fn",), "cpu": ()}


def unsupported_reason(kernel: str, *, head_dim: int, num_q_heads: int, num_kv_heads: int, page_size: int,
                       dtype, kv_dtype=None) -> str | None:
    """Why the ``kernel`` ("cpu", "tpu" or "gpu") cannot serve this shape, or None when it can (``kv_dtype``:
    the cache's value dtype when it is an 8-bit one).  For "cpu" also: the extension is not built."""
    if kv_dtype is not None and jnp.dtype(kv_dtype).name in KV8_DTYPES and \
            jnp.dtype(kv_dtype).name not in KV8_KERNELS.get(kernel, ()):
        return f"KV cache dtype {jnp.dtype(kv_dtype).name} (not read by the {kernel.upper()} kernel)"
    if kernel == "tpu":
        from kernels_pallas.ragged_paged_attention_tpu import tpu_unsupported_reason as reason

        if kv_dtype is not None and jnp.dtype(kv_dtype).name in KV8_DTYPES:
            dtype = kv_dtype  # the cache's dtype sets the page tiling (32-row pages for 8 bits)
    elif kernel == "gpu":
        from kernels_pallas.ragged_paged_attention_gpu import gpu_unsupported_reason as reason
    elif kernel == "cpu":
        return cpu_unsupported_reason(head_dim=head_dim, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads,
                                      dtype=dtype, kv_dtype=kv_dtype)
    else:
        return None
    return reason(head_dim=head_dim, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, page_size=page_size,
                  dtype=dtype)


def _is_8bit(kv_cache) -> bool:
    return isinstance(kv_cache, (tuple, list)) or jnp.dtype(kv_cache.dtype).itemsize == 1


def ragged_paged_attention(q, kv_cache, layer, kv_lens, page_indices, cu_q_lens, num_seqs, *,
                           sm_scale: float, num_decode_rows: int = 0, sliding_window: int | None = None,
                           soft_cap: float | None = None, impl: str = "reference",
                           backend: str | None = None) -> jax.Array:
    """Ragged paged attention with the implementation chosen by ``impl`` (see the module docstring).

    ``sliding_window``: ``None``, a Python int, or an int32 scalar that may be traced (a model whose
    layers differ in their window passes its layer's from inside the layer scan; ``NO_WINDOW`` for a
    layer without one).  ``soft_cap`` is static.

    ``backend``: the platform the program is compiled for (default ``jax.default_backend()``; a
    deviceless compile for TPU or GPU passes it, since the default backend is then the CPU)."""
    kernel, interpret = resolve_impl(impl, backend)
    if kernel == "cpu" and impl == "auto" and (cpu_unavailable_reason() is not None or _is_8bit(kv_cache)):
        kernel = "reference"  # what the engine's resolve_attention picks too (and says why, once)
    if kernel == "cpu":  # reads 16-bit caches as their bits itself
        return ragged_paged_attention_cpu(q, kv_cache, layer, kv_lens, page_indices, cu_q_lens, num_seqs,
                                          sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap,
                                          num_decode_rows=num_decode_rows)
    if kernel != "reference" and not isinstance(kv_cache, (tuple, list)) and kv_cache.dtype == jnp.uint16:
        # A 16-bit cache stored as bits on CPU (jaxserve/kv_cache.py): the interpreted kernels read values.
        kv_cache = jax.lax.bitcast_convert_type(kv_cache, q.dtype)
    elif kernel != "reference" and not isinstance(kv_cache, (tuple, list)) and kv_cache.dtype == jnp.uint8:
        kv_cache = jax.lax.bitcast_convert_type(kv_cache, jnp.float8_e4m3fn)  # an fp8 cache's bits (CPU)
    args = (q, kv_cache, layer, kv_lens, page_indices, cu_q_lens, num_seqs)
    opts = dict(sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap)
    if kernel == "tpu":
        return ragged_paged_attention_tpu(*args, interpret=interpret, num_decode_rows=num_decode_rows, **opts)
    if kernel == "gpu":
        return ragged_paged_attention_gpu(*args, interpret=interpret, num_decode_rows=num_decode_rows, **opts)
    return ragged_paged_attention_ref(*args, num_decode_rows=num_decode_rows, **opts)


__all__ = ["ragged_paged_attention", "ragged_paged_attention_ref", "ragged_paged_attention_dense",
           "ragged_paged_attention_tpu", "ragged_paged_attention_gpu", "ragged_paged_attention_cpu", "resolve_impl", "unsupported_reason", "ATTENTION_IMPLS"]
