"""The TPU Pallas (Mosaic) kernel equals the reference ragged paged attention, in TPU interpret mode.

Everything here runs on CPU in Pallas TPU interpret mode: it checks the kernel's logic (indexing,
masking, paging, the layer index, DMA double buffering, the decode/prefill split), not its speed
or its numerics on the MXU.  That it compiles for real TPUs is ``test_compile_tpu_kernel.py``.

The full grid (mix x page size x head dim x GQA x dtype) is marked ``slow`` (deselected by
default; run it with ``-m slow``); the default set is a covering subset: every mix, page size
(8 for float32 only: a bfloat16 page must be 16 rows), head dim 64/128 (256 and an odd head dim
once), GQA 1-8 and dtype appears, and sliding window / soft cap cycle through the cases.  Every
batch has kv lengths that end mid-page and exactly on a page boundary, padding rows beyond the
last sequence, padded sequence slots beyond ``num_seqs`` and a padded decode slot (kv_len 0).
"""

from __future__ import annotations

import itertools
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from jax.experimental.pallas import tpu as pltpu  # noqa: E402


from kernels_pallas import ragged_paged_attention  # noqa: E402
from kernels_pallas.ragged_paged_attention import (  # noqa: E402
    ragged_paged_attention_dense,
    ragged_paged_attention_ref,
)
from kernels_pallas.ragged_paged_attention_tpu import (  # noqa: E402
    block_sizes,
    page_id_window,
    page_table_fits_smem,
    query_alignment,
    SMEM_RESERVE,
    ragged_paged_attention_tpu,
    tpu_unsupported_reason,
)

from test_attention import MIXES, NUM_DECODE, TOL, assert_close, make_batch, mix_batch  # noqa: E402,F401


def decode_rows(mix: str, args) -> int:
    """The engine's hint: all rows of a decode-only step (padding included), the decode rows of a
    mixed one, none for prefill."""
    return {"decode": args[0].shape[0], "mixed": NUM_DECODE, "prefill": 0}[mix]


def run_kernel(args, *, dtype: str = "float32", **kw):
    q, kv_cache, layer, kv_lens, pages, cu, ns = args
    q, kv_cache = jnp.asarray(q, dtype), jnp.asarray(kv_cache, dtype)
    sm_scale = q.shape[-1] ** -0.5
    got = ragged_paged_attention_tpu(q, kv_cache, layer, kv_lens, pages, cu, ns, sm_scale=sm_scale,
                                     interpret=True, **kw)
    assert got.shape == q.shape and got.dtype == q.dtype
    opts = {n: kw[n] for n in ("sliding_window", "soft_cap") if n in kw}
    ref = ragged_paged_attention_ref(q, kv_cache, layer, kv_lens, pages, cu, ns, sm_scale=sm_scale, **opts)
    # The float64 textbook version, on the same (possibly bfloat16-rounded) inputs.
    dense = ragged_paged_attention_dense(np.asarray(q, np.float32), np.asarray(kv_cache, np.float32), layer,
                                         kv_lens, pages, cu, ns, sm_scale=sm_scale, **opts)
    return np.asarray(got, np.float32), np.asarray(ref, np.float32), dense


def check_kernel(mix, page_size, head_dim, gqa, dtype, seed=0, **kw):
    args = mix_batch(mix, page_size=page_size, gqa=gqa, head_dim=head_dim, seed=seed)
    got, ref, dense = run_kernel(args, dtype=dtype, num_decode_rows=decode_rows(mix, args), **kw)
    assert_close(got, ref, dtype)
    assert_close(got, dense, dtype)
    cu, ns, kv_lens = args[5], int(args[6]), args[3]
    assert not got[int(cu[ns]):].any(), "padding rows must be zero"
    for s in range(ns):
        if kv_lens[s] == 0:
            assert not got[cu[s]:cu[s + 1]].any(), "padded decode slots (kv_len 0) must be zero"


