"""Ragged paged attention: the pure-JAX reference that every kernel must match.

A step of the engine packs the new tokens of several sequences back to back
("ragged"): sequence ``s`` owns query rows ``cu_q_lens[s]:cu_q_lens[s+1]`` and has
``kv_lens[s]`` tokens in total (its cached context followed by its new tokens).
Its keys and values live in a paged cache: position ``p`` of sequence ``s`` is
slot ``p % page_size`` of page ``page_indices[s, p // page_size]`` of layer ``layer``.  The caller
has already written the new tokens' K/V into the cache, so the cache holds every
position ``< kv_lens[s]``.  Query row ``i`` of sequence ``s`` sits at position
``kv_lens[s] - q_len(s) + i`` and attends causally to positions ``<=`` its own
(and, with ``sliding_window=W``, to the last ``W`` positions only).  Rows that
belong to no sequence (padding, ``row >= cu_q_lens[num_seqs]``) return zeros.

Layouts: ``q`` is ``[num_tokens, num_q_heads, head_dim]``; ``kv_cache`` is the
engine's cache of all layers, ``[num_layers, num_kv_heads, num_pages, page_size,
2 * head_dim]`` (K in lanes ``[:D]``, V in ``[D:]``; the layout is owned by
``jaxserve/kv_cache.py``; an int8 cache is the pair ``(kv, scales)``, read through
``read_kv``) and ``layer`` (an int32 scalar, traced under the
model's layer scan) picks the layer; ``num_q_heads`` is a multiple of
``num_kv_heads`` (GQA).

How it is computed (this function is the CPU attention of the engine when the C++ kernel,
``ragged_paged_attention_cpu``, is not built or not served, so its formulation is chosen for speed
on XLA CPU, and stays exact):

* The rows are split at a static ``num_decode_rows``: the engine promises that
  rows ``0..D-1`` are single-token sequences ``0..D-1`` (decode steps; padding
  sequences there have ``kv_lens == 0``).  Those rows read their whole context
  from the pages, in blocks of ``kv_block_pages`` pages with an online softmax,
  inside a ``while_loop`` whose trip count is the longest context in the batch:
  no context-length bucket, no work beyond the longest sequence.
* The remaining rows (prefill chunks, or everything when ``num_decode_rows=0``)
  attend to (a) their sequence's cached context (positions before the chunk),
  with the same blocked loop whose trip count is the longest cached context of
  *these* rows (zero for fresh prompts), and (b) the new tokens of the step
  itself with a dense block-diagonal causal mask over the rows.

``ragged_paged_attention_dense`` below is the textbook per-sequence formulation
used by the tests to check this one.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


_NEG_INF = -1e30  # finite, so fully masked rows give exp(0)*0 = 0, not NaN.
# A traced per-layer window for a layer that has none: longer than any context, small enough that
# ``position - NO_WINDOW`` never overflows int32.
NO_WINDOW = 1 << 30


def split_cache(kv_cache):
    """``(kv, scales)``: an int8 cache is the pair (``jaxserve/kv_cache.py``), any other one array
    (scales ``None``)."""
    if isinstance(kv_cache, (tuple, list)):
        return kv_cache[0], kv_cache[1]
    return kv_cache, None


def as_values(block: jax.Array, dtype) -> jax.Array:
    """Cache contents as ``dtype`` values: a 16-bit cache on XLA CPU is stored as its uint16 bits, an fp8
    one as its uint8 bits (``jaxserve/kv_cache.py``, ``storage_dtype``), bitcast here, after the gather,
    for the few pages read."""
    if block.dtype == jnp.uint16:
        return jax.lax.bitcast_convert_type(block, dtype)
    if block.dtype == jnp.uint8:
        block = jax.lax.bitcast_convert_type(block, jnp.float8_e4m3fn)
    return block.astype(dtype)


def read_kv(kv_cache, index, dtype) -> jax.Array:
    """``kv_cache[index]`` (K and V lanes, ``[..., 2D]``) as ``dtype`` values: bitcast from the storage
    dtype, upcast from fp8, or dequantized with the int8 cache's per-token scales (gathered with the same
    ``index``: the scales share the cache's page indexing)."""
    kv, scales = split_cache(kv_cache)
    block = kv[index]
    if scales is None:
        return as_values(block, dtype)
    s = scales[index]  # [..., 2]: (K scale, V scale)
    x = block.astype(jnp.float32).reshape(*block.shape[:-1], 2, block.shape[-1] // 2) * s[..., None]
    return x.reshape(block.shape).astype(dtype)


def _soft_cap(scores: jax.Array, soft_cap: float | None) -> jax.Array:
    if soft_cap is None:
        return scores
    return soft_cap * jnp.tanh(scores / soft_cap)


def _online_update(carry, scores, mask, v, pv_spec="rkgb,rbkd->rkgd"):
    """One online-softmax step.

    carry: (m [R,K,G], l [R,K,G], acc [R,K,G,D]); scores [R,K,G,B]; mask [R,B]
    (or [R,S] for the in-step block) marks the keys each row may see; v holds
    the values in the layout named by ``pv_spec``.
    """
    m, l, acc = carry
    mask = mask[:, None, None, :]
    scores = jnp.where(mask, scores, _NEG_INF)
    m_new = jnp.maximum(m, scores.max(axis=-1))
    p = jnp.where(mask, jnp.exp(scores - m_new[..., None]), 0.0)
    alpha = jnp.exp(m - m_new)
    l_new = alpha * l + p.sum(axis=-1)
    if isinstance(pv_spec, tuple):  # paged values [R, P, K, S, D]: split the key axis into (P, S)
        _, num_p, num_s = pv_spec
        pv = jnp.einsum("rkgps,rpksd->rkgd", p.reshape(*p.shape[:-1], num_p, num_s), v)
    else:
        pv = jnp.einsum(pv_spec, p, v)
    acc_new = alpha[..., None] * acc + pv
    return m_new, l_new, acc_new


def _paged_context_loop(q, kv_cache, layer, row_pages, row_pos, row_ctx_len, carry, *,
                        sliding_window, soft_cap, block_pages, kv_dtype):
    page_size = split_cache(kv_cache)[0].shape[3]
    block = block_pages * page_size
    num_blocks = (jnp.max(row_ctx_len, initial=0) + block - 1) // block
    first_block = 0
    if sliding_window is not None:
        # No row sees a key before its window: start at the first block any row's window reaches.
        first_key = jnp.where(row_ctx_len > 0, row_pos - sliding_window + 1, jnp.iinfo(jnp.int32).max)
        first_block = jnp.minimum(jnp.clip(jnp.min(first_key, initial=jnp.iinfo(jnp.int32).max), 0) // block,
                                  num_blocks)
    r, k, g, d = q.shape

    def body(i, carry):
        pages = jax.lax.dynamic_slice_in_dim(row_pages, i * block_pages, block_pages, axis=1)
        kvb = read_kv(kv_cache, (layer, slice(None), pages), kv_dtype).astype(q.dtype)  # [R, P, K, S, 2D]
        kb, vb = kvb[..., :d], kvb[..., d:]
        scores = jnp.einsum("rkgd,rpksd->rkgps", q, kb).reshape(r, k, g, block)
        scores = _soft_cap(scores, soft_cap)
        kpos = i * block + jnp.arange(block)
        mask = kpos[None, :] < row_ctx_len[:, None]
        if sliding_window is not None:
            mask &= kpos[None, :] > row_pos[:, None] - sliding_window
        return _online_update(carry, scores, mask, vb.reshape(r, block_pages, k, page_size, d),
                              pv_spec=("rkgb,rpksd->rkgd", block_pages, page_size))

    return jax.lax.fori_loop(first_block, num_blocks, body, carry)


def _paged_context(q, kv_cache, layer, row_pages, row_pos, row_ctx_len, *,
                   sliding_window, soft_cap, kv_block_pages, kv_dtype, num_groups=4, **_):
    """Online softmax of rows over the first ``row_ctx_len[r]`` positions of their pages.

    q: [R,K,G,D] (already scaled); row_pages: [R, P] page table of each row's
    sequence; row_pos: [R] query position; row_ctx_len: [R] number of context
    positions each row may read from the pages.  Returns the (m, l, acc) carry.

    The loop runs over blocks of ``kv_block_pages`` pages, as many as the longest
    context needs.  Rows are sorted by context length and split into
    ``num_groups`` groups with a loop each, so short rows stop early.
    """
    r, k, g, d = q.shape
    num_cols = row_pages.shape[1]
    block_pages = min(kv_block_pages, num_cols)
    pad = (-num_cols) % block_pages
    if pad:
        row_pages = jnp.pad(row_pages, ((0, 0), (0, pad)))
    opts = dict(sliding_window=sliding_window, soft_cap=soft_cap, block_pages=block_pages, kv_dtype=kv_dtype)
    if r < 2 * num_groups:
        return _paged_context_loop(q, kv_cache, layer, row_pages, row_pos, row_ctx_len,
                                   _init_carry(r, k, g, d), **opts)
    order = jnp.argsort(row_ctx_len)
    q, row_pages, row_pos, row_ctx_len = q[order], row_pages[order], row_pos[order], row_ctx_len[order]
    bounds = [round(i * r / num_groups) for i in range(num_groups + 1)]
    parts = [_paged_context_loop(q[lo:hi], kv_cache, layer, row_pages[lo:hi], row_pos[lo:hi],
                                 row_ctx_len[lo:hi], _init_carry(hi - lo, k, g, d), **opts)
             for lo, hi in zip(bounds[:-1], bounds[1:])]
    inverse = jnp.argsort(order)
    return tuple(jnp.concatenate(xs, axis=0)[inverse] for xs in zip(*parts))


def _new_token_attention(q, k_new, v_new, seq, pos, first_row, row_valid, *, sliding_window, soft_cap,
                         tile=64):
    """Attention of prefill rows to the step's own new tokens, tiled to skip what the mask removes.

    Rows are cut into tiles of ``tile`` rows.  A tile's keys are the new tokens
    from the first row of its first row's sequence (``first_row``) up to the
    tile's end, so each tile loops only over the key tiles its sequences cover
    (the block-diagonal, causal structure of a ragged prefill), not all rows.
    Heads are laid out [H, rows, keys] with K/V repeated per query head, which
    on XLA CPU is about 3x faster than a separate GQA axis.

    Returns (m, l, acc) in the [R, K, G(, D)] layout of ``_paged_context``.
    """
    r, k, g, d = q.shape
    h = k * g
    tile = min(tile, r)
    pad = (-r) % tile
    qh = q.reshape(r, h, d)
    kh, vh = jnp.repeat(k_new, g, axis=1), jnp.repeat(v_new, g, axis=1)
    if pad:
        qh, kh, vh = (jnp.pad(x, ((0, pad), (0, 0), (0, 0))) for x in (qh, kh, vh))
        seq, pos, first_row = (jnp.pad(x, (0, pad)) for x in (seq, pos, first_row))
        row_valid = jnp.pad(row_valid, (0, pad))
    ms, ls, accs = [], [], []
    for i in range(qh.shape[0] // tile):
        lo = i * tile
        q_t, seq_t, pos_t = qh[lo:lo + tile], seq[lo:lo + tile], pos[lo:lo + tile]
        start_tile = jnp.where(row_valid[lo], first_row[lo] // tile, i)

        def body(j, carry, q_t=q_t, seq_t=seq_t, pos_t=pos_t):
            m, l, acc = carry
            ks = jax.lax.dynamic_slice_in_dim(kh, j * tile, tile)
            vs = jax.lax.dynamic_slice_in_dim(vh, j * tile, tile)
            seq_s = jax.lax.dynamic_slice_in_dim(seq, j * tile, tile)
            pos_s = jax.lax.dynamic_slice_in_dim(pos, j * tile, tile)
            valid_s = jax.lax.dynamic_slice_in_dim(row_valid, j * tile, tile)
            mask = (seq_t[:, None] == seq_s[None, :]) & (pos_s[None, :] <= pos_t[:, None]) & valid_s[None, :]
            if sliding_window is not None:
                mask &= pos_s[None, :] > pos_t[:, None] - sliding_window
            scores = _soft_cap(jnp.einsum("thd,shd->hts", q_t, ks), soft_cap)
            scores = jnp.where(mask[None], scores, _NEG_INF)
            m_new = jnp.maximum(m, scores.max(axis=-1))
            p = jnp.where(mask[None], jnp.exp(scores - m_new[..., None]), 0.0)
            alpha = jnp.exp(m - m_new)
            return (m_new, alpha * l + p.sum(axis=-1),
                    alpha[..., None] * acc + jnp.einsum("hts,shd->htd", p, vs))

        init = (jnp.full((h, tile), _NEG_INF, jnp.float32), jnp.zeros((h, tile), jnp.float32),
                jnp.zeros((h, tile, d), jnp.float32))
        m, l, acc = jax.lax.fori_loop(start_tile, i + 1, body, init)
        ms.append(m)
        ls.append(l)
        accs.append(acc)
    m = jnp.concatenate(ms, axis=1)[:, :r].T.reshape(r, k, g)
    l = jnp.concatenate(ls, axis=1)[:, :r].T.reshape(r, k, g)
    acc = jnp.concatenate(accs, axis=1)[:, :r].transpose(1, 0, 2).reshape(r, k, g, d)
    return m, l, acc


def _merge(a, b):
    """Combine two partial softmaxes (m, l, acc) over disjoint key sets."""
    m = jnp.maximum(a[0], b[0])
    wa, wb = jnp.exp(a[0] - m), jnp.exp(b[0] - m)
    return m, wa * a[1] + wb * b[1], wa[..., None] * a[2] + wb[..., None] * b[2]


def _init_carry(r, k, g, d, dtype=jnp.float32):
    return (jnp.full((r, k, g), _NEG_INF, dtype), jnp.zeros((r, k, g), dtype),
            jnp.zeros((r, k, g, d), dtype))


def _finish(carry):
    m, l, acc = carry
    return acc / jnp.where(l > 0, l, 1.0)[..., None]


@functools.partial(jax.jit, static_argnames=("sm_scale", "num_decode_rows", "soft_cap", "kv_block_pages",
                                             "prefill_rows_only"))
def ragged_paged_attention_ref(
    q: jax.Array,
    kv_cache: jax.Array,
    layer: jax.Array,
    kv_lens: jax.Array,
    page_indices: jax.Array,
    cu_q_lens: jax.Array,
    num_seqs: jax.Array,
    *,
    sm_scale: float,
    num_decode_rows: int = 0,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    kv_block_pages: int | None = None,
    prefill_rows_only: bool = False,
) -> jax.Array:
    """Reference ragged paged attention (see the module docstring for the contract).

    ``sliding_window``: ``None`` (no window), or the window as a Python int or an int32 scalar that
    may be traced (a model whose layers alternate windows passes its layer's window from inside the
    layer scan; a layer without a window then passes a window longer than any context, e.g.
    ``NO_WINDOW``).

    ``kv_block_pages``: pages per step of the context loop; default: 64 tokens' worth
    (measured fastest on XLA CPU among 16-256 token blocks).

    ``prefill_rows_only``: the first ``num_decode_rows`` rows are left zero, not computed (the C++ CPU
    kernel computes them: ``ragged_paged_attention_cpu``).
    """
    t, hq, d = q.shape
    kv = split_cache(kv_cache)[0]
    if kv_block_pages is None:
        kv_block_pages = max(1, 64 // kv.shape[3])
    hkv = kv.shape[1]
    g = hq // hkv
    num_slots = kv_lens.shape[0]
    out_dtype = q.dtype
    qf = (q.astype(jnp.float32) * sm_scale).reshape(t, hkv, g, d)
    opts = dict(sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap,
                kv_block_pages=kv_block_pages, kv_dtype=out_dtype)
    outs = []

    nd = num_decode_rows
    if nd and prefill_rows_only:
        outs.append(jnp.zeros((nd, hkv, g, d), jnp.float32))
    elif nd:
        # Decode rows: row i is sequence i, one query at position kv_len-1.
        lens = kv_lens[:nd]
        carry = _paged_context(qf[:nd], kv_cache, layer, page_indices[:nd], lens - 1, lens, **opts)
        outs.append(_finish(carry))

    if t > nd:
        rows = jnp.arange(nd, t)
        seq_valid = jnp.arange(num_slots) < num_seqs
        ends = jnp.where(seq_valid, cu_q_lens[1:], jnp.iinfo(jnp.int32).max)
        # Sequence of each row: number of sequences that end at or before it.
        seq = jnp.sum(rows[:, None] >= ends[None, :], axis=1)
        row_valid = rows < cu_q_lens[num_seqs]
        seq = jnp.where(row_valid, jnp.minimum(seq, num_slots - 1), 0)
        q_start = cu_q_lens[seq]
        q_len = cu_q_lens[seq + 1] - q_start
        ctx_len = kv_lens[seq] - q_len
        pos = ctx_len + rows - q_start
        # A sequence with fewer kv than query tokens (padding) has no valid rows.
        row_valid &= pos >= 0
        ctx_len = jnp.where(row_valid, ctx_len, 0)
        pos = jnp.where(row_valid, pos, 0)
        qr = qf[nd:]
        r = t - nd
        row_pages = page_indices[seq]
        # (a) cached context of each row's sequence, read from the pages.
        carry = _paged_context(qr, kv_cache, layer, row_pages, pos, ctx_len, **opts)
        # (b) the new tokens of this step (block-diagonal causal), then both merged.
        page_size = kv.shape[3]
        page = jnp.take_along_axis(row_pages, (pos // page_size)[:, None], axis=1)[:, 0]
        heads = jnp.arange(hkv)[None, :]  # one index per (row, head): the gather's window is the lanes
        kv_new = read_kv(kv_cache, (layer, heads, page[:, None], (pos % page_size)[:, None]),
                         out_dtype).astype(jnp.float32)  # [R, K, 2D]
        k_new, v_new = kv_new[..., :d], kv_new[..., d:]
        first_row = q_start - nd  # first prefill row of each row's sequence
        new = _new_token_attention(qr, k_new, v_new, seq, pos, first_row, row_valid,
                                   sliding_window=sliding_window, soft_cap=soft_cap)
        out = _finish(_merge(carry, new))
        outs.append(jnp.where(row_valid[:, None, None, None], out, 0.0))

    out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=0)
    return out.reshape(t, hq, d).astype(out_dtype)


def ragged_paged_attention_dense(q, kv_cache, layer, kv_lens, page_indices, cu_q_lens, num_seqs,
                                 *, sm_scale, sliding_window=None, soft_cap=None) -> np.ndarray:
    """Per-sequence dense causal attention in float64 numpy: the textbook definition."""
    q = np.asarray(q, np.float64)
    if split_cache(kv_cache)[1] is not None:  # int8 with scales: dequantized
        kv = np.asarray(read_kv(kv_cache, int(layer), jnp.float32), np.float64)  # [K, pages, page_size, 2D]
    else:
        kv = np.asarray(np.asarray(kv_cache)[int(layer)], np.float64)
    t, hq, d = q.shape
    k_pages = kv[..., :d].transpose(1, 2, 0, 3)  # [pages, page_size, K, D]
    v_pages = kv[..., d:].transpose(1, 2, 0, 3)
    kv_lens, page_indices, cu_q_lens = map(np.asarray, (kv_lens, page_indices, cu_q_lens))
    page_size, hkv = k_pages.shape[1], k_pages.shape[2]
    g = hq // hkv
    out = np.zeros_like(q)
    for s in range(int(num_seqs)):
        lo, hi = int(cu_q_lens[s]), int(cu_q_lens[s + 1])
        n = int(kv_lens[s])
        if hi == lo or n == 0:
            continue
        pos = np.arange(n)
        k = k_pages[page_indices[s, pos // page_size], pos % page_size]  # [n, K, D]
        v = v_pages[page_indices[s, pos // page_size], pos % page_size]
        k = np.repeat(k, g, axis=1)
        v = np.repeat(v, g, axis=1)
        qpos = n - (hi - lo) + np.arange(hi - lo)
        scores = np.einsum("qhd,khd->hqk", q[lo:hi], k) * sm_scale
        if soft_cap is not None:
            scores = soft_cap * np.tanh(scores / soft_cap)
        mask = pos[None, :] <= qpos[:, None]
        if sliding_window is not None:
            mask &= pos[None, :] > qpos[:, None] - sliding_window
        scores = np.where(mask[None], scores, -np.inf)
        p = np.exp(scores - scores.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        out[lo:hi] = np.einsum("hqk,khd->qhd", p, v)
    return out
