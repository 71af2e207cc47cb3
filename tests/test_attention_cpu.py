"""The C++ CPU attention kernel (``attention_impl="cpu"``, ``csrc/attention_cpu/`` behind ``jax.ffi``): it is
built (a missing extension FAILS here: ``pip install -e .`` builds it, CI too), it equals the float64
textbook attention and the JAX reference over ragged batches (decode, prefill, mixed; page sizes 8/16/32;
GQA groups 1/3/4/8; head_dim 64/128; sliding window; soft cap; padding rows and slots) on both of its
instruction-set paths, it reads 16-bit caches stored as bits, ``auto`` picks it on CPU with the
reference as the fallback, and the engine with it gives the reference engine's greedy tokens with the
same programs compiled.  (Greedy parity with Hugging Face: tests/test_hf_parity.py, whose engines use
``auto``, i.e. this kernel.)
"""

from __future__ import annotations

import itertools
import logging
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT, greedy_tokens, random_prompts
from test_attention import make_batch, random_prefills

from kernels_pallas import ragged_paged_attention, resolve_impl
from kernels_pallas.ragged_paged_attention import ragged_paged_attention_dense, ragged_paged_attention_ref
from kernels_pallas.ragged_paged_attention_cpu import (
    best_isa,
    cpu_unavailable_reason,
    ragged_paged_attention_cpu,
)


def test_extension_is_built():
    """Not a skip: without the extension the engine silently serves the slower reference."""
    assert cpu_unavailable_reason() is None, cpu_unavailable_reason()
    assert best_isa() in ("avx512", "avx2", "portable")
    assert resolve_impl("auto", "cpu") == ("cpu", False) and resolve_impl("cpu", "cpu") == ("cpu", False)
    with pytest.raises(ValueError, match="attention_impl"):
        resolve_impl("cpu", "tpu")


# the portable path, AVX2, and the best this CPU has (AVX-512's decode rows where it has them)
ISAS = ["portable", "avx2", "auto"]
MIXES = {  # (num_decode_rows, num_decode_pad, number of prefill chunks)
    "decode": (5, 1, 0), "prefill": (0, 0, 4), "mixed": (3, 1, 3)}
OPTIONS = [(None, None), (13, None), (None, 3.0), (7, 2.0)]  # (sliding_window, soft_cap)
# Every page size x GQA group x head_dim once; the mix, the options and the instruction set cycle.
CASES = [(mix, ps, g, d, *OPTIONS[i % len(OPTIONS)], ISAS[i % len(ISAS)])
         for i, ((ps, g, d), mix) in enumerate(zip(itertools.product([8, 16, 32], [1, 3, 4, 8], [64, 128]),
                                                  itertools.cycle(MIXES)))]


def _batch(mix, page_size, gqa, head_dim, seed):
    rng = np.random.default_rng(seed)
    nd, pad, npre = MIXES[mix]
    return make_batch(rng, page_size=page_size, gqa=gqa, num_decode_rows=nd, num_decode_pad=pad,
                      prefills=random_prefills(rng, page_size, npre), pad_rows=3, pad_seqs=2,
                      max_pages_per_seq=9, head_dim=head_dim), nd


@pytest.mark.parametrize("mix,page_size,gqa,head_dim,sliding_window,soft_cap,isa", CASES)
def test_kernel_matches_dense(mix, page_size, gqa, head_dim, sliding_window, soft_cap, isa):
    if isa == "avx2" and best_isa() == "portable":
        pytest.skip("this CPU has no AVX2")
    args, nd = _batch(mix, page_size, gqa, head_dim, seed=[page_size, gqa, head_dim])
    q, _, _, kv, _, cu, ns = args
    kw = dict(sm_scale=head_dim ** -0.5, sliding_window=sliding_window, soft_cap=soft_cap)
    got = np.asarray(ragged_paged_attention_cpu(*args, isa=isa, prefill_rows="kernel", **kw))
    want = ragged_paged_attention_dense(*args, **kw)
    assert got.shape == q.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)
    # padding rows and padded decode slots are exactly zero
    end = int(cu[int(ns)])
    assert not got[end:].any()
    for s in range(int(ns)):
        if kv[s] == 0:
            assert not got[cu[s]:cu[s + 1]].any()