OPTIONS = [dict(), dict(sliding_window=11), dict(soft_cap=5.0), dict(sliding_window=20, soft_cap=3.0)]
# Covering subset: every mix, page size, head dim, GQA ratio, dtype and option at least once.
SMALL = [  # (mix, page_size, head_dim, gqa, dtype)
    ("mixed", 8, 64, 1, "float32"),
    ("decode", 16, 128, 2, "bfloat16"),
    ("prefill", 32, 64, 3, "float32"),
    ("mixed", 64, 64, 4, "bfloat16"),
    ("decode", 16, 64, 5, "float32"),
    ("prefill", 16, 128, 6, "bfloat16"),
    ("mixed", 32, 128, 7, "bfloat16"),
    ("decode", 64, 128, 8, "float32"),
    ("mixed", 16, 256, 2, "float32"),
    ("prefill", 16, 96, 2, "bfloat16"),  # head_dim % 128 != 0 and not 64: the zero-extended q path
]
FULL = [(mix, ps, d, g, dt) for mix, ps, d, g, dt in itertools.product(
    MIXES, [8, 16, 32, 64], [64, 128], range(1, 9), ["float32", "bfloat16"])
    if tpu_unsupported_reason(head_dim=d, num_q_heads=2 * g, num_kv_heads=2, page_size=ps, dtype=dt) is None]


@pytest.mark.parametrize("mix,page_size,head_dim,gqa,dtype", SMALL)
def test_kernel_matches_reference(mix, page_size, head_dim, gqa, dtype):
    opts = OPTIONS[SMALL.index((mix, page_size, head_dim, gqa, dtype)) % len(OPTIONS)]
    check_kernel(mix, page_size, head_dim, gqa, dtype, **opts)


@pytest.mark.slow
@pytest.mark.parametrize("mix,page_size,head_dim,gqa,dtype", FULL)
def test_kernel_matches_reference_full_grid(mix, page_size, head_dim, gqa, dtype):
    opts = OPTIONS[FULL.index((mix, page_size, head_dim, gqa, dtype)) % len(OPTIONS)]
    check_kernel(mix, page_size, head_dim, gqa, dtype, seed=1, **opts)


def test_block_sizes_give_the_same_result():
    """Several query/kv block sizes give the same result: query blocks that split a sequence or
    hold several, kv blocks of one page or of more pages than a sequence has (partial blocks)."""
    args = mix_batch("mixed", page_size=8, gqa=2, head_dim=64, seed=3, max_pages_per_seq=5)
    for block_q, pages_per_block in ((4, 1), (8, 3), (32, 8)):
        got, ref, _ = run_kernel(args, block_q=block_q, pages_per_block=pages_per_block, sliding_window=9,
                                 num_decode_rows=NUM_DECODE)
        assert_close(got, ref, "float32")


def test_decode_hint_does_not_change_the_result():
    """``num_decode_rows`` only picks block sizes and where the step is split into a decode and a
    prefill call: no split, the engine's split, a split inside the prefill rows and "all decode"
    give the same output (each call computes every sequence with rows in its part)."""
    args = mix_batch("mixed", page_size=16, gqa=4, head_dim=64, seed=8)
    t = args[0].shape[0]
    outs = [run_kernel(args, num_decode_rows=nd, sliding_window=13)[0] for nd in (0, NUM_DECODE, 7, t)]
    for out in outs[1:]:
        assert_close(out, outs[0], "float32")


def test_padding_does_not_touch_real_rows():
    """Padded sequence slots with garbage kv lengths, page tables and offsets, and padding rows
    whose queries are NaN: real rows are unchanged and padding rows are zero."""
    args = mix_batch("mixed", page_size=8, gqa=2, head_dim=64, seed=4)
    q, kv_cache, layer, kv_lens, pages, cu, ns = (np.array(x) for x in args)
    ns = int(ns)
    clean, _, _ = run_kernel(args, num_decode_rows=NUM_DECODE)
    kv_lens[ns:] = 29
    pages[ns:] = np.arange(pages[ns:].size).reshape(pages[ns:].shape) % kv_cache.shape[2]
    cu[ns + 1:] = cu[ns] + 2 + np.arange(len(cu) - ns - 1)
    q[int(cu[ns]):] = np.nan
    dirty, _, _ = run_kernel((q, kv_cache, layer, kv_lens, pages, cu, np.int32(ns)),
                             num_decode_rows=NUM_DECODE)
    np.testing.assert_array_equal(dirty, clean)
    assert not dirty[int(cu[ns]):].any()


