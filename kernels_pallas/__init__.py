"""Attention kernels for jaxserve.

``ragged_paged_attention`` is the one entry point the model calls.  Today the
only implementation is the pure-JAX reference (``ragged_paged_attention_ref``),
which is also what CPU runs; the Pallas TPU/GPU kernels plug in behind the same
signature and are tested against the reference.
"""

from kernels_pallas.ragged_paged_attention import (
    ragged_paged_attention_dense,
    ragged_paged_attention_ref,
)

ATTENTION_IMPLS = ("reference",)


def ragged_paged_attention(q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs, *,
                           sm_scale, num_decode_rows=0, sliding_window=None, soft_cap=None,
                           impl: str = "reference"):
    """Ragged paged attention with the implementation chosen by ``impl``."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl: unknown implementation {impl!r}; "
                         f"available: {', '.join(ATTENTION_IMPLS)}")
    return ragged_paged_attention_ref(
        q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs, sm_scale=sm_scale,
        num_decode_rows=num_decode_rows, sliding_window=sliding_window, soft_cap=soft_cap)


__all__ = ["ragged_paged_attention", "ragged_paged_attention_ref", "ragged_paged_attention_dense",
           "ATTENTION_IMPLS"]
