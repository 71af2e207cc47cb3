"""The JAX ragged paged attention (what the engine runs) equals the float64 textbook version.

Batches are built the way the engine builds them: ``D`` decode rows first
(row ``i`` is single-token sequence ``i``; padded decode slots have
``kv_len == 0``), then prefill chunks, each with or without cached context
(a chunk with context is the second or later chunk of a long prompt, or the
recompute of a preempted sequence), then padding rows that belong to no
sequence and padding sequence slots (``q_len == 0``, beyond ``num_seqs``).
Pages are scattered at random over the pool and unused page-table entries hold
garbage page ids.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from kernels_pallas import ragged_paged_attention
from kernels_pallas.ragged_paged_attention import (
    ragged_paged_attention_dense,
    ragged_paged_attention_ref,
)

HEAD_DIM = 16
NUM_KV_HEADS = 2


def make_batch(rng, *, page_size, gqa, num_decode_rows, num_decode_pad, prefills, pad_rows, pad_seqs,
               max_pages_per_seq=12, head_dim=HEAD_DIM, num_kv_heads=NUM_KV_HEADS, decode_lens=None):
    """A ragged step.  ``prefills`` is a list of (q_len, ctx_len); decode contexts are ``decode_lens``
    (one per real decode row) or random."""
    hkv, hq, d = num_kv_heads, num_kv_heads * gqa, head_dim
    if decode_lens is not None:
        assert len(decode_lens) == num_decode_rows - num_decode_pad
        decodes = list(decode_lens)
    else:
        decodes = [int(rng.integers(1, max_pages_per_seq * page_size))
                   for _ in range(num_decode_rows - num_decode_pad)]
    decode_kv = decodes + [0] * num_decode_pad  # padded decode slots: kv_len 0 (still one row each)
    q_lens = [1] * num_decode_rows + [q for q, _ in prefills]
    kv_lens = decode_kv + [q + c for q, c in prefills]
    num_seqs = len(q_lens)
    num_slots = num_seqs + pad_seqs
    assert max(kv_lens, default=0) <= max_pages_per_seq * page_size
    pages_used = [-(-n // page_size) for n in kv_lens]
    num_pages = sum(pages_used) + 3
    perm = rng.permutation(num_pages)
    # Unused entries: garbage (but valid) page ids; the kernel must not read them.
    page_indices = rng.integers(0, num_pages, size=(num_slots, max_pages_per_seq)).astype(np.int32)
    off = 0
    for s, n in enumerate(pages_used):
        page_indices[s, :n] = perm[off:off + n]
        off += n
    cu = np.zeros(num_slots + 1, np.int32)
    cu[1:num_seqs + 1] = np.cumsum(q_lens)
    cu[num_seqs + 1:] = cu[num_seqs]
    t = int(cu[num_seqs]) + pad_rows
    kv = np.zeros(num_slots, np.int32)
    kv[:num_seqs] = kv_lens
    q = rng.standard_normal((t, hq, d)).astype(np.float32) * 2.0
    # The engine's cache of all layers (jaxserve/kv_cache.py): [L, Hkv, pages, page_size, 2D], K in the
    # first D lanes, V in the last D.  The step reads layer 1 of 2, so indexing the layer is exercised.
    layers = 2
    k = rng.standard_normal((layers, hkv, num_pages, page_size, d)).astype(np.float32) * 2.0
    v = rng.standard_normal((layers, hkv, num_pages, page_size, d)).astype(np.float32)
    kv_cache = np.concatenate([k, v], axis=-1)
    return q, kv_cache, np.int32(1), kv, page_indices, cu, np.int32(num_seqs)



# -- shared by the kernels' interpret-mode tests (test_pallas_tpu.py, test_pallas_gpu.py) -----------------

TOL = {"float32": 1e-5, "bfloat16": 2e-2}  # max abs error / max abs output
MIXES = ("decode", "prefill", "mixed")
NUM_DECODE = 4  # decode rows of the decode and mixed batches (one of them a padded slot)


def mix_batch(mix: str, *, page_size: int, gqa: int, head_dim: int, seed: int, max_pages_per_seq: int = 4):
    """A step of the given mix; kv lengths end mid-page and exactly on page boundaries.

    decode: 4 decode rows (one padded slot); prefill: a fresh prompt ending on a page boundary,
    one ending mid-page, and chunks with cached context ending on / off a boundary; mixed: both.
    Every batch also has 3 padding rows and 2 padded sequence slots.
    """
    ps = page_size
    decodes = dict(num_decode_rows=NUM_DECODE, num_decode_pad=1, decode_lens=[2 * ps, ps + 3, 1])
    prefills = [(ps, 0), (ps + 5, 0), (5, 2 * ps - 5), (3, ps + 2)]
    if mix == "decode":
        kw = dict(decodes, prefills=[])
    elif mix == "prefill":
        kw = dict(num_decode_rows=0, num_decode_pad=0, prefills=prefills)
    else:
        kw = dict(decodes, prefills=prefills[1:3])
    return make_batch(np.random.default_rng(seed), page_size=ps, gqa=gqa, head_dim=head_dim, pad_rows=3,
                      pad_seqs=2, max_pages_per_seq=max_pages_per_seq, **kw)



def assert_close(got, want, dtype):
    scale = float(np.abs(want).max())
    err = float(np.abs(got - want).max())
    assert err <= TOL[dtype] * scale, f"max abs error {err:.3g} > {TOL[dtype]} x output scale {scale:.3g}"

def random_prefills(rng, page_size, n):
    """A mix of fresh prompt chunks (no context), chunks with cached context, and one-token chunks."""
    out = []
    for i in range(n):
        kind = i % 3
        q_len = int(rng.integers(1, 3 * page_size + 2)) if kind != 2 else 1
        ctx = 0 if kind == 0 else int(rng.integers(1, 5 * page_size))
        out.append((q_len, ctx))
    return out


def check(args, num_decode_rows, **kw):
    q, kv_cache, layer, kv, pages, cu, num_seqs = args
    sm_scale = HEAD_DIM ** -0.5
    got = np.asarray(ragged_paged_attention_ref(q, kv_cache, layer, kv, pages, cu, num_seqs, sm_scale=sm_scale,
                                                num_decode_rows=num_decode_rows, **kw))
    dense_kw = {k: v for k, v in kw.items() if k != "kv_block_pages"}
    want = ragged_paged_attention_dense(q, kv_cache, layer, kv, pages, cu, num_seqs, sm_scale=sm_scale,
                                        **dense_kw)
    assert got.shape == q.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)
    # Padding rows and padded decode slots are exactly zero.
    end = int(cu[int(num_seqs)])
    assert not got[end:].any()
    for s in range(int(num_seqs)):
        if kv[s] == 0:
            assert not got[cu[s]:cu[s + 1]].any()
    return got


# Every page size x GQA ratio x (decode rows or not); sliding window, soft cap and the KV
# block size cycle through their values so that each appears with each page size.
OPTIONS = [  # (sliding_window, soft_cap, kv_block_pages)
    (None, None, 8), (None, None, 1), (13, None, 8), (None, 3.0, 1), (7, 2.0, 8), (29, None, 1)]
CASES = [(ps, g, nd, *OPTIONS[i % len(OPTIONS)])
         for i, (ps, g, nd) in enumerate(itertools.product([4, 8, 16], [1, 2, 4], [0, 3]))]


@pytest.mark.parametrize("page_size,gqa,num_decode_rows,sliding_window,soft_cap,kv_block_pages", CASES)
def test_ref_matches_dense(page_size, gqa, num_decode_rows, sliding_window, soft_cap, kv_block_pages):
    rng = np.random.default_rng([page_size, gqa, num_decode_rows])
    kw = dict(sliding_window=sliding_window, soft_cap=soft_cap, kv_block_pages=kv_block_pages)
    args = make_batch(rng, page_size=page_size, gqa=gqa, num_decode_rows=num_decode_rows,
                      num_decode_pad=1 if num_decode_rows else 0,
                      prefills=random_prefills(rng, page_size, 4), pad_rows=5, pad_seqs=2)
    check(args, num_decode_rows, **kw)


@pytest.mark.parametrize("num_decode_rows", [0, 4])
def test_decode_only_and_full_batches(num_decode_rows):
    """Only decode rows (no prefill row at all), then the same sequences as one-token chunks
    with num_decode_rows=0: both paths agree with the dense version."""
    rng = np.random.default_rng(7)
    args = make_batch(rng, page_size=8, gqa=2, num_decode_rows=4, num_decode_pad=0, prefills=[], pad_rows=0,
                      pad_seqs=0)
    check(args, num_decode_rows)
    check(args, num_decode_rows, sliding_window=5, kv_block_pages=1)


def test_no_real_sequence():
    """A step with only padding (num_seqs 0, as in warm-up) returns zeros, not NaN."""
    rng = np.random.default_rng(3)
    q, k, v, kv, pages, cu, _ = make_batch(rng, page_size=8, gqa=2, num_decode_rows=0, num_decode_pad=0,
                                           prefills=[(5, 3)], pad_rows=4, pad_seqs=1)
    out = np.asarray(ragged_paged_attention_ref(q, k, v, kv, pages, cu, np.int32(0), sm_scale=0.25))
    assert not out.any()
    out = np.asarray(ragged_paged_attention_ref(q, k, v, np.zeros_like(kv), pages, np.zeros_like(cu),
                                                np.int32(2), sm_scale=0.25, num_decode_rows=2))
    assert np.isfinite(out).all() and not out.any()


def test_context_longer_than_block_and_page_table():
    """Contexts spanning several KV blocks with a page table that is not a multiple of
    kv_block_pages (the blocked loop pads it), single long decode and long chunk."""
    rng = np.random.default_rng(11)
    args = make_batch(rng, page_size=4, gqa=4, num_decode_rows=2, num_decode_pad=0,
                      prefills=[(9, 33), (1, 40), (20, 0)], pad_rows=3, pad_seqs=1, max_pages_per_seq=13)
    for kvb in (1, 3, 8, 16):
        check(args, 2, kv_block_pages=kvb)


def test_public_entry_point():
    """``kernels_pallas.ragged_paged_attention`` (what the model calls) dispatches to the
    reference and rejects unknown implementations naming the field."""
    rng = np.random.default_rng(5)
    q, k, v, kv, pages, cu, ns = make_batch(rng, page_size=8, gqa=2, num_decode_rows=2, num_decode_pad=1,
                                            prefills=[(6, 10), (3, 0)], pad_rows=2, pad_seqs=1)
    got = np.asarray(ragged_paged_attention(q, k, v, kv, pages, cu, ns, sm_scale=0.25, num_decode_rows=2,
                                            sliding_window=9))
    want = ragged_paged_attention_dense(q, k, v, kv, pages, cu, ns, sm_scale=0.25, sliding_window=9)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="attention_impl"):
        ragged_paged_attention(q, k, v, kv, pages, cu, ns, sm_scale=0.25, impl="nope")


@pytest.mark.parametrize("impl", ["reference", "cpu", "pallas_tpu", "pallas_gpu"])
def test_traced_per_layer_window(impl):
    """A model whose layers alternate windows (Gemma) passes each layer's window from inside its layer
    scan: a traced int32 scalar, with ``NO_WINDOW`` for a global layer.  One compiled scan over the
    layers of a two-layer cache gives, per layer, the dense attention with that layer's window."""
    import jax
    import jax.numpy as jnp

    from kernels_pallas.ragged_paged_attention import NO_WINDOW

    rng = np.random.default_rng(7)
    q, kv_cache, _, kv, pages, cu, ns = mix_batch("mixed", page_size=8, gqa=2, head_dim=HEAD_DIM, seed=3)
    kv_cache = np.concatenate([kv_cache, rng.standard_normal(kv_cache.shape).astype(np.float32)], axis=0)
    windows = [5, NO_WINDOW, 13]
    layers = [0, 1, 1]

    @jax.jit
    def run(layer_ids, window_ids):
        def body(_, xs):
            layer, window = xs
            return None, ragged_paged_attention(q, kv_cache, layer, kv, pages, cu, ns, sm_scale=0.25,
                                                num_decode_rows=NUM_DECODE, sliding_window=window, impl=impl)
        return jax.lax.scan(body, None, (layer_ids, window_ids))[1]

    got = np.asarray(run(jnp.asarray(layers, jnp.int32), jnp.asarray(windows, jnp.int32)))
    for i, (layer, window) in enumerate(zip(layers, windows)):
        want = ragged_paged_attention_dense(q, kv_cache, layer, kv, pages, cu, ns, sm_scale=0.25,
                                            sliding_window=None if window == NO_WINDOW else window)
        np.testing.assert_allclose(got[i], want, atol=2e-5, rtol=1e-5, err_msg=f"layer {layer} window {window}")
    # The windows really differ in effect (otherwise the test would prove nothing).
    assert np.abs(got[0] - got[2]).max() > 1e-3 and np.abs(got[1] - got[2]).max() > 1e-3


hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402


@st.composite
def ragged_batches(draw):
    page_size = draw(st.sampled_from([4, 8, 16]))
    gqa = draw(st.sampled_from([1, 2, 4]))
    num_decode_rows = draw(st.integers(0, 4))
    num_decode_pad = draw(st.integers(0, num_decode_rows))
    prefills = draw(st.lists(st.tuples(st.integers(1, 2 * page_size + 3), st.integers(0, 4 * page_size)),
                             max_size=4))
    if num_decode_rows == 0 and not prefills:
        prefills = [(1, 0)]
    opts = dict(sliding_window=draw(st.sampled_from([None, 1, 5, 17])),
                soft_cap=draw(st.sampled_from([None, 1.5])),
                kv_block_pages=draw(st.sampled_from([1, 2, 8])))
    batch = dict(page_size=page_size, gqa=gqa, num_decode_rows=num_decode_rows, num_decode_pad=num_decode_pad,
                 prefills=prefills, pad_rows=draw(st.integers(0, 6)), pad_seqs=draw(st.integers(0, 2)))
    return batch, opts, draw(st.integers(0, 2**32 - 1))


@settings(max_examples=16, deadline=None, derandomize=True)
@given(ragged_batches())
def test_ref_matches_dense_hypothesis(case):
    batch, opts, seed = case
    args = make_batch(np.random.default_rng(seed), **batch)
    check(args, batch["num_decode_rows"], **opts)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_cache_write_puts_each_row_in_its_slot(dtype):
    """The model's cache write (``kv_cache.write_kv``) stores every new token's K and V of one layer at
    its flat slot, side by side on the lanes, leaves every other slot and layer alone and drops padding
    slots past the end."""
    import jax.numpy as jnp

    from jaxserve.kv_cache import kv_cache_shape, write_kv

    rng = np.random.default_rng(3)
    layers, num_pages, page_size, hkv, d = 3, 6, 4, 2, 8
    cache = jnp.asarray(rng.standard_normal(kv_cache_shape(layers, hkv, num_pages, page_size, d)), dtype)
    k = jnp.asarray(rng.standard_normal((5, hkv, d)), dtype)
    v = jnp.asarray(rng.standard_normal((5, hkv, d)), dtype)
    slots = np.array([0, 7, 13, 23, num_pages * page_size + 3])  # the last is padding: dropped
    out = np.asarray(write_kv(cache, jnp.int32(1), k, v, jnp.asarray(slots, jnp.int32)).astype(jnp.float32))
    expect = np.asarray(cache.astype(jnp.float32)).copy()  # [L, Hkv, pages, page_size, 2D]
    flat = expect[1].reshape(hkv, num_pages * page_size, 2 * d)
    rows = np.concatenate([np.asarray(k.astype(jnp.float32)), np.asarray(v.astype(jnp.float32))], -1)
    flat[:, slots[:4]] = rows[:4].transpose(1, 0, 2)
    expect[1] = flat.reshape(hkv, num_pages, page_size, 2 * d)
    np.testing.assert_array_equal(out, expect)