def test_no_real_sequence():
    """A warm-up step (num_seqs 0) gives zeros, not NaN."""
    args = list(mix_batch("prefill", page_size=8, gqa=1, head_dim=64, seed=5))
    args[6] = np.int32(0)
    q, kv_cache = args[0], args[1]
    got = np.asarray(ragged_paged_attention_tpu(q, kv_cache, *args[2:], sm_scale=0.125, interpret=True))
    assert np.isfinite(got).all() and not got.any()


def test_reads_the_given_layer():
    """The kernel reads layer ``layer`` of the cache of all layers: other layers are ignored."""
    q, kv_cache, layer, *rest = mix_batch("mixed", page_size=8, gqa=2, head_dim=64, seed=9)
    assert int(layer) == 1
    other = kv_cache.copy()
    other[0] = np.nan  # the layer that is not read
    got0 = np.asarray(ragged_paged_attention_tpu(q, other, np.int32(1), *rest, sm_scale=0.125,
                                                 interpret=True))
    want = ragged_paged_attention_dense(q, kv_cache, 1, *rest, sm_scale=0.125)
    assert_close(got0, want, "float32")
    swapped = kv_cache[::-1].copy()  # layer 1's data now at layer 0
    got1 = np.asarray(ragged_paged_attention_tpu(q, swapped, np.int32(0), *rest, sm_scale=0.125,
                                                 interpret=True))
    np.testing.assert_array_equal(got1, got0)


def test_double_buffering_has_no_dma_race():
    """TPU interpret mode's race detector finds no read of a VMEM page buffer while a DMA into it
    is in flight (the double buffering, across kv blocks and across sequences, waits before it
    reads and never refills a slot in use)."""
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call as tpu_interpret  # private

    q, kv_cache, layer, kv_lens, pages, cu, ns = mix_batch("mixed", page_size=8, gqa=2, head_dim=64, seed=7)
    params = pltpu.InterpretParams(detect_races=True, dma_execution_mode="eager")
    got = ragged_paged_attention_tpu(q, kv_cache, layer, kv_lens, pages, cu, ns, sm_scale=0.125, block_q=8,
                                     pages_per_block=1, num_decode_rows=NUM_DECODE, interpret=params)
    got.block_until_ready()
    assert tpu_interpret.races is not None and not tpu_interpret.races.races_found
    want = ragged_paged_attention_dense(q, kv_cache, layer, kv_lens, pages, cu, ns, sm_scale=0.125)
    assert_close(np.asarray(got), want, "float32")


def test_entry_point_pallas_tpu():
    """The entry point the model calls, with ``impl="pallas_tpu"`` (interpreted off TPU), gives the
    textbook result."""
    q, kv_cache, layer, kv_lens, pages, cu, ns = mix_batch("mixed", page_size=8, gqa=4, head_dim=64, seed=6)
    got = np.asarray(ragged_paged_attention(q, kv_cache, layer, kv_lens, pages, cu, ns, sm_scale=0.125,
                                            num_decode_rows=NUM_DECODE, sliding_window=12, impl="pallas_tpu"))
    want = ragged_paged_attention_dense(q, kv_cache, layer, kv_lens, pages, cu, ns, sm_scale=0.125,
                                        sliding_window=12)
    assert_close(got, want, "float32")