def test_kernel_matches_reference_and_threads_agree():
    """Against the JAX reference the engine ran until now (a mixed step: decode rows, prefill chunks with
    and without context, padding); one thread or all: the same bits (each work item is computed by one
    thread, in one order)."""
    args, nd = _batch("mixed", 16, 3, 64, seed=11)
    kw = dict(sm_scale=0.125, sliding_window=20, soft_cap=None)
    ref = np.asarray(ragged_paged_attention_ref(*args, num_decode_rows=nd, **kw))
    got = np.asarray(ragged_paged_attention_cpu(*args, prefill_rows="kernel", **kw))
    np.testing.assert_allclose(got, ref, atol=2e-5, rtol=1e-5)
    one = np.asarray(ragged_paged_attention_cpu(*args, prefill_rows="kernel", num_threads=1, **kw))
    np.testing.assert_array_equal(got, one)
    # what the engine runs on long prefill chunks: decode rows in the kernel, prefill rows in the reference
    split = np.asarray(ragged_paged_attention_cpu(*args, num_decode_rows=nd, prefill_rows="reference", **kw))
    np.testing.assert_allclose(split, ref, atol=2e-5, rtol=1e-5)


def test_prefill_rows_run_in_the_kernel_by_default():
    """The engine's call (no ``prefill_rows``) runs prefill chunks of every length in the kernel, with the
    decode rows split off as the engine does; ``prefill_rows="reference"`` gives the same attention."""
    rng = np.random.default_rng(3)
    kw = dict(sm_scale=0.125, sliding_window=None, soft_cap=None)
    for rows in (4, 17, 70):
        args = make_batch(rng, page_size=16, gqa=3, num_decode_rows=2, num_decode_pad=0,
                          prefills=[(rows, 21)], pad_rows=0, pad_seqs=0, max_pages_per_seq=8, head_dim=64)
        assert args[0].shape[0] == 2 + rows
        default = np.asarray(ragged_paged_attention_cpu(*args, num_decode_rows=2, **kw))
        np.testing.assert_array_equal(default, np.asarray(ragged_paged_attention_cpu(
            *args, num_decode_rows=2, prefill_rows="kernel", **kw)))
        np.testing.assert_allclose(default, ragged_paged_attention_dense(*args, **kw), atol=2e-5, rtol=1e-5)
        np.testing.assert_allclose(default, np.asarray(ragged_paged_attention_cpu(
            *args, num_decode_rows=2, prefill_rows="reference", **kw)), atol=2e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="prefill_rows"):
        ragged_paged_attention_cpu(*args, num_decode_rows=2, prefill_rows="auto", **kw)


