"""The GPU Pallas kernel (Triton lowering) equals the reference ragged paged attention.

Everything here runs on CPU with ``interpret=True``: it checks the kernel's
logic (work items, GQA row padding, page gathers from the all-layer cache,
masking, the decode/prefill split), not its speed or its lowering (that is
``tests/test_compile_gpu_kernel.py``).

The full grid (page size x head dim x GQA x step mix x dtype) is marked
``slow`` (deselected by default; ``-m slow``); the default set is a covering
subset in which every page size (8/16/32/64), head dim (64/128, and 256 once),
GQA group 1..8 (3, 5, 6, 7 included), mix, dtype and option (sliding window,
soft cap) appears.  Every batch has kv lengths that end mid-page and exactly on
a page boundary, padding rows beyond the last sequence, a padded decode slot
(``kv_len == 0``) and padded sequence slots beyond ``num_seqs``.
"""

from __future__ import annotations

import itertools

import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas import ragged_paged_attention
from kernels_pallas.ragged_paged_attention import ragged_paged_attention_dense, ragged_paged_attention_ref
from kernels_pallas.ragged_paged_attention_gpu import (
    SMEM_MARGIN,
    choose_blocks,
    gpu_unsupported_reason,
    ragged_paged_attention_gpu,
    smem_bytes,
)
from jaxserve.targets import GPU_SHARED_MEMORY_PER_BLOCK

from test_attention import MIXES, NUM_DECODE, TOL, assert_close, make_batch, mix_batch  # noqa: F401


def decode_rows(mix: str) -> int:
    return 0 if mix == "prefill" else NUM_DECODE


def run_kernel(args, *, dtype: str = "float32", num_decode_rows: int = 0, **kw):
    """(kernel, reference, float64 dense) outputs as float32 numpy arrays."""
    q, kv_cache, layer, kv, pages, cu, ns = args
    q, kv_cache = (jnp.asarray(x, dtype) for x in (q, kv_cache))
    sm_scale = q.shape[-1] ** -0.5
    got = ragged_paged_attention_gpu(q, kv_cache, layer, kv, pages, cu, ns, sm_scale=sm_scale,
                                     num_decode_rows=num_decode_rows, interpret=True, **kw)
    assert got.shape == q.shape and got.dtype == q.dtype
    opts = {n: kw[n] for n in ("sliding_window", "soft_cap") if n in kw}
    ref = ragged_paged_attention_ref(q, kv_cache, layer, kv, pages, cu, ns, sm_scale=sm_scale,
                                     num_decode_rows=num_decode_rows, **opts)
    # The float64 textbook version, on the same (possibly bfloat16-rounded) inputs.
    dense = ragged_paged_attention_dense(np.asarray(q, np.float32), np.asarray(kv_cache, np.float32), layer,
                                         kv, pages, cu, ns, sm_scale=sm_scale, **opts)
    return np.asarray(got, np.float32), np.asarray(ref, np.float32), dense


def assert_padding_zero(got, args):
    cu, ns, kv = args[5], int(args[6]), args[3]
    assert not got[int(cu[ns]):].any(), "padding rows must be zero"
    for s in range(ns):
        if kv[s] == 0:
            assert not got[cu[s]:cu[s + 1]].any(), "padded decode slots (kv_len 0) must be zero"


def check_kernel(mix, page_size, head_dim, gqa, dtype, seed=0, **kw):
    args = mix_batch(mix, page_size=page_size, gqa=gqa, head_dim=head_dim, seed=seed)
    got, ref, dense = run_kernel(args, dtype=dtype, num_decode_rows=decode_rows(mix), **kw)
    assert_close(got, ref, dtype)
    assert_close(got, dense, dtype)
    assert_padding_zero(got, args)