def test_unsupported_reason_rules():
    ok = dict(head_dim=128, num_q_heads=8, num_kv_heads=2, page_size=16, dtype="bfloat16")
    assert tpu_unsupported_reason(**ok) is None
    assert tpu_unsupported_reason(**dict(ok, dtype="float32", page_size=8)) is None
    for head_dim in (64, 80, 96, 256):
        assert tpu_unsupported_reason(**dict(ok, head_dim=head_dim)) is None
    assert "page_size" in tpu_unsupported_reason(**dict(ok, page_size=8))  # bfloat16 tiles are 16 rows
    assert "page_size" in tpu_unsupported_reason(**dict(ok, dtype="float32", page_size=4))
    assert "head_dim" in tpu_unsupported_reason(**dict(ok, head_dim=72))
    assert "dtype" in tpu_unsupported_reason(**dict(ok, dtype="float16"))
    assert "num_kv_heads" in tpu_unsupported_reason(**dict(ok, num_q_heads=6, num_kv_heads=4))
    # The page table's size is no limit: scalar-prefetched into SMEM (1 MiB on v5e/v6e) if it fits,
    # else kept in HBM.  Llama-3.1's 131072-token context at 16-token pages: 8192 pages per sequence.
    for seqs, pages in ((256, 512), (256, 2048), (64, 8192), (1024, 8192)):
        assert tpu_unsupported_reason(**ok, max_num_seqs=seqs, pages_per_seq=pages) is None
    assert "max_num_seqs" in tpu_unsupported_reason(**ok, max_num_seqs=0, pages_per_seq=16)
    assert page_table_fits_smem(num_slots=256, pages_per_seq=512, num_query_blocks=64)
    assert not page_table_fits_smem(num_slots=256, pages_per_seq=2048)
    assert not page_table_fits_smem(num_slots=64, pages_per_seq=8192)
    assert page_table_fits_smem(num_slots=4, pages_per_seq=4, smem_capacity=SMEM_RESERVE + 6 * 512)
    assert not page_table_fits_smem(num_slots=4, pages_per_seq=40, smem_capacity=SMEM_RESERVE + 6 * 512)
    # Page-id windows are whole 128-word tiles holding any block's ids.
    assert [page_id_window(p) for p in (1, 16, 32, 128, 256, 3, 24, 130)] == [128] * 4 + [256, 256, 256, 384]


def test_unsupported_configuration_raises():
    q = jnp.zeros((4, 2, 64), jnp.bfloat16)
    kv_cache = jnp.zeros((1, 2, 4, 8, 128), jnp.bfloat16)  # bfloat16 pages of 8 rows
    meta = (np.int32(0), np.ones(1, np.int32), np.zeros((1, 1), np.int32), np.array([0, 1], np.int32),
            np.int32(1))
    with pytest.raises(ValueError, match="page_size"):
        ragged_paged_attention_tpu(q, kv_cache, *meta, sm_scale=0.125, interpret=True)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("gqa", range(1, 9))
