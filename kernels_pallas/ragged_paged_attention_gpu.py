"""Ragged paged attention as a Pallas kernel for GPU (Triton lowering).

Same contract as ``ragged_paged_attention_ref`` (see ``ragged_paged_attention.py``):
``q [T, Hq, D]``, the engine's cache of all layers ``kv_cache [L, Hkv, num_pages,
page_size, 2D]`` (K in lanes ``[:D]``, V in ``[D:]``; ``jaxserve/kv_cache.py``) and a
traced int32 ``layer``.

Status: this kernel is **compile-checked** (deviceless lowering through real
Triton and ptxas for sm_90, H100 and H200 targets: ``tests/test_compile_gpu_kernel.py``)
and **interpret-checked** (``interpret=True`` on CPU against the reference:
``tests/test_pallas_gpu.py``).  It has never run on a GPU here; its speed and
the block-size rules below are untuned guesses until it does.

Design
------
* **Work items.**  Each real sequence's query rows are cut into blocks of
  ``block_q`` tokens; one *work item* is one such block of one sequence.  The
  number of items is dynamic, so the grid has a static upper bound,
  ``cdiv(rows, block_q) + sequences`` (every sequence adds at most one partial
  block); items past the real count do no work and write nothing.  The item
  table (sequence, first row, end row) comes from a few small ``jnp`` ops.
* **Decode and prefill rows are two launches.**  With ``num_decode_rows = N``
  (the engine's promise that rows ``0..N-1`` are single-token sequences
  ``0..N-1``) the decode rows get their own ``pallas_call`` with a small tile
  (one item per sequence, no item table search), the remaining rows a second
  one with prefill-sized tiles.  ``num_decode_rows >= T`` (decode-only step)
  is one launch.  The two write disjoint rows of one output buffer (aliased
  through both calls, initialised to zeros), so rows that belong to no
  sequence are zeros without a masking pass.
* **Grid** ``(work item, kv head)``.  A program holds its item's ``block_q``
  tokens for all ``G`` query heads of its kv head (GQA) as one ``[block_q *
  G_pad, D]`` tile, ``G_pad`` = ``G`` rounded up to a power of two (Triton
  tensors must have power-of-two sizes).  Row ``r`` of the tile is token
  ``r // G_pad``, head ``kv * G + r % G_pad``; rows with ``r % G_pad >= G``
  and rows past the item's end are padding: they read a real row of the item
  again (clamped index), are masked out of the softmax and never stored.  The
  tile is gathered straight from ``q`` viewed as ``[T * Hq, D]`` with a vector
  row index, and stored with a masked store the same way into ``[T * Hq, D]``,
  so neither ``q`` nor the output is transposed or padded in XLA.
* **Keys and values straight from the cache.**  The cache is passed whole;
  the program reads block ``j`` of its sequence's keys as
  ``kv_ref[layer, kv, page[k], slot[k], pl.ds(0, D)]`` (values:
  ``pl.ds(D, D)``) where, for the ``block_kv`` key positions ``k`` of the
  block, ``page[k]`` is looked up in the page table with a vector index
  (``k // page_size``) and ``slot[k] = k % page_size``.  ``layer`` is a
  traced scalar read from a one-element input; no layer is ever sliced out in
  XLA.  Key positions past the item's last visible key read that key again
  (its cache lines are already being read: no extra memory traffic) and are
  masked in the scores; page ids are clamped into the pool and page-table
  columns into the table, so no load leaves the cache, whatever the unused
  table entries hold.  (Masked *loads* would do the same, but Pallas interpret
  mode cannot run a masked load that mixes array and slice indices.)  Because pages
  are addressed per key, ``block_kv`` does not have to be a multiple of the
  page size, and any page size works.
* **Online softmax over key blocks**, from the first key the item's rows can
  see (sliding window) to the last (causal), with running max, denominator and
  accumulator in registers.  Scores and the accumulator are float32; both
  dots take the cache dtype as input (float32 inputs use Triton's default TF32
  dot on the GPU, like XLA's default precision) with float32 accumulation.
  Optional ``tanh`` soft cap on the scores.  Rows that see no key (padded
  decode slots with ``kv_len == 0``) come out as zeros.

Block sizes (``choose_blocks``; explicit arguments override them)
-----------------------------------------------------------------
* Tile rows ``block_q * G_pad``: 16 for the decode launch (one token; the
  rest of the tile is GQA padding or unused, 16 being the smallest Triton dot),
  64 for the prefill/mixed launch; ``block_q = rows // G_pad``, at least 1 (so
  a group of 32 gets 32-row tiles).
* Key block ``block_kv``: 128 tokens for decode, 64 for prefill.
* ``num_warps`` 4, or 8 when the float32 accumulator tile (``rows x D``) has
  16K or more elements; ``num_stages`` 2 (one K/V prefetch buffer; see
  ``kv_buffers``: with this loop Triton gives the same buffers for 2-4 stages).
* Shared memory: ``smem_bytes`` is an upper estimate fitted to what Triton
  allocates for this kernel (measured by compiling for H100 over 105 tile
  shapes, never above the estimate).  The config shrinks -- key block down
  to 32, then query block down to 16 rows, then key block down to 16, then
  no prefetch -- until the estimate fits the target's
  ``GPU_SHARED_MEMORY_PER_BLOCK`` (227 KiB on sm_90) minus ``SMEM_MARGIN``.
  Decode, bound by memory bandwidth, first aims at half of that, so two
  programs share an SM (e.g. head_dim 256 decode gets 64-token key blocks).
  Examples: head_dim 128 bfloat16 prefill 64x64 ~82 KiB; head_dim 256
  float32 prefill 64 rows x 32 keys ~194 KiB estimated (160 KiB allocated).
* Triton needs ``D`` to be a power of two of at least 16 for its dots (tile
  sizes are powers of two by construction); ``gpu_unsupported_reason`` says
  when the kernel cannot serve a model, so the engine can fall back to the
  reference.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton


def _smem_limit() -> int:
    # Imported here: jaxserve's package __init__ imports kernels_pallas (a module-level import is circular).
    from jaxserve.targets import GPU_SHARED_MEMORY_PER_BLOCK

    return GPU_SHARED_MEMORY_PER_BLOCK

_NEG_INF = -1e30  # finite: fully masked rows give p = 0, never NaN.
SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")
SMEM_MARGIN = 8 * 1024  # bytes kept free below the limit, on top of the estimate's own reserve
_SMEM_RESERVE = 2 * 1024  # barriers, reduction scratch, the page-id vector


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _is_pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


@dataclasses.dataclass(frozen=True)
class BlockConfig:
    block_q: int  # tokens per work item
    group_pad: int  # G rounded up to a power of two
    block_kv: int  # keys per online-softmax step
    num_warps: int
    num_stages: int

    @property
    def rows(self) -> int:
        return self.block_q * self.group_pad


def kv_buffers(num_stages: int) -> int:
    """K/V prefetch buffers Triton's software pipeliner allocates for this kernel's loop at ``num_stages``.

    Measured on the sm_90 compiler of jax 0.10.2 (the K/V loads depend on a page-table load in the
    same iteration, which takes pipeline stages of its own): 1 -> 0 (no prefetch), 2..4 -> 1,
    5..6 -> 2, 7 -> 3."""
    return 0 if num_stages <= 1 else max(1, (num_stages + 1) // 2 - 1)


def smem_bytes(*, rows: int, block_kv: int, head_dim: int, itemsize: int, num_stages: int) -> int:
    """Upper estimate of one program's shared memory, fitted to the ``ttg.shared`` size Triton
    allocates (measured by compiling for H100 over tiles of 16-128 rows, key blocks of 32-128,
    head_dim 64-256, bfloat16/float32, 1-7 stages; the estimate was never below the measurement).

    Tiles of 64 rows or more use Hopper's wgmma, whose operands live in shared memory: the q tile,
    plus K and V blocks once for the dot operands and once per prefetch buffer.  Smaller tiles use
    mma.sync from registers: the q tile, the prefetch buffers (or one K/V block for the layout
    conversion without prefetch) and the float32 probability tile's conversion scratch."""
    q_tile = rows * head_dim * itemsize
    kv_block = block_kv * head_dim * itemsize
    buffers = kv_buffers(num_stages)
    if rows >= 64:
        return q_tile + (buffers + 1) * 2 * kv_block + _SMEM_RESERVE
    return q_tile + max(buffers * 2 * kv_block, kv_block) + rows * block_kv * 4 + _SMEM_RESERVE


