"""The Pallas kernels (TPU: Mosaic, GPU: Triton lowering) equal the reference ragged paged attention.

Everything here runs on CPU in Pallas interpret mode (TPU interpret mode for the
TPU kernel, ``interpret=True`` for the GPU kernel): it checks the kernels' logic
(indexing, masking, paging, DMA double buffering), not their speed or their
lowering on real hardware.

The full grid (page size x head dim x GQA x sequence mix x dtype x kernel) is
marked ``slow`` (deselected by default; run it with ``-m slow``); the default
set is a covering subset: every page size, head dim, GQA ratio, mix and dtype
appears for both kernels.  Every batch has kv lengths that end mid-page and
exactly on a page boundary, padding rows beyond the last sequence, and padded
sequence slots beyond ``num_seqs``.
"""

from __future__ import annotations

import itertools

import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu
import numpy as np
import pytest
from conftest import ENGINE_KW, assert_clean, greedy, random_prompts
from test_attention import make_batch

from jaxserve import Engine
from jaxserve.config import EngineConfig
from kernels_pallas import ATTENTION_IMPLS, ragged_paged_attention, resolve_impl
from kernels_pallas.ragged_paged_attention import ragged_paged_attention_dense, ragged_paged_attention_ref
from kernels_pallas.ragged_paged_attention_gpu import ragged_paged_attention_gpu
from kernels_pallas.ragged_paged_attention_tpu import ragged_paged_attention_tpu

KERNELS = {"tpu": ragged_paged_attention_tpu, "gpu": ragged_paged_attention_gpu}
TOL = {"float32": 1e-5, "bfloat16": 2e-2}  # max abs error / max abs output
MIXES = ("decode", "prefill", "mixed")


def mix_batch(mix: str, *, page_size: int, gqa: int, head_dim: int, seed: int, max_pages_per_seq: int = 4):
    """A step of the given mix; kv lengths end mid-page and exactly on page boundaries.

    decode: 4 decode rows (one padded slot); prefill: a fresh prompt ending on a page boundary,
    one ending mid-page, and chunks with cached context ending on / off a boundary; mixed: both.
    Every batch also has 3 padding rows and 2 padded sequence slots.
    """
    ps = page_size
    decodes = dict(num_decode_rows=4, num_decode_pad=1, decode_lens=[2 * ps, ps + 3, 1])
    prefills = [(ps, 0), (ps + 5, 0), (5, 2 * ps - 5), (3, ps + 2)]
    if mix == "decode":
        kw = dict(decodes, prefills=[])
    elif mix == "prefill":
        kw = dict(num_decode_rows=0, num_decode_pad=0, prefills=prefills)
    else:
        kw = dict(decodes, prefills=prefills[1:3])
    return make_batch(np.random.default_rng(seed), page_size=ps, gqa=gqa, head_dim=head_dim, pad_rows=3,
                      pad_seqs=2, max_pages_per_seq=max_pages_per_seq, **kw)


def run_kernel(kernel: str, args, *, dtype: str = "float32", **kw):
    q, k, v, kv, pages, cu, ns = args
    q, k, v = (jnp.asarray(x, dtype) for x in (q, k, v))
    sm_scale = q.shape[-1] ** -0.5
    got = KERNELS[kernel](q, k, v, kv, pages, cu, ns, sm_scale=sm_scale, interpret=True, **kw)
    opts = {n: kw[n] for n in ("sliding_window", "soft_cap") if n in kw}
    ref = ragged_paged_attention_ref(q, k, v, kv, pages, cu, ns, sm_scale=sm_scale, **opts)
    assert got.shape == q.shape and got.dtype == q.dtype
    # The float64 textbook version, on the same (possibly bfloat16-rounded) inputs.
    dense = ragged_paged_attention_dense(*(np.asarray(x, np.float32) for x in (q, k, v)), kv, pages, cu, ns,
                                         sm_scale=sm_scale, **opts)
    return np.asarray(got, np.float32), np.asarray(ref, np.float32), dense