OPTIONS = [dict(), dict(sliding_window=11), dict(soft_cap=5.0), dict(sliding_window=20, soft_cap=3.0)]
# Covering subset: every mix, page size, head dim, GQA group 1..8, dtype and option appears.
SMALL = [  # (mix, page_size, head_dim, gqa, dtype, option index)
    ("mixed", 8, 64, 1, "float32", 0),
    ("prefill", 16, 128, 2, "bfloat16", 1),
    ("decode", 32, 64, 3, "float32", 2),
    ("mixed", 64, 128, 4, "bfloat16", 3),
    ("prefill", 8, 64, 5, "float32", 2),
    ("decode", 16, 128, 6, "bfloat16", 0),
    ("mixed", 32, 64, 7, "bfloat16", 1),
    ("prefill", 64, 64, 8, "float32", 3),
    ("decode", 8, 256, 4, "bfloat16", 1),
    ("prefill", 32, 128, 3, "float32", 0),
]
FULL = list(itertools.product(MIXES, [8, 16, 32, 64], [64, 128], range(1, 9), ["float32", "bfloat16"]))


@pytest.mark.parametrize("mix,page_size,head_dim,gqa,dtype,opt", SMALL)
def test_kernel_matches_reference(mix, page_size, head_dim, gqa, dtype, opt):
    check_kernel(mix, page_size, head_dim, gqa, dtype, **OPTIONS[opt])


@pytest.mark.slow
@pytest.mark.parametrize("mix,page_size,head_dim,gqa,dtype", FULL)
def test_kernel_matches_reference_full_grid(mix, page_size, head_dim, gqa, dtype):
    opts = OPTIONS[FULL.index((mix, page_size, head_dim, gqa, dtype)) % len(OPTIONS)]
    check_kernel(mix, page_size, head_dim, gqa, dtype, seed=1, **opts)


def test_block_sizes():
    """Several block sizes give the same result: query blocks that split a sequence or hold one row,
    key blocks of one page, of half a page, of several pages, and longer than a sequence's pages."""
    args = mix_batch("mixed", page_size=8, gqa=3, head_dim=64, seed=3, max_pages_per_seq=5)
    for kw in (dict(block_q=4, pages_per_block=1), dict(block_q=8, pages_per_block=2),
               dict(block_q=2, block_kv=4), dict(block_q=16, pages_per_block=8, num_stages=3)):
        got, ref, _ = run_kernel(args, num_decode_rows=NUM_DECODE, sliding_window=9, **kw)
        assert_close(got, ref, "float32")


def test_decode_split_is_only_a_hint():
    """A mixed batch gives the same result with its decode rows in their own launch or not."""
    args = mix_batch("mixed", page_size=16, gqa=2, head_dim=64, seed=8)
    split, ref, _ = run_kernel(args, num_decode_rows=NUM_DECODE, soft_cap=4.0)
    whole, _, _ = run_kernel(args, num_decode_rows=0, soft_cap=4.0)
    assert_close(split, ref, "float32")
    assert_close(whole, ref, "float32")


