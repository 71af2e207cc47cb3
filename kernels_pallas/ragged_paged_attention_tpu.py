"""Ragged paged attention as a Pallas kernel for TPU (Mosaic).

Same contract as ``ragged_paged_attention_ref`` (see ``ragged_paged_attention.py``).

Design
------
* **Grid** ``(kv head, query block)``.  Query blocks are aligned blocks of
  ``block_q`` packed tokens, so a block may hold the rows of several sequences
  (many decode tokens, or the end of one prefill chunk and the start of the
  next).  A program holds the ``block_q`` tokens of all ``G`` query heads that
  share its kv head (GQA) as one ``[block_q * G, D]`` tile: ``q`` is laid out
  ``[Hkv, T * G, D]`` (row ``t * G + g``) and blocked with a ``BlockSpec``.
* **Scalar prefetch** (SMEM): kv lengths, the flattened page table, the query
  offsets and, per query block, the range of sequences whose rows it holds.
* **Pages by async copy, double-buffered.**  For each sequence of its block
  the program walks that sequence's keys in blocks of ``pages_per_block``
  pages, from the first key its rows can see (sliding window) to the last
  (causal).  Each page of the current kv head is one DMA from the cache in HBM
  (``k_pages[page, :, head, :]``, a strided copy; the cache keeps the engine's
  ``[num_pages, page_size, Hkv, D]`` layout) into a ``[2, block_kv, D]`` VMEM
  buffer; block ``j + 1`` is started before block ``j`` is waited on and used.
  Page slots past the sequence's last page re-fetch its last page, so the
  buffer always holds finite cache data (those keys are masked).
* **Online softmax** over the kv blocks with running max / denominator /
  accumulator in VMEM scratch; rows of other sequences in the tile are masked,
  which leaves their state untouched, and rows of no sequence end as zeros.
* No reshape of a ref anywhere (buffers are indexed), explicit block sizes:
  this is what lets the kernel run in TPU interpret mode on CPU
  (``interpret=True`` here selects ``pltpu.InterpretParams()``), which is how it
  is tested.  It has not run on a TPU yet.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

_NEG_INF = -1e30  # finite: fully masked rows give p = 0, never NaN.


def default_block_q(group: int) -> int:
    """Tokens per query block: a multiple of 8 giving tiles of about 64 rows."""
    return max(8, (64 // group) // 8 * 8)


def block_sequence_ranges(cu_q_lens: jax.Array, num_seqs: jax.Array, num_blocks: int, block_q: int):
    """For each aligned query block, the real sequences ``[lo, hi)`` with rows in it."""
    num_slots = cu_q_lens.shape[0] - 1
    valid = jnp.arange(num_slots) < num_seqs
    big = jnp.iinfo(jnp.int32).max
    starts = jnp.where(valid, cu_q_lens[:-1], big)
    ends = jnp.where(valid, cu_q_lens[1:], big)
    block_start = jnp.arange(num_blocks, dtype=jnp.int32) * block_q
    lo = jnp.sum(ends[None, :] <= block_start[:, None], axis=1)
    hi = jnp.sum(starts[None, :] < block_start[:, None] + block_q, axis=1)
    return lo.astype(jnp.int32), jnp.maximum(hi, lo).astype(jnp.int32)


def _kernel(kv_lens_ref, table_ref, cu_ref, seq_lo_ref, seq_hi_ref,  # scalar prefetch (SMEM)
            q_ref,  # [block_q * G, D] (VMEM block)
            k_hbm, v_hbm,  # [num_pages, page_size, Hkv, D] (HBM)
            o_ref,  # [block_q * G, D]
            k_buf, v_buf,  # [2, block_kv, D] VMEM double buffers
            sems,  # DMA semaphores [2 (k/v), 2 (slot)]
            m_ref, l_ref, acc_ref,  # [R, 1], [R, 1], [R, D] float32
            *, block_q: int, group: int, pages_per_block: int, table_width: int, sm_scale: float,
            sliding_window: int | None, soft_cap: float | None):
    head = pl.program_id(0)
    qblock = pl.program_id(1)
    page_size = k_hbm.shape[1]
    block_kv = pages_per_block * page_size
    rows = block_q * group
    block_start = qblock * block_q

    m_ref[...] = jnp.full(m_ref.shape, _NEG_INF, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)
    token = block_start + jax.lax.broadcasted_iota(jnp.int32, (rows, block_kv), 0) // group

    def sequence(seq, _):
        seq_start = cu_ref[seq]
        seq_end = cu_ref[seq + 1]
        kv_len = kv_lens_ref[seq]
        ctx_len = kv_len - (seq_end - seq_start)
        row_lo = jnp.maximum(seq_start, block_start)
        row_hi = jnp.minimum(seq_end, block_start + block_q)
        first_pos = ctx_len + row_lo - seq_start
        key_end = jnp.where(row_hi > row_lo, jnp.clip(ctx_len + row_hi - seq_start, 0, kv_len), 0)
        key_start = 0 if sliding_window is None else jnp.maximum(first_pos - sliding_window + 1, 0)
        kv_lo = key_start // block_kv
        kv_hi = jnp.maximum((key_end + block_kv - 1) // block_kv, kv_lo)
        last_page = jnp.maximum((kv_len + page_size - 1) // page_size - 1, 0)

        def copies(kv_block, slot):
            out = []
            for p in range(pages_per_block):
                col = jnp.minimum(kv_block * pages_per_block + p, last_page)
                page = table_ref[seq * table_width + col]
                dst = pl.ds(p * page_size, page_size)
                out.append(pltpu.make_async_copy(k_hbm.at[page, :, head, :], k_buf.at[slot, dst, :],
                                                 sems.at[0, slot]))
                out.append(pltpu.make_async_copy(v_hbm.at[page, :, head, :], v_buf.at[slot, dst, :],
                                                 sems.at[1, slot]))
            return out

        @pl.when(kv_hi > kv_lo)
        def _():
            for c in copies(kv_lo, 0):
                c.start()

        def kv_step(kv_block, _):
            slot = (kv_block - kv_lo) % 2

            @pl.when(kv_block + 1 < kv_hi)
            def _():
                for c in copies(kv_block + 1, 1 - slot):
                    c.start()

            for c in copies(kv_block, slot):
                c.wait()
            q = q_ref[...]
            k = k_buf[slot]
            v = v_buf[slot]
            scores = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())),
                                         preferred_element_type=jnp.float32) * sm_scale
            if soft_cap is not None:
                scores = soft_cap * jnp.tanh(scores / soft_cap)
            pos = ctx_len + token - seq_start
            key_pos = kv_block * block_kv + jax.lax.broadcasted_iota(jnp.int32, (rows, block_kv), 1)
            mask = (token >= seq_start) & (token < seq_end) & (key_pos <= pos)
            if sliding_window is not None:
                mask &= key_pos > pos - sliding_window
            scores = jnp.where(mask, scores, _NEG_INF)
            m_prev = m_ref[...]
            m_new = jnp.maximum(m_prev, scores.max(axis=1, keepdims=True))
            p = jnp.where(mask, jnp.exp(scores - m_new), 0.0)
            alpha = jnp.exp(m_prev - m_new)
            m_ref[...] = m_new
            l_ref[...] = alpha * l_ref[...] + p.sum(axis=1, keepdims=True)
            acc_ref[...] = alpha * acc_ref[...] + jax.lax.dot_general(
                p.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
            return 0

        jax.lax.fori_loop(kv_lo, kv_hi, kv_step, 0)
        return 0

    jax.lax.fori_loop(seq_lo_ref[qblock], seq_hi_ref[qblock], sequence, 0)
    l = l_ref[...]
    o_ref[...] = (acc_ref[...] / jnp.where(l > 0, l, 1.0)).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("sm_scale", "sliding_window", "soft_cap", "block_q",
                                             "pages_per_block", "interpret"))
def ragged_paged_attention_tpu(
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
    interpret: bool | pltpu.InterpretParams = False,
) -> jax.Array:
    """Pallas (Mosaic TPU) ragged paged attention; ``interpret=True`` runs it on CPU (TPU interpret mode).

    ``interpret`` may also be a ``pltpu.InterpretParams`` (e.g. with ``detect_races=True``).

    ``block_q``: tokens per query block (default: ``default_block_q(G)``);
    ``pages_per_block``: pages per kv step, i.e. per DMA buffer (default: 64 tokens).
    """
    t, hq, d = q.shape
    num_pages, page_size, hkv, _ = k_pages.shape
    group = hq // hkv
    if block_q is None:
        block_q = default_block_q(group)
    if pages_per_block is None:
        pages_per_block = max(1, 64 // page_size)
    num_slots, width = page_indices.shape
    num_blocks = pl.cdiv(t, block_q)
    t_pad = num_blocks * block_q
    rows = block_q * group
    block_kv = pages_per_block * page_size

    seq_lo, seq_hi = block_sequence_ranges(cu_q_lens, num_seqs, num_blocks, block_q)
    table = jnp.clip(page_indices.astype(jnp.int32), 0, num_pages - 1).reshape(-1)
    qt = jnp.pad(q, ((0, t_pad - t), (0, 0), (0, 0))).reshape(t_pad, hkv, group, d)
    qt = qt.transpose(1, 0, 2, 3).reshape(hkv, t_pad * group, d)

    kernel = functools.partial(_kernel, block_q=block_q, group=group, pages_per_block=pages_per_block,
                               table_width=width, sm_scale=sm_scale, sliding_window=sliding_window,
                               soft_cap=soft_cap)
    tile = pl.BlockSpec((None, rows, d), lambda h, i, *_: (h, i, 0))
    hbm = pl.BlockSpec(memory_space=pl.ANY)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=5,
        grid=(hkv, num_blocks),
        in_specs=[tile, hbm, hbm],
        out_specs=tile,
        scratch_shapes=[
            pltpu.VMEM((2, block_kv, d), k_pages.dtype),
            pltpu.VMEM((2, block_kv, d), v_pages.dtype),
            pltpu.SemaphoreType.DMA((2, 2)),
            pltpu.VMEM((rows, 1), jnp.float32),
            pltpu.VMEM((rows, 1), jnp.float32),
            pltpu.VMEM((rows, d), jnp.float32),
        ],
    )
    out = pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((hkv, t_pad * group, d), q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        interpret=pltpu.InterpretParams() if interpret is True else interpret,
        name="ragged_paged_attention_tpu",
    )(kv_lens.astype(jnp.int32), table, cu_q_lens.astype(jnp.int32), seq_lo, seq_hi, qt, k_pages, v_pages)
    return out.reshape(hkv, t_pad, group, d)[:, :t].transpose(1, 0, 2, 3).reshape(t, hq, d)