@pytest.mark.parametrize("gqa,head_dim", [(1, 32), (8, 32), (2, 64), (3, 64), (4, 64), (2, 128), (8, 64)])
@pytest.mark.parametrize("page_size,options", [(16, (None, None)), (8, (5, 2.0))])
def test_avx512_decode_rows_match_dense(gqa, head_dim, page_size, options):
    """AVX-512's decode rows of a float32 cache (every group whose accumulators fit 16 registers; (8, 64)
    falls back to the AVX2 code) equal the dense attention, with a window and a soft cap too."""
    if best_isa() != "avx512":
        pytest.skip("this CPU has no AVX-512")
    args, _ = _batch("decode", page_size, gqa, head_dim, seed=[gqa, head_dim, page_size])
    kw = dict(sm_scale=head_dim ** -0.5, sliding_window=options[0], soft_cap=options[1])
    got = np.asarray(ragged_paged_attention_cpu(*args, isa="avx512", prefill_rows="kernel", **kw))
    np.testing.assert_allclose(got, ragged_paged_attention_dense(*args, **kw), atol=2e-5, rtol=1e-5)
    avx2 = np.asarray(ragged_paged_attention_cpu(*args, isa="avx2", prefill_rows="kernel", **kw))
    np.testing.assert_allclose(got, avx2, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("gqa,head_dim", [(1, 32), (2, 64), (3, 64), (4, 128), (8, 64), (3, 48)])
@pytest.mark.parametrize("page_size,options", [(16, (None, None)), (8, (5, 2.0)), (32, (13, None)), (4, (None, None))])
def test_avx512_prefill_rows_match_dense(gqa, head_dim, page_size, options):
    """AVX-512's rows of a prefill chunk (float32 cache; the query vectors in the lanes, one lane group of 16
    or several) equal the dense attention in prefill and mixed steps, with a window and a soft cap too;
    page size 4 falls back to the AVX2 code."""
    if best_isa() != "avx512":
        pytest.skip("this CPU has no AVX-512")
    for mix in ("prefill", "mixed"):
        args, _ = _batch(mix, page_size, gqa, head_dim, seed=[gqa, head_dim, page_size, len(mix)])
        cu, ns = args[5], args[6]
        kw = dict(sm_scale=head_dim ** -0.5, sliding_window=options[0], soft_cap=options[1])
        got = np.asarray(ragged_paged_attention_cpu(*args, isa="avx512", prefill_rows="kernel", **kw))
        np.testing.assert_allclose(got, ragged_paged_attention_dense(*args, **kw), atol=2e-5, rtol=1e-5)
        avx2 = np.asarray(ragged_paged_attention_cpu(*args, isa="avx2", prefill_rows="kernel", **kw))
        np.testing.assert_allclose(got, avx2, atol=1e-5, rtol=1e-5)
        assert not got[int(cu[int(ns)]):].any()  # padding rows stay zero
        one = np.asarray(ragged_paged_attention_cpu(*args, isa="avx512", prefill_rows="kernel", num_threads=1, **kw))
        np.testing.assert_array_equal(got, one)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_16bit_cache_stored_as_bits(dtype):
    """A 16-bit cache on CPU is its uint16 bits (jaxserve/kv_cache.py) with values of q's dtype: the kernel
    reads them in place and equals the reference (the same values, f32 accumulation; output in q's dtype)."""
    args, nd = _batch("mixed", 16, 4, 64, seed=5)
    q, cache = jnp.asarray(args[0], dtype), jnp.asarray(args[1], dtype)
    bits = jax.lax.bitcast_convert_type(cache, jnp.uint16)
    rest = args[2:]
    # the dense float64 attention of the 16-bit values, up to the output's rounding to 16 bits
    want = ragged_paged_attention_dense(np.asarray(q, np.float32), np.asarray(cache, np.float32), *rest,
                                        sm_scale=0.125)
    for isa in ISAS if best_isa() != "portable" else ["portable"]:
        got = ragged_paged_attention_cpu(q, bits, *rest, sm_scale=0.125, isa=isa, prefill_rows="kernel")
        assert got.dtype == q.dtype
        np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=1e-2, rtol=1e-2)
    if dtype == "bfloat16":  # and the reference's own reading of the bits (one compile: bfloat16 only)
        ref = ragged_paged_attention_ref(q, bits, *rest, sm_scale=0.125, num_decode_rows=nd)
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(ref, np.float32), atol=1e-2, rtol=1e-2)


def test_long_context_and_no_sequence():
    """Contexts of many pages (decode rows of 1000+ keys), and a step of padding only (warm-up): zeros."""
    rng = np.random.default_rng(2)
    args = make_batch(rng, page_size=16, gqa=2, num_decode_rows=3, num_decode_pad=0, prefills=[(40, 900)],
                      pad_rows=2, pad_seqs=1, max_pages_per_seq=80, head_dim=64, decode_lens=[1270, 17, 640])
    got = np.asarray(ragged_paged_attention_cpu(*args, sm_scale=0.125, prefill_rows="kernel"))
    np.testing.assert_allclose(got, ragged_paged_attention_dense(*args, sm_scale=0.125), atol=2e-5, rtol=1e-5)
    q, cache, layer, kv, pages, cu, _ = args
    out = np.asarray(ragged_paged_attention_cpu(q, cache, layer, kv, pages, cu, np.int32(0), sm_scale=0.125,
                                                prefill_rows="kernel"))
    assert not out.any()