def test_padding_does_not_touch_real_rows():
    """Padded sequence slots with garbage kv lengths, page tables and offsets, page-table entries past
    a sequence's pages that point outside the pool, and padding rows whose queries are NaN: real rows
    are unchanged and padding rows are zero."""
    args = mix_batch("mixed", page_size=8, gqa=3, head_dim=64, seed=4)
    q, kv_cache, layer, kv, pages, cu, ns = (np.array(x) for x in args)
    ns = int(ns)
    clean, _, _ = run_kernel(args, num_decode_rows=NUM_DECODE)
    num_pages = kv_cache.shape[2]
    kv[ns:] = 29
    pages[ns:] = np.arange(pages[ns:].size).reshape(pages[ns:].shape) % num_pages
    for s in range(ns):  # entries past the sequence's last page: out of the pool
        pages[s, -(-int(kv[s]) // 8):] = num_pages + 7 + s
    cu[ns + 1:] = cu[ns] + 2 + np.arange(len(cu) - ns - 1)
    q[int(cu[ns]):] = np.nan
    dirty = np.asarray(ragged_paged_attention_gpu(q, kv_cache, layer, kv, pages, cu, np.int32(ns), sm_scale=0.125,
                                                  num_decode_rows=NUM_DECODE, interpret=True))
    np.testing.assert_array_equal(dirty, clean)
    assert not dirty[int(cu[ns]):].any()


def test_no_real_sequence():
    """A warm-up step (num_seqs 0) gives zeros, not NaN, with and without decode rows."""
    for mix in ("prefill", "mixed"):
        args = list(mix_batch(mix, page_size=8, gqa=1, head_dim=64, seed=5))
        args[6] = np.int32(0)
        got, _, _ = run_kernel(args, num_decode_rows=decode_rows(mix))
        assert np.isfinite(got).all() and not got.any()


def test_every_layer_is_read_in_place():
    """The traced ``layer`` picks the layer (both layers of the cache, under jit)."""
    import jax

    args = mix_batch("mixed", page_size=16, gqa=2, head_dim=64, seed=9)
    q, kv_cache, _, kv, pages, cu, ns = args
    fn = jax.jit(lambda layer: ragged_paged_attention_gpu(q, kv_cache, layer, kv, pages, cu, ns, sm_scale=0.125,
                                                          num_decode_rows=NUM_DECODE, interpret=True))
    for layer in (0, 1):
        want = ragged_paged_attention_dense(q, kv_cache, layer, kv, pages, cu, ns, sm_scale=0.125)
        assert_close(np.asarray(fn(np.int32(layer))), want, "float32")


def test_entry_point_gpu_impl():
    """The dispatcher the model calls runs this kernel for impl='pallas_gpu' (interpreted on CPU)."""
    q, kv_cache, layer, kv, pages, cu, ns = mix_batch("mixed", page_size=8, gqa=6, head_dim=64, seed=6)
    got = np.asarray(ragged_paged_attention(q, kv_cache, layer, kv, pages, cu, ns, sm_scale=0.125,
                                            num_decode_rows=NUM_DECODE, sliding_window=12, impl="pallas_gpu"))
    want = ragged_paged_attention_dense(q, kv_cache, layer, kv, pages, cu, ns, sm_scale=0.125, sliding_window=12)
    assert_close(got, want, "float32")


# -- block-size rules and the unsupported-shape reason (pure Python) ------------------------------

@pytest.mark.parametrize("head_dim,dtype", itertools.product([16, 64, 128, 256], ["bfloat16", "float32"]))
def test_default_blocks_fit_shared_memory(head_dim, dtype):
    itemsize = np.dtype(dtype).itemsize
    for group, decode in itertools.product(range(1, 17), (True, False)):
        cfg = choose_blocks(head_dim=head_dim, group=group, dtype=dtype, decode=decode)
        assert cfg.rows >= 16 and cfg.rows & (cfg.rows - 1) == 0
        assert cfg.block_kv >= 16 and cfg.block_kv & (cfg.block_kv - 1) == 0
        assert cfg.group_pad >= group
        need = smem_bytes(rows=cfg.rows, block_kv=cfg.block_kv, head_dim=head_dim, itemsize=itemsize,
                          num_stages=cfg.num_stages)
        assert need <= GPU_SHARED_MEMORY_PER_BLOCK - SMEM_MARGIN, (group, decode, cfg)


def test_unsupported_reason():
    ok = dict(head_dim=128, num_q_heads=32, num_kv_heads=8, page_size=16, dtype="bfloat16")
    assert gpu_unsupported_reason(**ok) is None
    for g in range(1, 9):
        assert gpu_unsupported_reason(**dict(ok, num_q_heads=8 * g)) is None
    assert gpu_unsupported_reason(**dict(ok, head_dim=256, dtype="float32")) is None
    assert gpu_unsupported_reason(**dict(ok, page_size=24)) is None  # any page size
    assert "head_dim" in gpu_unsupported_reason(**dict(ok, head_dim=96))
    assert "head_dim" in gpu_unsupported_reason(**dict(ok, head_dim=8))
    assert "multiple" in gpu_unsupported_reason(**dict(ok, num_q_heads=12))
    assert "dtype" in gpu_unsupported_reason(**dict(ok, dtype="int8"))
    assert "shared memory" in gpu_unsupported_reason(**dict(ok, head_dim=2048, dtype="float32"))