def choose_blocks(*, head_dim: int, group: int, dtype, decode: bool,
                  smem_limit: int | None = None,
                  block_q: int | None = None, block_kv: int | None = None,
                  num_warps: int | None = None, num_stages: int | None = None) -> BlockConfig:
    """Block sizes for one launch (see the module docstring); explicit arguments are kept as given
    (only the others shrink to fit)."""
    itemsize = np.dtype(dtype).itemsize
    limit = smem_limit or _smem_limit()
    gp = _next_pow2(group)
    bq = block_q if block_q is not None else max(1, (16 if decode else 64) // gp)
    bkv = block_kv if block_kv is not None else (128 if decode else 64)
    st = num_stages if num_stages is not None else 2
    # Decode is bound by memory bandwidth: keep two programs per SM (half the shared memory each).
    budget = (limit // 2 if decode and block_kv is None else limit) - SMEM_MARGIN

    def need():
        return smem_bytes(rows=bq * gp, block_kv=bkv, head_dim=head_dim, itemsize=itemsize, num_stages=st)

    while need() > budget:
        if block_kv is None and bkv > 32:
            bkv //= 2
        elif block_q is None and bq > 1 and bq * gp > 16:
            bq //= 2
        elif block_kv is None and bkv > 16:
            bkv //= 2
        elif num_stages is None and st > 1:
            st = 1
        elif budget < limit - SMEM_MARGIN:  # decode: give up the two-programs-per-SM wish
            budget = limit - SMEM_MARGIN
        else:
            break
    if num_warps is None:
        num_warps = 8 if bq * gp * head_dim >= 16 * 1024 else 4
    return BlockConfig(bq, gp, bkv, num_warps, st)


def gpu_unsupported_reason(*, head_dim: int, num_q_heads: int, num_kv_heads: int, page_size: int,
                           dtype) -> str | None:
    """None if the GPU kernel serves this attention shape on sm_90; else a short reason (the engine
    then falls back to the reference attention, with a warning)."""
    if num_kv_heads < 1 or num_q_heads % num_kv_heads:
        return f"num_q_heads {num_q_heads} is not a multiple of num_kv_heads {num_kv_heads}"
    if not _is_pow2(head_dim) or head_dim < 16:
        return f"head_dim {head_dim} is not a power of two >= 16 (Triton dot tiles)"
    if page_size < 1:
        return f"page_size {page_size} < 1"
    name = np.dtype(dtype).name
    if name not in SUPPORTED_DTYPES:
        return f"dtype {name} is not one of {', '.join(SUPPORTED_DTYPES)}"
    group = num_q_heads // num_kv_heads
    for decode in (True, False):
        cfg = choose_blocks(head_dim=head_dim, group=group, dtype=dtype, decode=decode)
        need = smem_bytes(rows=cfg.rows, block_kv=cfg.block_kv, head_dim=head_dim,
                          itemsize=np.dtype(dtype).itemsize, num_stages=cfg.num_stages)
        if need > _smem_limit() - SMEM_MARGIN:
            return (f"head_dim {head_dim} x GQA group {group} in {name} needs about {need} bytes of shared "
                    f"memory even with the smallest tiles (limit {_smem_limit()})")
    return None


def work_items(cu_q_lens: jax.Array, num_seqs: jax.Array, num_rows: int, block_q: int, first_seq: int = 0):
    """(seq, row_start, row_end) per work item over the real sequences ``>= first_seq`` whose rows
    number ``num_rows`` at most, padded to the static bound ``cdiv(num_rows, block_q) + slots``.

    Items past the real ones have ``row_end == row_start`` (nothing to do).
    """
    num_slots = cu_q_lens.shape[0] - 1
    slots = jnp.arange(first_seq, num_slots)
    valid = slots < num_seqs
    q_lens = jnp.where(valid, cu_q_lens[first_seq + 1:] - cu_q_lens[first_seq:-1], 0)
    blocks = (q_lens + block_q - 1) // block_q
    cum = jnp.cumsum(blocks)
    num_items = pl.cdiv(num_rows, block_q) + (num_slots - first_seq)
    item = jnp.arange(num_items, dtype=jnp.int32)
    local = jnp.minimum(jnp.searchsorted(cum, item, side="right"), num_slots - first_seq - 1)
    seq = (local + first_seq).astype(jnp.int32)
    real = item < cum[-1]
    row_start = cu_q_lens[seq] + (item - (cum[local] - blocks[local])) * block_q
    row_end = jnp.minimum(cu_q_lens[seq + 1], row_start + block_q)
    row_start = jnp.where(real, row_start, 0).astype(jnp.int32)
    row_end = jnp.where(real, row_end, 0).astype(jnp.int32)
    return seq, row_start, row_end


def _kernel(seq_ref, row_start_ref, row_end_ref, kv_lens_ref, cu_ref, table_ref, layer_ref,  # int32 inputs
            q_ref, kv_ref, *refs,  # [T * Hq, D], [L, Hkv, P, S, 2D], ([L, Hkv, P, S, 2] int8 scales),
            # (the aliased output), o_ref [T * Hq, D]
            block_q: int, group: int, group_pad: int, block_kv: int, num_q_heads: int,
            table_width: int, sm_scale: float, sliding_window: bool, soft_cap: float | None):
    scales_ref = refs[0] if len(refs) == 3 else None
    o_ref = refs[-1]
    item = pl.program_id(0)
    kv_head = pl.program_id(1)
    num_pages, page_size = kv_ref.shape[2], kv_ref.shape[3]
    head_dim = q_ref.shape[-1]
    rows = block_q * group_pad

    seq = seq_ref[item]
    row_start = row_start_ref[item]
    row_end = row_end_ref[item]
    layer = layer_ref[0]
    window = layer_ref[1] if sliding_window else None  # [layer, window]: the window may be per layer
    kv_len = kv_lens_ref[seq]
    seq_start = cu_ref[seq]
    ctx_len = kv_len - (cu_ref[seq + 1] - seq_start)  # positions before this step's tokens

    r = jax.lax.broadcasted_iota(jnp.int32, (rows,), 0)
    token = row_start + r // group_pad
    g = r % group_pad
    row_valid = (token < row_end) & (g < group)
    pos = ctx_len + token - seq_start  # query position of every tile row
    # Row of q / of the output in the [T * Hq, D] view (clamped into the item's rows for padding rows).
    q_row = (jnp.clip(token, row_start, jnp.maximum(row_end - 1, row_start)) * num_q_heads
             + kv_head * group + jnp.minimum(g, group - 1))

    first_pos = ctx_len + row_start - seq_start
    key_end = jnp.where(row_end > row_start, jnp.clip(ctx_len + row_end - seq_start, 0, kv_len), 0)
    key_start = 0 if window is None else jnp.maximum(first_pos - window + 1, 0)
    block_lo = key_start // block_kv
    block_hi = jnp.maximum((key_end + block_kv - 1) // block_kv, block_lo)

    q = q_ref[q_row, :]
    kk = jax.lax.broadcasted_iota(jnp.int32, (block_kv,), 0)
    last_key = jnp.maximum(key_end - 1, 0)

    def body(j, carry):
        m, l, acc = carry
        key_pos = j * block_kv + kk
        key_valid = key_pos < key_end
        # Keys past the last one read the last one again (same cache lines: no extra memory
        # traffic, never a garbage page), and are masked below.
        key_read = jnp.minimum(key_pos, last_key)
        col = jnp.minimum(key_read // page_size, table_width - 1)
        page = jnp.clip(table_ref[seq * table_width + col], 0, num_pages - 1)
        slot = key_read % page_size
        k = kv_ref[layer, kv_head, page, slot, pl.ds(0, head_dim)]
        v = kv_ref[layer, kv_head, page, slot, pl.ds(head_dim, head_dim)]
        if scales_ref is not None:  # int8: dequantized with each key's (K, V) scales, [block_kv, 1] each
            k = k.astype(jnp.float32) * scales_ref[layer, kv_head, page, slot, pl.ds(0, 1)]
            v = v.astype(jnp.float32) * scales_ref[layer, kv_head, page, slot, pl.ds(1, 1)]
        k, v = k.astype(q.dtype), v.astype(q.dtype)  # (an fp8 cache: upcast here)
        scores = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())),
                                     preferred_element_type=jnp.float32) * sm_scale
        if soft_cap is not None:
            scores = soft_cap * jnp.tanh(scores / soft_cap)
        mask = (key_pos[None, :] <= pos[:, None]) & key_valid[None, :] & row_valid[:, None]
        if window is not None:
            mask &= key_pos[None, :] > pos[:, None] - window
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
    # Masked store of the real rows only.  Padding rows point one past the end of the output (never
    # written: masked on the GPU, dropped by interpret mode's scatter), so that no two rows of the
    # tile share an address.  The lane index is an array too (interpret mode's masked store takes
    # indices that are all arrays or all slices).
    out_row = jnp.where(row_valid, q_row, o_ref.shape[0])
    lanes = jax.lax.broadcasted_iota(jnp.int32, (1, head_dim), 1)
    pltriton.store(o_ref.at[out_row[:, None], lanes], out.astype(o_ref.dtype), mask=row_valid[:, None])


def _launch(out, q2, kv_cache, layer, kv_lens, table, cu, items, *, cfg: BlockConfig, group: int,
            num_q_heads: int, sm_scale, sliding_window, soft_cap, interpret, name):
    seq, row_start, row_end = items
    caches = tuple(kv_cache) if isinstance(kv_cache, (tuple, list)) else (kv_cache,)  # the int8 (kv, scales)
    num_kv_heads = caches[0].shape[1]
    table_width = table.shape[0] // (cu.shape[0] - 1)
    kernel = functools.partial(_kernel, block_q=cfg.block_q, group=group, group_pad=cfg.group_pad,
                               block_kv=cfg.block_kv, num_q_heads=num_q_heads, table_width=table_width,
                               sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap)
    compiler_params = None
    if not interpret:
        compiler_params = pltriton.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    whole = pl.BlockSpec()  # every input is passed whole: the kernel indexes it
    return pl.pallas_call(
        kernel,
        grid=(seq.shape[0], num_kv_heads),
        in_specs=[whole] * (9 + len(caches)),
        out_specs=whole,
        out_shape=jax.ShapeDtypeStruct(out.shape, out.dtype),
        input_output_aliases={8 + len(caches): 0},
        interpret=interpret,
        compiler_params=compiler_params,
        name=name,
    )(seq, row_start, row_end, kv_lens, cu, table, layer, q2, *caches, out)


@functools.partial(jax.jit, static_argnames=("sm_scale", "soft_cap", "num_decode_rows",
                                             "block_q", "pages_per_block", "block_kv", "interpret",
                                             "num_warps", "num_stages"))
def ragged_paged_attention_gpu(
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
    block_kv: int | None = None,
    interpret: bool = False,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> jax.Array:
    """Pallas (Triton) ragged paged attention; ``interpret=True`` runs it on CPU.

    ``kv_cache``: one array (float32/bfloat16/float16, or float8_e4m3fn, upcast to ``q``'s dtype as it is
    read), or the int8 cache's ``(kv, scales)`` pair (``jaxserve/kv_cache.py``), dequantized as read.

    ``num_decode_rows``: the engine's static promise that rows ``0..N-1`` are single-token
    sequences ``0..N-1`` (decode launch); ``N >= T`` is a decode-only step.  ``block_q`` (tokens
    per work item), ``pages_per_block`` (key block of ``pages_per_block * page_size`` tokens) or
    ``block_kv`` (key block in tokens), ``num_warps`` and ``num_stages`` override ``choose_blocks``
    for every launch; Triton needs ``block_q * G_pad`` and the key block to be powers of two.
    """
    t, hq, d = q.shape
    kv = kv_cache[0] if isinstance(kv_cache, (tuple, list)) else kv_cache  # int8: the (kv, scales) pair
    num_layers, hkv, num_pages, page_size, d2 = kv.shape
    if d2 != 2 * d:
        raise ValueError(f"kv_cache minor dimension {d2} is not 2 * head_dim ({2 * d})")
    if hq % hkv:
        raise ValueError(f"num_q_heads {hq} is not a multiple of num_kv_heads {hkv}")
    group = hq // hkv
    if pages_per_block is not None:
        if block_kv is not None:
            raise ValueError("give pages_per_block or block_kv, not both")
        block_kv = pages_per_block * page_size
    num_slots = page_indices.shape[0]
    nd = min(num_decode_rows, t, num_slots)

    q2 = q.reshape(t * hq, d)  # free: the kernel gathers its rows
    table = page_indices.astype(jnp.int32).reshape(-1)  # free; clamped in the kernel
    kv_lens = kv_lens.astype(jnp.int32)
    cu = cu_q_lens.astype(jnp.int32)
    num_seqs = jnp.asarray(num_seqs, jnp.int32)
    window = 0 if sliding_window is None else sliding_window  # may be traced (a per-layer window)
    layer = jnp.stack([jnp.asarray(layer, jnp.int32).reshape(()), jnp.asarray(window, jnp.int32).reshape(())])
    out = jnp.zeros((t * hq, d), q.dtype)
    opts = dict(group=group, num_q_heads=hq, sm_scale=sm_scale, sliding_window=sliding_window is not None,
                soft_cap=soft_cap, interpret=interpret)
    overrides = dict(block_q=block_q, block_kv=block_kv, num_warps=num_warps, num_stages=num_stages)

    if nd:
        # Decode rows: item i is sequence i, row i (if it is a real sequence).
        cfg = choose_blocks(head_dim=d, group=group, dtype=q.dtype, decode=True, **overrides)
        seq = jnp.arange(nd, dtype=jnp.int32)
        real = seq < num_seqs
        items = (seq, jnp.where(real, seq, 0), jnp.where(real, seq + 1, 0))
        out = _launch(out, q2, kv_cache, layer, kv_lens, table, cu, items, cfg=cfg,
                      name="ragged_paged_attention_gpu_decode", **opts)
    if t > nd and nd < num_slots:  # (with every slot a decode row, the rest is padding)
        cfg = choose_blocks(head_dim=d, group=group, dtype=q.dtype, decode=False, **overrides)
        items = work_items(cu, num_seqs, t - nd, cfg.block_q, first_seq=nd)
        out = _launch(out, q2, kv_cache, layer, kv_lens, table, cu, items, cfg=cfg,
                      name="ragged_paged_attention_gpu", **opts)
    return out.reshape(t, hq, d)