def assert_close(got, want, dtype):
    scale = float(np.abs(want).max())
    err = float(np.abs(got - want).max())
    assert err <= TOL[dtype] * scale, f"max abs error {err:.3g} > {TOL[dtype]} x output scale {scale:.3g}"


def check_kernel(kernel, mix, page_size, head_dim, gqa, dtype, seed=0, **kw):
    args = mix_batch(mix, page_size=page_size, gqa=gqa, head_dim=head_dim, seed=seed)
    got, ref, dense = run_kernel(kernel, args, dtype=dtype, **kw)
    assert_close(got, ref, dtype)
    assert_close(got, dense, dtype)
    cu, ns = args[5], int(args[6])
    assert not got[int(cu[ns]):].any(), "padding rows must be zero"
    kv = args[3]
    for s in range(ns):
        if kv[s] == 0:
            assert not got[cu[s]:cu[s + 1]].any(), "padded decode slots (kv_len 0) must be zero"


OPTIONS = [dict(), dict(sliding_window=11), dict(soft_cap=5.0), dict(sliding_window=20, soft_cap=3.0)]
FULL = list(itertools.product(KERNELS, MIXES, [8, 16, 32], [64, 128], [1, 2, 4, 8], ["float32", "bfloat16"]))
# Covering subset: per kernel, every mix, page size, head dim, GQA ratio and dtype (and option) at least once.
SMALL = [
    ("tpu", "mixed", 8, 64, 2, "float32"),
    ("tpu", "decode", 16, 128, 8, "bfloat16"),
    ("tpu", "prefill", 32, 64, 1, "float32"),
    ("tpu", "mixed", 16, 64, 4, "bfloat16"),
    ("gpu", "mixed", 16, 64, 1, "float32"),
    ("gpu", "prefill", 8, 128, 4, "bfloat16"),
    ("gpu", "decode", 32, 64, 2, "float32"),
    ("gpu", "mixed", 8, 64, 8, "bfloat16"),
]


@pytest.mark.parametrize("kernel,mix,page_size,head_dim,gqa,dtype", SMALL)
def test_kernel_matches_reference(kernel, mix, page_size, head_dim, gqa, dtype):
    opts = OPTIONS[SMALL.index((kernel, mix, page_size, head_dim, gqa, dtype)) % len(OPTIONS)]
    check_kernel(kernel, mix, page_size, head_dim, gqa, dtype, **opts)


@pytest.mark.slow
@pytest.mark.parametrize("kernel,mix,page_size,head_dim,gqa,dtype", FULL)
def test_kernel_matches_reference_full_grid(kernel, mix, page_size, head_dim, gqa, dtype):
    opts = OPTIONS[FULL.index((kernel, mix, page_size, head_dim, gqa, dtype)) % len(OPTIONS)]
    check_kernel(kernel, mix, page_size, head_dim, gqa, dtype, seed=1, **opts)


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_block_sizes(kernel):
    """Several query/kv block sizes give the same result: query blocks that split a sequence
    or hold several, kv blocks of one page or of more pages than a sequence has."""
    args = mix_batch("mixed", page_size=8, gqa=2, head_dim=64, seed=3, max_pages_per_seq=5)
    for block_q, pages_per_block in ((8, 1), (16, 3), (32, 8)):
        got, ref, _ = run_kernel(kernel, args, block_q=block_q, pages_per_block=pages_per_block,
                                 sliding_window=9)
        assert_close(got, ref, "float32")


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_padding_does_not_touch_real_rows(kernel):
    """Padded sequence slots with garbage kv lengths, page tables and offsets, and padding rows
    whose queries are NaN: real rows are unchanged and padding rows are zero."""
    args = mix_batch("mixed", page_size=8, gqa=2, head_dim=64, seed=4)
    q, k, v, kv, pages, cu, ns = (np.array(x) for x in args)
    ns = int(ns)
    clean, _, _ = run_kernel(kernel, args)
    kv[ns:] = 29
    pages[ns:] = np.arange(pages[ns:].size).reshape(pages[ns:].shape) % k.shape[0]
    cu[ns + 1:] = cu[ns] + 2 + np.arange(len(cu) - ns - 1)
    q[int(cu[ns]):] = np.nan
    dirty, _, _ = run_kernel(kernel, (q, k, v, kv, pages, cu, np.int32(ns)))
    np.testing.assert_array_equal(dirty, clean)
    assert not dirty[int(cu[ns]):].any()


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_no_real_sequence(kernel):
    """A warm-up step (num_seqs 0) gives zeros, not NaN."""
    args = list(mix_batch("prefill", page_size=8, gqa=1, head_dim=64, seed=5))
    args[6] = np.int32(0)
    got, _, _ = run_kernel(kernel, args)
    assert np.isfinite(got).all() and not got.any()


