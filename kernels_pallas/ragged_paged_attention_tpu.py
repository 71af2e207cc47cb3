"""Ragged paged attention as a Pallas kernel for TPU (Mosaic).

Same contract as ``ragged_paged_attention_ref`` (see ``ragged_paged_attention.py``), on the
engine's cache of all layers (layout owned by ``jaxserve/kv_cache.py``)::

    kv_cache: [num_layers, num_kv_heads, num_pages, page_size, 2 * head_dim]   K: lanes [:D], V: lanes [D:]

Design
------
* **Grid** ``(kv head, query block)``.  Query blocks are aligned blocks of ``block_q`` packed
  tokens, so a block may hold the rows of several sequences (many decode tokens, or the end of one
  prefill chunk and the start of the next).  A program holds the ``block_q`` tokens of all ``G``
  query heads that share its kv head (GQA) as one ``[block_q * G, Dq]`` tile: ``q`` is laid out
  ``[Hkv, T * G, Dq]`` (row ``t * G + g``) and blocked with a ``BlockSpec``; the output likewise.
* **Two calls for a mixed step.**  ``num_decode_rows`` (static; the engine puts its single-token
  decode sequences first) splits the step: rows ``[0, num_decode_rows)`` run with the decode block
  sizes, the rest with the prefill block sizes, as two ``pallas_call``s.  A decode-only step
  (``num_decode_rows >= T``) or a prefill-only step (``num_decode_rows == 0``) is one call.  The
  split only chooses block sizes: each call computes every sequence that has rows in its part from
  ``cu_q_lens``, so the result does not depend on the hint being right.
* **Scalar prefetch** (SMEM): the layer (a traced scalar: the cache of all layers is passed whole
  and indexed, never sliced), kv lengths, the query offsets, per query block the range of
  sequences with rows in it and, if it fits (``page_table_fits_smem``: 1 MiB of SMEM on v5e/v6e,
  ``SMEM_RESERVE`` kept), the flattened page table.
* **Page table in HBM** otherwise (e.g. 64 sequences x 8192 pages, Llama-3.1's 131072-token
  context at 16-token pages: 2 MiB).  The table, rows padded in the wrapper, is a kernel input in
  HBM, and the kernel copies the page ids of each kv block into an SMEM scratch of two slots (one
  per page-buffer slot) with a small async copy: a window of whole 128-word tiles of the row
  (``page_id_window``: 1-D int32 DMA slices must start on a tile; one tile when
  ``pages_per_block`` divides 128), tile-aligned at or before the block's first id.  The ids run
  one block ahead of the pages: while block ``j`` is computed, the pages of block ``j + 1`` are in
  flight and so are the ids of block ``j + 2`` (the next sequence's first or second block when the
  current one ends), so the page double buffering is kept; only when the stream of blocks
  restarts (the first block of a program, or after a sequence with no kv block) is the id copy
  waited on at once.  ``page_table_in_smem`` forces either path.  (vLLM's TPU ragged paged
  attention v3 scalar-prefetches the whole table; the metadata kernels of its v4 copy a
  sequence's whole row of page ids from HBM into SMEM.  Here only a block's window is copied, so
  SMEM use does not grow with the context length.)
* **Pages by async copy, double-buffered.**  One page of one head of one layer,
  ``kv_hbm.at[layer, head, page]``, is a contiguous ``[page_size, 2D]`` slab whose two minor
  dimensions are whole: each page is one DMA into a VMEM buffer ``[2, block_kv, 2D]`` at row
  ``p * page_size`` (tile-aligned because ``page_size`` is a multiple of the dtype's sublane
  packing).  For each sequence of its block a program walks the keys in blocks of
  ``pages_per_block`` pages, from the first key its rows can see (sliding window) to the last
  (causal); block ``j + 1`` is started before block ``j`` is waited on, and on the last block of a
  sequence the first block of the next sequence of the query block is started, so a stream of
  short (decode) sequences is double-buffered too.  A page's wait names page 0 as its source (a
  wait depends on the semaphore and the copy's size, not on the source address), so waits read no
  page ids.  Only the pages a sequence has are copied (a partial last block leaves stale rows in
  the buffer, which are masked; the buffer is zeroed at the first query block of each head so that
  stale rows are always finite and ``0 * stale = 0``).
* **K and V without a misaligned lane slice.**  With ``D % 128 == 0``, K and V are the
  tile-aligned lane halves ``buf[..., :D]`` / ``buf[..., D:]``.  Otherwise (``D = 64``: one
  128-lane row holds K and V; also 80, 96, ...) nothing is sliced at lane ``D``: ``q`` is
  zero-extended to ``2D`` lanes in the wrapper, so ``q_ext @ buf^T`` is exactly ``q @ K^T``, and
  ``p @ buf`` fills a ``[rows, 2D]`` accumulator whose V half is the attention output; the kernel
  writes ``[rows, 2D]`` tiles and the wrapper keeps lanes ``[D:]`` (an XLA slice).  The price is
  a second, wasted ``p @ K`` half of that matmul and twice the output bytes.
* **Online softmax** over the kv blocks with running max / denominator / accumulator in VMEM
  scratch (float32); rows of other sequences in the tile are masked, which leaves their state
  untouched, and rows of no sequence end as zeros.  Scores are ``q @ K^T`` in the cache dtype with
  a float32 result (``Precision.HIGHEST`` for float32), scaled by ``sm_scale`` in float32;
  ``p`` is cast to the cache dtype for ``p @ V``.  If ``q``'s dtype differs from the cache's,
  ``q`` is cast to the cache dtype and the output back to ``q``'s.
* **Block sizes** from a small table per chip generation (``BLOCK_TABLE``; the chip is the
  default device's, i.e. what Pallas lowers for; off TPU, as in interpret mode, the v5e row):
  decode: the smallest query block whose tile rows are a multiple of the sublane packing, and
  long kv blocks (the step is bandwidth bound; a program has few rows); prefill: query tiles of
  about one to two MXU widths of rows and kv blocks of a few hundred tokens.  Both are capped by
  the step (tokens) and the page table (pages per sequence), and the kv block is halved until the
  VMEM estimate fits the budget; ``vmem_limit_bytes`` is set from the estimate.
  These choices follow the structure of vLLM's TPU ragged paged attention (separate decode /
  prefill / mixed block sizes, per-generation tables, VMEM budget) but the numbers are not tuned.
* **Not done** (left for tuning on hardware): the first kv block of each program (grid step) is
  fetched without overlap (nothing is prefetched across grid steps); q and the output move
  through the ``BlockSpec`` pipeline, not manual DMAs; one DMA per page (no coalescing of
  consecutive pages); no separate compute block size inside a kv block.
* **Supported shapes**: ``tpu_unsupported_reason`` returns why a configuration is not served, or
  ``None``: dtype float32 or bfloat16 (a ``q`` of another dtype is cast to the cache's); query
  heads a multiple of kv heads; ``head_dim`` a multiple of 16; ``page_size`` a multiple of the
  sublane packing (8 rows float32, 16 bfloat16; Mosaic also compiles 8-row bfloat16 pages, a DMA
  to a half tile, but that is not served).  The page table's shape is no limit: it lives in SMEM
  or in HBM (above).  The wrapper still raises if the other scalars alone (sequence slots and
  per-query-block ranges) would not fit in SMEM.

What has been checked, and what has not
---------------------------------------
No TPU was available while writing this kernel.  It is **compile-checked**: Mosaic and XLA TPU
compile it, deviceless (``jaxserve.targets``), for TPU v5e and v6e in float32 and bfloat16 over
head dims 64/128/256, GQA 1-8, page sizes 16/32/64, decode-only (64 sequences), mixed (32 decodes +
480 prefill tokens) and prefill-only (512 tokens) steps, with and without sliding window and soft
cap, with ``max_model_len`` 4096 on a 2-layer cache of 64K tokens; by default a pairwise covering
subset of that grid plus head dims 80/96, 8-row float32 pages, a 512 KiB page table (in SMEM) and
page tables in HBM: 64 x 8192 and 256 x 2048 pages in bfloat16, decode and mixed, two-tile id
windows, and the HBM path forced on a small table (``tests/test_compile_tpu_kernel.py``; the full
product is ``-m slow``).  It is **interpret-checked**: in TPU interpret mode on CPU it matches the
reference and the float64 textbook attention (``tests/test_pallas_tpu.py``; the HBM page-table
path too, forced on small tables, including rows of more than 128 pages and windows of two
tiles), and the interpreter's race detector finds no read of a buffer (page buffer or page-id
window) while a DMA into it is in flight.  It has **never run on TPU hardware**: neither its
numerics on the MXU nor its speed are measured (it is not timed; in particular the cost of the
HBM table path's page-id copies against the scalar-prefetched table is unknown), and the
block-size table is a starting point, not a tuning result.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

_NEG_INF = -1e30  # finite: fully masked rows give p = 0, never NaN.
_SUPPORTED_DTYPES = ("float32", "bfloat16", "float8_e4m3fn")


def compute_dtype(cache_dtype) -> np.dtype:
    """The dtype of the dots: the cache's, except an fp8 cache, whose pages are upcast to bfloat16 in VMEM
    (read natively, no fp8 arithmetic needed: the same on chips with and without fp8 units)."""
    return np.dtype(jnp.bfloat16) if np.dtype(cache_dtype) == np.dtype(jnp.float8_e4m3fn) else np.dtype(cache_dtype)


@dataclasses.dataclass(frozen=True)
class BlockTable:
    """Block sizes of one chip generation (tokens / tile rows; not tuned on hardware)."""
    decode_kv_tokens: int  # keys per kv block of a decode-only part
    prefill_rows: int  # query tile rows (block_q * G) of a prefill part
    prefill_kv_tokens: int  # keys per kv block of a prefill part
    vmem_budget: int  # bytes the kernel's VMEM estimate may use


# v5e: 4 MXUs of 128x128, 16 MiB default scoped VMEM (128 MiB physical); v6e: 2 MXUs of 256x256,
# 32 MiB default scoped VMEM (128 MiB physical).
BLOCK_TABLE = {
    5: BlockTable(decode_kv_tokens=512, prefill_rows=128, prefill_kv_tokens=256, vmem_budget=24 << 20),
    6: BlockTable(decode_kv_tokens=1024, prefill_rows=256, prefill_kv_tokens=512, vmem_budget=48 << 20),
}
_DEFAULT_GENERATION = 5
SMEM_CAPACITY = 1 << 20  # v5e and v6e: 1 MiB of SMEM per core; scalar-prefetched arrays live there
SMEM_RESERVE = 64 << 10  # SMEM kept for the per-query-block ranges and Mosaic's own scalars


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def sublane_packing(dtype) -> int:
    """Rows of one (sublane) tile: 8 for 32-bit dtypes, 16 for 16-bit ones, 32 for 8-bit ones."""
    return 8 * (4 // np.dtype(dtype).itemsize)


def query_alignment(group: int, dtype) -> int:
    """``block_q`` must be a multiple of this, so that tile rows ``block_q * G`` fill whole tiles."""
    packing = sublane_packing(dtype)
    return packing // math.gcd(group, packing)


_SMEM_TILE = 128  # int32 words of a 1-D tile: slices of a 1-D HBM/SMEM int32 array start on one


def page_id_window(pages_per_block: int) -> int:
    """Page ids copied per kv block when the page table is in HBM: whole 128-word tiles (a DMA
    slice of a 1-D int32 array must start on a tile) that hold any block's ``pages_per_block`` ids.
    One tile when ``pages_per_block`` divides 128 (a block never straddles tiles)."""
    window = _round_up(pages_per_block, _SMEM_TILE)
    if _SMEM_TILE % pages_per_block and pages_per_block % _SMEM_TILE:
        window += _SMEM_TILE  # a block may start anywhere in a tile
    return window


def smem_bytes(*, num_slots: int, pages_per_seq: int, num_query_blocks: int = 0,
               table_in_smem: bool = True, pages_per_block: int = 0) -> int:
    """Bytes of SMEM the kernel's scalars take: the scalar-prefetched arrays (kv lengths, query
    offsets, layer, per-query-block sequence ranges and, with ``table_in_smem``, the page table) or,
    with the page table in HBM, the page-id scratch (two ``page_id_window``s) instead of the table;
    each padded to whole 128-word rows, as Mosaic lays them out."""
    table = num_slots * pages_per_seq if table_in_smem else 2 * page_id_window(max(pages_per_block, 1))
    words = [table, num_slots, num_slots + 1, 1, num_query_blocks, num_query_blocks]
    return sum(_round_up(max(w, 1), 128) * 4 for w in words)


def page_table_fits_smem(*, num_slots: int, pages_per_seq: int, num_query_blocks: int = 0,
                         smem_capacity: int = SMEM_CAPACITY) -> bool:
    """Whether the page table is scalar-prefetched into SMEM (else it stays in HBM and each kv
    block's page ids are copied into SMEM by the kernel): it must fit with the other prefetched
    scalars and ``SMEM_RESERVE`` to spare."""
    need = smem_bytes(num_slots=num_slots, pages_per_seq=pages_per_seq, num_query_blocks=num_query_blocks)
    return need + SMEM_RESERVE <= smem_capacity


def tpu_unsupported_reason(*, head_dim: int, num_q_heads: int, num_kv_heads: int, page_size: int,
                           dtype, max_num_seqs: int | None = None, pages_per_seq: int | None = None,
                           smem_capacity: int = SMEM_CAPACITY) -> str | None:
    """``None`` if the kernel serves this configuration, else a short reason why not.

    Rules: dtype float32 or bfloat16; query heads a multiple of kv heads; ``head_dim`` a multiple
    of 16; ``page_size`` a multiple of the dtype's sublane packing (8 rows for float32, 16 for
    bfloat16), so that each page DMA lands on whole tiles.  The page table's shape
    (``max_num_seqs`` x ``pages_per_seq``) does not limit what is served: a table that does not fit
    in SMEM (``smem_capacity``, 1 MiB on v5e/v6e) stays in HBM (see ``page_table_fits_smem``); the
    two arguments are accepted for callers that pass them and must be positive if given.
    """
    del smem_capacity  # the table's size only chooses where it lives
    name = jnp.dtype(dtype).name
    if name not in _SUPPORTED_DTYPES:
        return f"dtype {name} (the TPU kernel supports {' and '.join(_SUPPORTED_DTYPES)})"
    if num_kv_heads <= 0 or num_q_heads % num_kv_heads:
        return f"num_q_heads={num_q_heads} is not a multiple of num_kv_heads={num_kv_heads}"
    if head_dim <= 0 or head_dim % 16:
        return f"head_dim={head_dim} is not a multiple of 16"
    packing = sublane_packing(name)
    if page_size % packing:
        return (f"page_size={page_size} is not a multiple of {packing} (the sublane packing of {name}), "
                "so a page is not a whole number of tiles")
    for arg, value in (("max_num_seqs", max_num_seqs), ("pages_per_seq", pages_per_seq)):
        if value is not None and value <= 0:
            return f"{arg}={value} is not positive"
    return None


def chip_generation() -> int | None:
    """TPU generation Pallas lowers for (the default device's), or None off TPU."""
    try:
        return int(pltpu.get_tpu_info().generation)
    except Exception:  # not a TPU device (CPU in interpret mode), or an unknown chip
        return None


def _smem_capacity() -> int:
    try:
        return int(pltpu.get_tpu_info().smem_capacity_bytes)
    except Exception:  # off TPU (interpret mode)
        return SMEM_CAPACITY


def vmem_estimate(*, rows: int, q_lanes: int, block_kv: int, head_dim: int, dtype) -> int:
    """Bytes of VMEM the kernel uses: kv double buffer, double-buffered q/out tiles, softmax state,
    and the [rows, block_kv] float32 temporaries of one kv step (scores, p, mask)."""
    item = np.dtype(dtype).itemsize
    rows_p = _round_up(rows, 8)
    kv_buf = 2 * block_kv * 2 * head_dim * item
    io = 2 * 2 * rows_p * q_lanes * item
    state = rows_p * q_lanes * 4 + 2 * rows_p * 128 * 4
    temps = 3 * rows_p * _round_up(block_kv, 128) * 4
    return kv_buf + io + state + temps


def block_sizes(*, decode: bool, num_tokens: int, group: int, head_dim: int, page_size: int,
                pages_per_seq: int, dtype, generation: int | None = None) -> tuple[int, int]:
    """``(block_q, pages_per_block)`` for a decode-only or a prefill/mixed part of a step."""
    table = BLOCK_TABLE.get(generation or _DEFAULT_GENERATION, BLOCK_TABLE[_DEFAULT_GENERATION])
    align = query_alignment(group, dtype)
    max_q = _round_up(max(num_tokens, 1), align)
    if decode:
        block_q = align
        kv_tokens = table.decode_kv_tokens
    else:
        block_q = max(align, table.prefill_rows // group // align * align)
        kv_tokens = table.prefill_kv_tokens
    block_q = min(block_q, max_q)
    pages = max(1, min(kv_tokens // page_size, pages_per_seq))
    q_lanes = head_dim if head_dim % 128 == 0 else 2 * head_dim
    while pages > 1 and vmem_estimate(rows=block_q * group, q_lanes=q_lanes, block_kv=pages * page_size,
                                      head_dim=head_dim, dtype=dtype) > table.vmem_budget:
        pages //= 2
    return block_q, pages


def block_sequence_ranges(cu_q_lens: jax.Array, num_seqs: jax.Array, num_blocks: int, block_q: int,
                          row_start: int, row_end: int):
    """For each query block of rows ``[row_start, row_end)``, the real sequences ``[lo, hi)`` with
    rows in it."""
    num_slots = cu_q_lens.shape[0] - 1
    valid = jnp.arange(num_slots) < num_seqs
    big = jnp.iinfo(jnp.int32).max
    starts = jnp.where(valid, cu_q_lens[:-1], big)
    ends = jnp.where(valid, cu_q_lens[1:], big)
    block_start = row_start + jnp.arange(num_blocks, dtype=jnp.int32) * block_q
    block_end = jnp.minimum(block_start + block_q, row_end)
    lo = jnp.sum(ends[None, :] <= block_start[:, None], axis=1)
    hi = jnp.sum(starts[None, :] < block_end[:, None], axis=1)
    return lo.astype(jnp.int32), jnp.maximum(hi, lo).astype(jnp.int32)


def _kernel(*refs, row_start: int, row_end: int, block_q: int, group: int, pages_per_block: int,
            table_width: int, table_in_smem: bool, sm_scale: float, sliding_window: bool,
            soft_cap: float | None, split_kv: bool):
    # Refs.  Scalar prefetch (SMEM): [layer, sliding window], kv lengths, query offsets, per-query-block sequence
    # ranges and, when it fits, the flattened page table.  Then q (VMEM block), the cache (HBM) and,
    # when it does not fit in SMEM, the flattened page table (HBM); the output; scratch.
    if table_in_smem:
        (layer_ref, kv_lens_ref, cu_ref, seq_lo_ref, seq_hi_ref, table_ref,
         q_ref,  # [rows, Dq] (VMEM block)
         kv_hbm,  # [L, Hkv, num_pages, page_size, 2D] (HBM)
         o_ref,  # [rows, Dq]
         buf,  # [2, block_kv, 2D] VMEM double buffer
         sems,  # DMA semaphores [2 (slot)]
         m_ref, l_ref, acc_ref) = refs  # [rows, 1], [rows, 1], [rows, Dq] float32
        table_hbm = idx_ref = idx_sems = None
    else:
        (layer_ref, kv_lens_ref, cu_ref, seq_lo_ref, seq_hi_ref,
         q_ref, kv_hbm,
         table_hbm,  # [num_slots * table_width] int32 (HBM), rows padded (see _attention_part)
         o_ref, buf, sems, m_ref, l_ref, acc_ref,
         idx_ref,  # [2 * window] int32 SMEM: per slot, a window of a row holding one kv block's ids
         idx_sems) = refs  # DMA semaphores [2 (slot)] of the page-id copies
        table_ref = None
    head = pl.program_id(0)
    qblock = pl.program_id(1)
    layer = layer_ref[0]
    # ``sliding_window`` (static) says whether there is a window; its size is a scalar (may differ per
    # layer of a model, as the layer scan's data).
    sw = layer_ref[1] if sliding_window else None
    page_size = kv_hbm.shape[3]
    d2 = kv_hbm.shape[4]
    d = d2 // 2
    ppb = pages_per_block
    window = page_id_window(ppb)
    block_kv = ppb * page_size
    rows = block_q * group
    block_start = row_start + qblock * block_q
    block_end = jnp.minimum(block_start + block_q, row_end)
    precision = jax.lax.Precision.HIGHEST if buf.dtype == jnp.float32 else None
    upcast = buf.dtype != q_ref.dtype  # an fp8 cache: pages upcast to q's bfloat16 after the DMA

    @pl.when(qblock == 0)
    def _():  # rows of a partial kv block that no DMA filled must hold finite values
        buf[...] = jnp.zeros(buf.shape, buf.dtype)

    m_ref[...] = jnp.full(m_ref.shape, _NEG_INF, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)
    # Token of each tile row (row t * G + g holds token t, query head g of this kv head).
    token = block_start + jax.lax.broadcasted_iota(jnp.int32, (rows, 1), 0) // group
    key_iota = jax.lax.broadcasted_iota(jnp.int32, (1, block_kv), 1)
    seq_lo = seq_lo_ref[qblock]
    seq_hi = seq_hi_ref[qblock]

    def seq_info(seq):
        seq_start = cu_ref[seq]
        seq_end = cu_ref[seq + 1]
        kv_len = kv_lens_ref[seq]
        ctx_len = kv_len - (seq_end - seq_start)
        row_lo = jnp.maximum(seq_start, block_start)
        row_hi = jnp.minimum(seq_end, block_end)
        first_pos = ctx_len + row_lo - seq_start
        key_end = jnp.where(row_hi > row_lo, jnp.clip(ctx_len + row_hi - seq_start, 0, kv_len), 0)
        if sw is None:
            key_start = 0
        else:
            key_start = jnp.clip(first_pos - sw + 1, 0, key_end)
        kv_lo = key_start // block_kv
        kv_hi = jnp.maximum((key_end + block_kv - 1) // block_kv, kv_lo)
        num_pages = (kv_len + page_size - 1) // page_size
        return seq_start, seq_end, ctx_len, kv_lo, kv_hi, num_pages

    # The kv blocks a program computes form one stream: the blocks [kv_lo, kv_hi) of each sequence of
    # its query block in turn.  A block is (valid, seq, kv_block, kv_hi, num_pages) (scalars).
    def first_block(seq):
        """The first kv block of sequence ``seq`` (invalid if ``seq >= seq_hi`` or it has none)."""
        s = jnp.minimum(seq, seq_hi - 1)
        _, _, _, kv_lo, kv_hi, num_pages = seq_info(s)
        return (seq < seq_hi) & (kv_hi > kv_lo), s, kv_lo, kv_hi, num_pages

    def successor(block, nxt):
        """The block after ``block`` in the stream; ``nxt`` is ``first_block`` of the sequence after
        ``block``'s.  (A sequence with no kv block ends the stream; the next one restarts it.)"""
        _, seq, j, kv_hi, num_pages = block
        in_seq = j + 1 < kv_hi
        return (in_seq | nxt[0], *(jnp.where(in_seq, a, b) for a, b in
                                   zip((seq, j + 1, kv_hi, num_pages), nxt[1:])))

    def page_count(kv_block, num_pages):
        return jnp.clip(num_pages - kv_block * ppb, 0, ppb)

    def window_start(kv_block):
        """Column of the row where the id window of ``kv_block`` starts: tile-aligned, at most the
        block's first column, and the window stays in the row."""
        return jnp.minimum(kv_block * ppb // _SMEM_TILE * _SMEM_TILE, table_width - window)

    def index_copy(seq, kv_block, slot):
        """Copy of the page-id window of ``kv_block`` of ``seq`` (HBM table) into ``idx_ref`` slot
        ``slot``."""
        src = pl.multiple_of(seq * table_width + window_start(kv_block), _SMEM_TILE)
        dst = pl.multiple_of(slot * window, _SMEM_TILE)
        return pltpu.make_async_copy(table_hbm.at[pl.ds(src, window)], idx_ref.at[pl.ds(dst, window)],
                                     idx_sems.at[slot])

    def start_pages(seq, kv_block, slot, num_pages):
        """Start the DMAs of the pages of ``kv_block`` that the sequence has, into buffer ``slot``
        (HBM table: its page-id window must be in ``idx_ref`` slot ``slot``)."""
        first = kv_block * ppb

        def one(p, _):
            if table_in_smem:
                page = table_ref[seq * table_width + jnp.minimum(first + p, table_width - 1)]
            else:
                col = jnp.clip(first + p - window_start(kv_block), 0, window - 1)
                page = idx_ref[slot * window + col]
            dst = pl.ds(pl.multiple_of(p * page_size, page_size), page_size)
            pltpu.make_async_copy(kv_hbm.at[layer, head, page], buf.at[slot, dst], sems.at[slot]).start()
            return 0

        jax.lax.fori_loop(0, page_count(kv_block, num_pages), one, 0)

    def wait_pages(kv_block, slot, num_pages):
        """Wait for the page DMAs of ``kv_block`` (one wait per page; the source is not read)."""
        def one(p, _):
            dst = pl.ds(pl.multiple_of(p * page_size, page_size), page_size)
            pltpu.make_async_copy(kv_hbm.at[layer, head, 0], buf.at[slot, dst], sems.at[slot]).wait()
            return 0

        jax.lax.fori_loop(0, page_count(kv_block, num_pages), one, 0)

    def sequence(seq, carry):
        slot, prefetched = carry
        seq_start, seq_end, ctx_len, kv_lo, kv_hi, num_pages = seq_info(seq)
        nxt = first_block(seq + 1)
        # With the table in HBM the page ids run one block further ahead than the pages: the block
        # after next may be the first of the sequence after next.
        nxt2 = None if table_in_smem else first_block(seq + 2)

        @pl.when((kv_hi > kv_lo) & (prefetched == 0))
        def _():  # (re)start the stream: nothing of this block is in flight
            if not table_in_smem:
                copy = index_copy(seq, kv_lo, slot)
                copy.start()
                copy.wait()
            start_pages(seq, kv_lo, slot, num_pages)
            if not table_in_smem:
                nb = successor((True, seq, kv_lo, kv_hi, num_pages), nxt)

                @pl.when(nb[0])
                def _():
                    index_copy(nb[1], nb[2], 1 - slot).start()

        pos = ctx_len + token - seq_start  # [rows, 1] query position of each row
        row_valid = (token >= seq_start) & (token < seq_end) & (token < block_end)

        def kv_step(kv_block, carry):
            # In flight on entry: the pages of this block (buffer ``slot``) and, with the table in
            # HBM, the page ids of the next block (``idx_ref`` slot ``1 - slot``).
            slot, _ = carry
            nb = successor((True, seq, kv_block, kv_hi, num_pages), nxt)

            @pl.when(nb[0])
            def _():
                if not table_in_smem:
                    index_copy(0, 0, 1 - slot).wait()
                start_pages(nb[1], nb[2], 1 - slot, nb[4])
                if not table_in_smem:  # the ids of the block after next, into the slot now free
                    after = tuple(jnp.where(nb[1] == seq, a, b) for a, b in zip(nxt, nxt2))
                    nb2 = successor(nb, after)

                    @pl.when(nb2[0])
                    def _():
                        index_copy(nb2[1], nb2[2], slot).start()

            wait_pages(kv_block, slot, num_pages)
            q = q_ref[...]
            if split_kv:
                k = buf[slot, :, pl.ds(0, d)]
                v = buf[slot, :, pl.ds(d, d)]
            else:  # q is zero-extended to 2D lanes; the V half of acc is the output
                k = v = buf[slot]
            if upcast:
                k, v = k.astype(q.dtype), v.astype(q.dtype)
            scores = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=precision,
                                         preferred_element_type=jnp.float32) * sm_scale
            if soft_cap is not None:
                scores = soft_cap * jnp.tanh(scores / soft_cap)
            key_pos = kv_block * block_kv + key_iota  # [1, block_kv]
            mask = row_valid & (key_pos <= pos)
            if sw is not None:
                mask &= key_pos > pos - sw
            scores = jnp.where(mask, scores, _NEG_INF)
            m_prev = m_ref[...]
            m_new = jnp.maximum(m_prev, scores.max(axis=1, keepdims=True))
            p = jnp.where(mask, jnp.exp(scores - m_new), 0.0)
            alpha = jnp.exp(m_prev - m_new)
            m_ref[...] = m_new
            l_ref[...] = alpha * l_ref[...] + p.sum(axis=1, keepdims=True)
            acc_ref[...] = alpha * acc_ref[...] + jax.lax.dot_general(
                p.astype(v.dtype), v, (((1,), (0,)), ((), ())), precision=precision,
                preferred_element_type=jnp.float32)
            # The next sequence's first block is in flight iff this was our last block and it exists.
            prefetched_next = (kv_block + 1 >= kv_hi) & nb[0]
            return 1 - slot, prefetched_next.astype(jnp.int32)

        return jax.lax.fori_loop(kv_lo, kv_hi, kv_step, (slot, jnp.int32(0)))

    jax.lax.fori_loop(seq_lo, seq_hi, sequence, (jnp.int32(0), jnp.int32(0)))
    l = l_ref[...]
    o_ref[...] = (acc_ref[...] / jnp.where(l > 0, l, 1.0)).astype(o_ref.dtype)


def _attention_part(q, kv_cache, layer, kv_lens, page_indices, cu_q_lens, num_seqs, *, row_start, row_end,
                    block_q, pages_per_block, table_in_smem, generation, interpret, **opts):
    """The kernel over query rows ``[row_start, row_end)``: ``[row_end - row_start, Hq, Dq]``."""
    _, hq, dq = q.shape
    _, hkv, num_pages, page_size, d2 = kv_cache.shape
    group = hq // hkv
    n = row_end - row_start
    num_blocks = pl.cdiv(n, block_q)
    t_pad = num_blocks * block_q
    rows = block_q * group
    block_kv = pages_per_block * page_size

    seq_lo, seq_hi = block_sequence_ranges(cu_q_lens, num_seqs, num_blocks, block_q, row_start, row_end)
    qt = jnp.pad(q[row_start:row_end], ((0, t_pad - n), (0, 0), (0, 0))).reshape(t_pad, hkv, group, dq)
    qt = qt.transpose(1, 0, 2, 3).reshape(hkv, t_pad * group, dq)
    table = jnp.clip(page_indices.astype(jnp.int32), 0, num_pages - 1)
    width = table.shape[1]
    if not table_in_smem:  # rows of whole tiles, long enough for the id window of any block
        window = page_id_window(pages_per_block)
        width = _round_up(width, _SMEM_TILE) - _SMEM_TILE + window
        table = jnp.pad(table, ((0, 0), (0, width - table.shape[1])))
    table = table.reshape(-1)

    kernel = functools.partial(_kernel, row_start=row_start, row_end=row_end, block_q=block_q, group=group,
                               pages_per_block=pages_per_block, table_width=width,
                               table_in_smem=table_in_smem, split_kv=dq != d2, **opts)
    tile = pl.BlockSpec((None, rows, dq), lambda h, i, *_: (h, i, 0))
    hbm = pl.BlockSpec(memory_space=pl.ANY)
    scratch = [
        pltpu.VMEM((2, block_kv, d2), kv_cache.dtype),
        pltpu.SemaphoreType.DMA((2,)),
        pltpu.VMEM((rows, 1), jnp.float32),
        pltpu.VMEM((rows, 1), jnp.float32),
        pltpu.VMEM((rows, dq), jnp.float32),
    ]
    scalars = [layer, kv_lens, cu_q_lens, seq_lo, seq_hi]  # layer: [layer, sliding window]
    if table_in_smem:
        scalars.append(table)
        inputs, in_specs = [qt, kv_cache], [tile, hbm]
    else:
        inputs, in_specs = [qt, kv_cache, table], [tile, hbm, pl.BlockSpec(memory_space=pltpu.HBM)]
        scratch += [pltpu.SMEM((2 * window,), jnp.int32), pltpu.SemaphoreType.DMA((2,))]
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=len(scalars),
        grid=(hkv, num_blocks),
        in_specs=in_specs,
        out_specs=tile,
        scratch_shapes=scratch,
    )
    table_cfg = BLOCK_TABLE.get(generation or _DEFAULT_GENERATION, BLOCK_TABLE[_DEFAULT_GENERATION])
    estimate = vmem_estimate(rows=rows, q_lanes=dq, block_kv=block_kv, head_dim=d2 // 2,
                             dtype=compute_dtype(kv_cache.dtype))
    vmem_limit = max(32 << 20, min(2 * estimate, 2 * table_cfg.vmem_budget))
    out = pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((hkv, t_pad * group, dq), q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary"),
                                             vmem_limit_bytes=vmem_limit),
        interpret=pltpu.InterpretParams() if interpret is True else interpret,
        name="ragged_paged_attention_tpu",
    )(*scalars, *inputs)
    return out.reshape(hkv, t_pad, group, dq)[:, :n].transpose(1, 0, 2, 3).reshape(n, hq, dq)


@functools.partial(jax.jit, static_argnames=("sm_scale", "soft_cap", "num_decode_rows",
                                             "block_q", "pages_per_block", "page_table_in_smem",
                                             "interpret"))
def ragged_paged_attention_tpu(
    q: jax.Array,
    kv_cache: jax.Array,
    layer: jax.Array,
    kv_lens: jax.Array,
    page_indices: jax.Array,
    cu_q_lens: jax.Array,
    num_seqs: jax.Array,
    *,
    sm_scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    num_decode_rows: int = 0,
    block_q: int | None = None,
    pages_per_block: int | None = None,
    page_table_in_smem: bool | None = None,
    interpret: bool | pltpu.InterpretParams = False,
) -> jax.Array:
    """Pallas (Mosaic TPU) ragged paged attention; ``interpret=True`` runs it on CPU (TPU interpret
    mode), and ``interpret`` may also be a ``pltpu.InterpretParams`` (e.g. ``detect_races=True``).

    ``kv_cache`` is the cache of all layers ``[L, Hkv, num_pages, page_size, 2D]`` and ``layer`` an
    int32 scalar (may be traced); so may ``sliding_window`` be (``None``: no window), which is
    scalar-prefetched with the layer.  ``num_decode_rows`` (static): rows ``[0, num_decode_rows)`` run
    with decode block sizes, the others with prefill block sizes (see the module docstring).
    ``block_q`` (tokens per query block, a multiple of ``query_alignment(G, dtype)``) and
    ``pages_per_block`` (pages per kv step) override the table's choice for every part.
    ``page_table_in_smem`` (static): ``None`` (default) scalar-prefetches the page table into SMEM
    when it fits (``page_table_fits_smem``) and otherwise keeps it in HBM, copying each kv block's
    page ids into SMEM one block ahead; ``True`` / ``False`` force either path (``True`` raises if the
    table does not fit).
    """
    t, hq, d = q.shape
    num_layers, hkv, num_pages, page_size, d2 = kv_cache.shape
    if d2 != 2 * d:
        raise ValueError(f"kv_cache: last dimension {d2} is not 2 * head_dim = {2 * d}")
    reason = tpu_unsupported_reason(head_dim=d, num_q_heads=hq, num_kv_heads=hkv, page_size=page_size,
                                    dtype=kv_cache.dtype)
    if reason is not None:
        raise ValueError(f"ragged_paged_attention_tpu: unsupported configuration: {reason}")
    group = hq // hkv
    cdt = compute_dtype(kv_cache.dtype)  # q's tiles and the dots
    align = query_alignment(group, cdt)
    if block_q is not None and (block_q <= 0 or block_q % align):
        raise ValueError(f"block_q={block_q} must be a positive multiple of {align} (G={group}, "
                         f"{jnp.dtype(cdt).name})")
    out_dtype = q.dtype
    q = q.astype(cdt)
    split_kv = d % 128 == 0
    if not split_kv:  # zero-extend q to 2D lanes: q_ext @ [K | V]^T == q @ K^T exactly
        q = jnp.concatenate([q, jnp.zeros_like(q)], axis=-1)
    num_slots, width = page_indices.shape
    window = 0 if sliding_window is None else sliding_window
    layer = jnp.stack([jnp.asarray(layer, jnp.int32).reshape(()), jnp.asarray(window, jnp.int32).reshape(())])
    kv_lens = kv_lens.astype(jnp.int32)
    cu_q_lens = cu_q_lens.astype(jnp.int32)
    num_seqs = jnp.asarray(num_seqs, jnp.int32)
    generation = chip_generation()
    smem_capacity = _smem_capacity()

    nd = min(max(num_decode_rows, 0), t)
    parts = [(0, nd, True), (nd, t, False)] if 0 < nd < t else [(0, t, nd >= t)]
    outs = []
    for row_start, row_end, decode in parts:
        bq, ppb = block_sizes(decode=decode, num_tokens=row_end - row_start, group=group, head_dim=d,
                              page_size=page_size, pages_per_seq=width, dtype=cdt,
                              generation=generation)
        bq, ppb = block_q or bq, pages_per_block or ppb
        num_query_blocks = pl.cdiv(row_end - row_start, bq)
        in_smem = page_table_fits_smem(num_slots=num_slots, pages_per_seq=width,
                                       num_query_blocks=num_query_blocks, smem_capacity=smem_capacity)
        if page_table_in_smem is not None:
            if page_table_in_smem and not in_smem:
                raise ValueError(f"ragged_paged_attention_tpu: page_table_in_smem=True, but the page table "
                                 f"({num_slots} x {width}) does not fit in SMEM ({smem_capacity} bytes)")
            in_smem = page_table_in_smem
        need = smem_bytes(num_slots=num_slots, pages_per_seq=width, num_query_blocks=num_query_blocks,
                          table_in_smem=in_smem, pages_per_block=ppb)
        if need > smem_capacity:  # only the per-query-block ranges can still be too many
            raise ValueError(f"ragged_paged_attention_tpu: the kernel's scalars ({num_slots} sequence slots, "
                             f"{num_query_blocks} query blocks) need {need} bytes of SMEM, more than "
                             f"{smem_capacity}")
        outs.append(_attention_part(
            q, kv_cache, layer, kv_lens, page_indices, cu_q_lens, num_seqs, row_start=row_start,
            row_end=row_end, block_q=bq, pages_per_block=ppb, table_in_smem=in_smem, generation=generation,
            interpret=interpret, sm_scale=sm_scale, sliding_window=sliding_window is not None, soft_cap=soft_cap))
    out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=0)
    if not split_kv:
        out = out[..., d:]
    return out.astype(out_dtype)
