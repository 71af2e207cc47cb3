"""Ragged paged attention as a Pallas kernel for GPU (Triton lowering).

Same contract as ``ragged_paged_attention_ref`` (see ``ragged_paged_attention.py``).

Design
------
* **Work items.**  Each real sequence's query rows are cut into blocks of
  ``block_q`` rows; one *work item* is one such block of one sequence.  The
  number of work items is dynamic, so the grid has a static upper bound,
  ``cdiv(T, block_q) + S`` (every sequence adds at most one partial block);
  items past the real count write nothing.  The item table (sequence, first
  row, end row) is computed with a few ``jnp`` ops outside the kernel.
* **Grid** ``(work item, kv head)``: one program per (sequence, query block,
  kv head).  A program holds the ``block_q`` query rows of all ``G`` query
  heads that share its kv head (GQA) as one ``[block_q * G, D]`` tile: ``q``
  is laid out ``[Hkv, T * G, D]`` (row ``t * G + g``), so that tile is a plain
  contiguous slice and no in-kernel reshape of a ref is needed.
* **Online softmax over pages.**  The program walks its sequence's keys in
  blocks of ``pages_per_block`` pages (gathered through the page table with a
  vector index into the ``[num_pages, page_size, D]`` view of its kv head),
  from the first key its rows can see (sliding window) to the last one
  (causal), keeping the running max, denominator and accumulator in registers.
  Scores are float32; ``p @ v`` runs in the cache dtype with float32
  accumulation.
* Rows that belong to no sequence (padding) are never written by the kernel;
  the wrapper zeroes them.

On GPU this lowers through Triton (``tile rows``, ``block_kv`` and ``D`` must
then be powers of two and at least 16, as for any Triton dot).  On CPU it runs
with ``interpret=True``, which is how the tests check it (no GPU was available
when it was written: it has only ever run interpreted).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

_NEG_INF = -1e30  # finite: fully masked rows give p = 0, never NaN.


def default_block_q(group: int, decode_only: bool) -> int:
    """Query rows per program: tiles of 64 rows (16 for decode-only steps, whose items hold one row)."""
    return max(1, (16 if decode_only else 64) // group)


def work_items(cu_q_lens: jax.Array, num_seqs: jax.Array, num_tokens: int, block_q: int):
    """(seq, row_start, row_end) per work item, padded to the static bound ``cdiv(T, block_q) + S``.

    Items past the real ones have ``row_end == row_start`` (nothing to do).
    """
    num_slots = cu_q_lens.shape[0] - 1
    valid = jnp.arange(num_slots) < num_seqs
    q_lens = jnp.where(valid, cu_q_lens[1:] - cu_q_lens[:-1], 0)
    blocks = (q_lens + block_q - 1) // block_q
    cum = jnp.cumsum(blocks)
    num_items = pl.cdiv(num_tokens, block_q) + num_slots
    item = jnp.arange(num_items, dtype=jnp.int32)
    seq = jnp.minimum(jnp.searchsorted(cum, item, side="right"), num_slots - 1).astype(jnp.int32)
    real = item < cum[-1]
    row_start = cu_q_lens[seq] + (item - (cum[seq] - blocks[seq])) * block_q
    row_end = jnp.minimum(cu_q_lens[seq + 1], row_start + block_q)
    row_start = jnp.where(real, row_start, 0).astype(jnp.int32)
    row_end = jnp.where(real, row_end, 0).astype(jnp.int32)
    return seq, row_start, row_end


def _kernel(seq_ref, row_start_ref, row_end_ref, kv_lens_ref, cu_ref, table_ref,  # scalars (whole arrays)
            q_ref, k_ref, v_ref,  # [T_pad * G, D], [num_pages, page_size, D] x2 (this kv head)
            o_ref,  # [T_pad * G, D]
            *, block_q: int, group: int, pages_per_block: int, table_width: int, sm_scale: float,
            sliding_window: int | None, soft_cap: float | None):
    item = pl.program_id(0)
    page_size = k_ref.shape[1]
    head_dim = q_ref.shape[-1]
    block_kv = pages_per_block * page_size
    rows = block_q * group

    seq = seq_ref[item]
    row_start = row_start_ref[item]
    row_end = row_end_ref[item]
    kv_len = kv_lens_ref[seq]
    seq_start = cu_ref[seq]
    ctx_len = kv_len - (cu_ref[seq + 1] - seq_start)  # positions before this step's tokens

    token = row_start + jax.lax.broadcasted_iota(jnp.int32, (rows,), 0) // group
    row_valid = token < row_end
    pos = ctx_len + token - seq_start  # query position of every tile row

    first_pos = ctx_len + row_start - seq_start
    key_end = jnp.where(row_end > row_start, jnp.clip(ctx_len + row_end - seq_start, 0, kv_len), 0)
    key_start = 0 if sliding_window is None else jnp.maximum(first_pos - sliding_window + 1, 0)
    block_lo = key_start // block_kv
    block_hi = jnp.maximum((key_end + block_kv - 1) // block_kv, block_lo)

    q = q_ref[pl.ds(row_start * group, rows), :]

    def body(j, carry):
        m, l, acc = carry
        pages = table_ref[pl.ds(seq * table_width + j * pages_per_block, pages_per_block)]
        k = k_ref[pages].reshape(block_kv, head_dim)
        v = v_ref[pages].reshape(block_kv, head_dim)
        scores = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())),
                                     preferred_element_type=jnp.float32) * sm_scale
        if soft_cap is not None:
            scores = soft_cap * jnp.tanh(scores / soft_cap)
        key_pos = j * block_kv + jax.lax.broadcasted_iota(jnp.int32, (rows, block_kv), 1)
        mask = (key_pos <= pos[:, None]) & row_valid[:, None]
        if sliding_window is not None:
            mask &= key_pos > pos[:, None] - sliding_window
        scores = jnp.where(mask, scores, _NEG_INF)
        m_new = jnp.maximum(m, scores.max(axis=1))
        p = jnp.where(mask, jnp.exp(scores - m_new[:, None]), 0.0)
        alpha = jnp.exp(m - m_new)
        pv = jax.lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                                 preferred_element_type=jnp.float32)
        return m_new, alpha * l + p.sum(axis=1), alpha[:, None] * acc + pv

    init = (jnp.full((rows,), _NEG_INF, jnp.float32), jnp.zeros((rows,), jnp.float32),
            jnp.zeros((rows, head_dim), jnp.float32))
    _, l, acc = jax.lax.fori_loop(block_lo, block_hi, body, init)
    out = acc / jnp.where(l > 0, l, 1.0)[:, None]
    # Masked store: the tile may run past this item's rows into rows that other programs own.
    pltriton.store(o_ref.at[pl.ds(row_start * group, rows), :], out.astype(o_ref.dtype),
                   mask=jnp.broadcast_to(row_valid[:, None], out.shape))


@functools.partial(jax.jit, static_argnames=("sm_scale", "sliding_window", "soft_cap", "block_q",
                                             "pages_per_block", "interpret", "num_warps", "num_stages"))
def ragged_paged_attention_gpu(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    kv_lens: jax.Array,
    page_indices: jax.Array,
    cu_q_lens: jax.Array,
    num_seqs: jax.Array,
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    block_q: int | None = None,
    pages_per_block: int | None = None,
    interpret: bool = False,
    num_warps: int = 4,
    num_stages: int = 2,
) -> jax.Array:
    """Pallas (Triton) ragged paged attention; ``interpret=True`` runs it on CPU.

    ``block_q``: query tokens per program (default: a 64-row tile of ``block_q * G``
    rows); ``pages_per_block``: pages per online-softmax step (default: 64 tokens).
    """
    t, hq, d = q.shape
    num_pages, page_size, hkv, _ = k_pages.shape
    group = hq // hkv
    if block_q is None:
        block_q = default_block_q(group, decode_only=False)
    if pages_per_block is None:
        pages_per_block = max(1, 64 // page_size)
    num_slots, width = page_indices.shape
    table_width = pl.cdiv(width, pages_per_block) * pages_per_block

    seq, row_start, row_end = work_items(cu_q_lens, num_seqs, t, block_q)
    # Page table: pad to whole blocks and clamp garbage entries into the pool, so that a
    # block's gather never leaves the cache (keys past kv_len are masked anyway).
    table = jnp.clip(page_indices.astype(jnp.int32), 0, num_pages - 1)
    table = jnp.pad(table, ((0, 0), (0, table_width - width))).reshape(-1)
    kv_lens = kv_lens.astype(jnp.int32)
    cu = cu_q_lens.astype(jnp.int32)

    # [T, Hq, D] -> [Hkv, (T + block_q) * G, D]: row t*G + g; padded so every tile slice is in bounds.
    t_pad = t + block_q
    qt = jnp.pad(q, ((0, block_q), (0, 0), (0, 0))).reshape(t_pad, hkv, group, d)
    qt = qt.transpose(1, 0, 2, 3).reshape(hkv, t_pad * group, d)

    kernel = functools.partial(_kernel, block_q=block_q, group=group, pages_per_block=pages_per_block,
                               table_width=table_width, sm_scale=sm_scale, sliding_window=sliding_window,
                               soft_cap=soft_cap)
    whole = pl.BlockSpec()  # scalars: the whole array in every program
    head_rows = pl.BlockSpec((None, t_pad * group, d), lambda i, h: (h, 0, 0))
    head_pages = pl.BlockSpec((num_pages, page_size, None, d), lambda i, h: (0, 0, h, 0))
    compiler_params = None
    if not interpret:
        compiler_params = pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    out = pl.pallas_call(
        kernel,
        grid=(seq.shape[0], hkv),
        in_specs=[whole] * 6 + [head_rows, head_pages, head_pages],
        out_specs=head_rows,
        out_shape=jax.ShapeDtypeStruct((hkv, t_pad * group, d), q.dtype),
        interpret=interpret,
        compiler_params=compiler_params,
        name="ragged_paged_attention_gpu",
    )(seq, row_start, row_end, kv_lens, cu, table, qt, k_pages, v_pages)

    out = out.reshape(hkv, t_pad, group, d)[:, :t].transpose(1, 0, 2, 3).reshape(t, hq, d)
    # Rows of no sequence were never written.
    row = jnp.arange(t)
    real = row < cu[num_seqs]
    return jnp.where(real[:, None, None], out, jnp.zeros((), q.dtype))