def test_tpu_double_buffering_has_no_dma_race():
    """TPU interpret mode's race detector finds no read of a VMEM page buffer while a DMA into it
    is in flight (the double buffering waits before it reads, and never refills a slot in use)."""
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call as tpu_interpret  # private

    q, k, v, kv, pages, cu, ns = mix_batch("mixed", page_size=8, gqa=2, head_dim=64, seed=7)
    params = pltpu.InterpretParams(detect_races=True, dma_execution_mode="eager")
    got = ragged_paged_attention_tpu(q, k, v, kv, pages, cu, ns, sm_scale=0.125, pages_per_block=1,
                                     interpret=params)
    got.block_until_ready()
    assert tpu_interpret.races is not None and not tpu_interpret.races.races_found
    want = ragged_paged_attention_dense(q, k, v, kv, pages, cu, ns, sm_scale=0.125)
    assert_close(np.asarray(got), want, "float32")


def test_resolve_impl_per_backend():
    assert resolve_impl("auto", "tpu") == ("tpu", False)
    assert resolve_impl("auto", "gpu") == ("gpu", False)
    assert resolve_impl("auto", "cpu") == ("reference", False)
    assert resolve_impl("pallas", "tpu") == ("tpu", False)
    assert resolve_impl("pallas", "gpu") == ("gpu", False)
    assert resolve_impl("pallas", "cpu") == ("gpu", True)
    assert resolve_impl("pallas_tpu", "cpu") == ("tpu", True)
    assert resolve_impl("pallas_tpu", "tpu") == ("tpu", False)
    assert resolve_impl("pallas_gpu", "tpu") == ("gpu", True)
    assert resolve_impl("reference", "gpu") == ("reference", False)
    with pytest.raises(ValueError, match="attention_impl"):
        resolve_impl("triton")


@pytest.mark.parametrize("impl", ATTENTION_IMPLS)
def test_entry_point_every_impl(impl):
    """The entry point the model calls gives the reference's result with every implementation."""
    q, k, v, kv, pages, cu, ns = mix_batch("mixed", page_size=8, gqa=4, head_dim=64, seed=6)
    got = np.asarray(ragged_paged_attention(q, k, v, kv, pages, cu, ns, sm_scale=0.125, num_decode_rows=4,
                                            sliding_window=12, impl=impl))
    want = ragged_paged_attention_dense(q, k, v, kv, pages, cu, ns, sm_scale=0.125, sliding_window=12)
    assert_close(got, want, "float32")


def test_engine_config_validates_attention_impl():
    with pytest.raises(ValueError, match="attention_impl"):
        EngineConfig(attention_impl="flash").validate()
    EngineConfig(attention_impl="pallas").validate()


def test_engine_pallas_greedy_tokens_match_reference(llama_dir, reference_outputs):
    """The engine with attention_impl="pallas" (the GPU kernel, interpreted on CPU) produces the
    reference engine's greedy tokens: decode batches, a chunked prompt, page boundaries."""
    prompts = random_prompts([5, 17, 80], seed=21)
    max_tokens = [12, 9, 6]
    engine = Engine.from_pretrained(llama_dir, attention_impl="pallas", **ENGINE_KW)
    outs = engine.generate(prompts, [greedy(n) for n in max_tokens])
    assert_clean(engine)
    assert [o.token_ids for o in outs] == reference_outputs(prompts, max_tokens)