def test_block_size_choice(dtype, gqa):
    """Query tiles are whole sublane tiles; decode blocks are one tile of rows with long kv blocks,
    prefill blocks have more rows; kv blocks never exceed the page table."""
    align = query_alignment(gqa, dtype)
    packing = 8 if dtype == "float32" else 16
    assert (align * gqa) % packing == 0
    for gen in (5, 6, None):
        common = dict(group=gqa, head_dim=128, page_size=16, dtype=dtype, generation=gen)
        bq_d, ppb_d = block_sizes(decode=True, num_tokens=64, pages_per_seq=256, **common)
        bq_p, ppb_p = block_sizes(decode=False, num_tokens=512, pages_per_seq=256, **common)
        assert bq_d == align and bq_p % align == 0 and bq_p >= bq_d
        assert (bq_p * gqa) % packing == 0
        assert ppb_d * 16 >= 512 and ppb_p >= 1
        assert block_sizes(decode=True, num_tokens=64, pages_per_seq=3, **common)[1] == 3
        short = block_sizes(decode=False, num_tokens=3, pages_per_seq=256, **common)[0]
        assert short == -(-3 // align) * align


# The page table in HBM (page_table_in_smem=False forces the path the kernel takes when the table does
# not fit in SMEM): page ids are copied into SMEM, a tile-aligned window per kv block, one block ahead.
HBM_TABLE = [  # (mix, page_size, head_dim, gqa, dtype, block_q, pages_per_block, options)
    ("mixed", 8, 64, 2, "float32", None, None, dict()),
    ("mixed", 8, 64, 3, "float32", 8, 1, dict(sliding_window=11)),  # one page per block: many blocks
    ("decode", 16, 128, 4, "bfloat16", None, 3, dict(soft_cap=5.0)),  # 3 does not divide 128
    ("prefill", 8, 96, 2, "float32", 8, 2, dict(sliding_window=20, soft_cap=3.0)),
    ("mixed", 16, 64, 1, "bfloat16", 16, 8, dict()),  # blocks longer than every sequence
]


@pytest.mark.parametrize("mix,page_size,head_dim,gqa,dtype,block_q,pages_per_block,options", HBM_TABLE)
def test_page_table_in_hbm_matches_reference(mix, page_size, head_dim, gqa, dtype, block_q, pages_per_block,
                                             options):
    """Kv lengths mid-page and on page boundaries, several sequences per query block, padded slots
    and rows, every mix: the HBM page-table path equals the reference and the SMEM path."""
    args = mix_batch(mix, page_size=page_size, gqa=gqa, head_dim=head_dim, seed=11, max_pages_per_seq=5)
    kw = dict(dtype=dtype, num_decode_rows=decode_rows(mix, args), block_q=block_q,
              pages_per_block=pages_per_block, **options)
    got, ref, dense = run_kernel(args, page_table_in_smem=False, **kw)
    assert_close(got, ref, dtype)
    assert_close(got, dense, dtype)
    cu, ns = args[5], int(args[6])
    assert not got[int(cu[ns]):].any(), "padding rows must be zero"
    smem, _, _ = run_kernel(args, page_table_in_smem=True, **kw)
    np.testing.assert_array_equal(got, smem)


@pytest.mark.parametrize("pages_per_block", [8, 3])
def test_page_table_in_hbm_long_rows(pages_per_block):
    """Sequences of more than 128 pages (page ids beyond the first tile of a row; a row width that is
    not a multiple of 128), decode and prefill rows sharing query blocks, windows of one tile (8
    pages per block) and of two (3 does not divide 128, so a block can straddle tiles)."""
    ps = 8
    args = make_batch(np.random.default_rng(12), page_size=ps, gqa=2, head_dim=64, num_decode_rows=3,
                      num_decode_pad=0, decode_lens=[130 * ps + 3, 128 * ps, 5], pad_rows=2, pad_seqs=1,
                      prefills=[(6, 129 * ps - 2), (4, 2 * ps + 1)], max_pages_per_seq=136)
    got, ref, dense = run_kernel(args, num_decode_rows=3, block_q=8, pages_per_block=pages_per_block,
                                 page_table_in_smem=False, sliding_window=200 if pages_per_block == 3 else None)
    assert_close(got, ref, "float32")
    assert_close(got, dense, "float32")


def test_page_table_in_hbm_has_no_dma_race():
    """With the table in HBM, the race detector finds no read of a page-id window (SMEM) or a page
    buffer (VMEM) while a DMA into it is in flight."""
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call as tpu_interpret  # private

    q, kv_cache, layer, kv_lens, pages, cu, ns = mix_batch("mixed", page_size=8, gqa=2, head_dim=64, seed=13)
    params = pltpu.InterpretParams(detect_races=True, dma_execution_mode="eager")
    got = ragged_paged_attention_tpu(q, kv_cache, layer, kv_lens, pages, cu, ns, sm_scale=0.125, block_q=8,
                                     pages_per_block=1, num_decode_rows=NUM_DECODE, page_table_in_smem=False,
                                     interpret=params)
    got.block_until_ready()
    assert tpu_interpret.races is not None and not tpu_interpret.races.races_found
    want = ragged_paged_attention_dense(q, kv_cache, layer, kv_lens, pages, cu, ns, sm_scale=0.125)
    assert_close(np.asarray(got), want, "float32")


def test_forcing_a_page_table_into_smem_that_does_not_fit_raises():
    q = jnp.zeros((4, 2, 64), jnp.float32)
    kv_cache = jnp.zeros((1, 2, 4, 8, 128), jnp.float32)
    meta = (np.int32(0), np.ones(64, np.int32), np.zeros((64, 8192), np.int32),
            np.array([0, 1] + [1] * 63, np.int32), np.int32(1))
    with pytest.raises(ValueError, match="does not fit in SMEM"):
        ragged_paged_attention_tpu(q, kv_cache, *meta, sm_scale=0.125, page_table_in_smem=True, interpret=True)