def test_eight_bit_caches_and_missing_extension_fall_back(caplog):
    """``auto`` on CPU: the kernel, or the reference with one warning saying why: an 8-bit cache (which
    the kernel does not read), or the extension not built (a fresh process where it cannot import)."""
    import dataclasses

    from jaxserve.config import ModelConfig
    from jaxserve.model_runner import resolve_attention

    cfg = ModelConfig(model_type="llama", vocab_size=1024, hidden_size=512, intermediate_size=1024, num_layers=2,
                      num_heads=8, num_kv_heads=2, head_dim=64, rms_norm_eps=1e-6, rope_theta=1e4,
                      rope_scaling=None, max_position_embeddings=2048, tie_word_embeddings=False,
                      attention_bias=False, qk_norm=False, sliding_window=None, bos_token_id=1, eos_token_ids=(2,))
    assert resolve_attention("auto", "cpu", cfg, 16, np.dtype("float32")) == "cpu"
    with caplog.at_level(logging.WARNING, logger="jaxserve.model_runner"):
        assert resolve_attention("auto", "cpu", cfg, 16, np.dtype("float32"), np.dtype("int8")) == "reference"
    assert len(caplog.records) == 1 and "KV cache dtype int8" in caplog.records[0].getMessage()
    assert resolve_attention("auto", "cpu", dataclasses.replace(cfg, head_dim=20), 16,
                             np.dtype("float32")) == "reference"
    code = ("import sys, logging; sys.modules['kernels_pallas._attention_cpu'] = None\n"
            "logging.basicConfig(level=logging.WARNING)\n"
            "import numpy as np; from test_attention_cpu import _fallback_in_fresh_process as f; f()")
    proc = subprocess.run([sys.executable, "-c", code], cwd=f"{ROOT}/tests", capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    warnings = [ln for ln in proc.stderr.splitlines() if "using the reference attention" in ln]
    assert len(warnings) == 1 and "not built" in warnings[0], proc.stderr[-2000:]


def _fallback_in_fresh_process():
    """(Run by the test above in a process where the extension cannot import.)  The entry point with
    ``auto`` gives the reference's result; the engine's resolution says why, once."""
    from jaxserve.config import ModelConfig
    from jaxserve.model_runner import resolve_attention

    assert cpu_unavailable_reason() is not None
    cfg = ModelConfig(model_type="llama", vocab_size=1024, hidden_size=512, intermediate_size=1024, num_layers=2,
                      num_heads=8, num_kv_heads=2, head_dim=64, rms_norm_eps=1e-6, rope_theta=1e4,
                      rope_scaling=None, max_position_embeddings=2048, tie_word_embeddings=False,
                      attention_bias=False, qk_norm=False, sliding_window=None, bos_token_id=1, eos_token_ids=(2,))
    assert resolve_attention("auto", "cpu", cfg, 16, np.dtype("float32")) == "reference"
    args, nd = _batch("mixed", 8, 2, 64, seed=1)
    got = np.asarray(ragged_paged_attention(*args, sm_scale=0.125, num_decode_rows=nd, impl="auto"))
    np.testing.assert_allclose(got, ragged_paged_attention_dense(*args, sm_scale=0.125), atol=2e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="not built"):
        ragged_paged_attention_cpu(*args, sm_scale=0.125, prefill_rows="kernel")


def test_engine_tokens_equal_hf_and_programs_per_bucket(llama_dir, shared_engine):
    """The shared engine (``auto``: this kernel) gives Hugging Face's greedy tokens (float32) for prompts
    that are chunked, cross pages and queue for the slots, with one program per bucket at most (the
    kernel adds none).  tests/test_hf_parity.py checks every architecture the same way."""
    import torch
    import transformers

    from conftest import hf_greedy_cached

    assert shared_engine.runner.attention_impl == "cpu"
    model = transformers.AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
    prompts = random_prompts([3, 17, 70, 9, 40, 130], seed=21)
    max_tokens = [12, 9, 6, 14, 5, 8]
    want = [hf_greedy_cached(model, p, n) for p, n in zip(prompts, max_tokens)]
    assert greedy_tokens(shared_engine, prompts, max_tokens) == want
    assert shared_engine.compile_count <= shared_engine.num_buckets
