"""The C++ CPU matmul of the layers' weights (``matmul_impl``, ``csrc/gemm_cpu/`` behind ``jax.ffi``): it is
built (a missing extension FAILS here, as the attention kernel's does), it equals the float64 product over
ragged shapes (rows not a multiple of the register tile, columns not a multiple of a panel, K over several
K blocks, prompt-sized row counts) on every instruction-set path this CPU has, with the weights in its
packed layout (``pack``, which ``pack_linears`` applies to a model's linear layers), ``auto`` resolves to it
only where it can serve, bad values name the field, and an engine with it gives the XLA engine's greedy
tokens (and prompt logprobs, through ``head_logits``) with the same programs compiled.  (Greedy parity with Hugging Face:
tests/test_hf_parity.py, whose engines use ``auto``, i.e. this kernel on CPU.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import greedy_tokens, random_prompts

from kernels_pallas import gemm_cpu
from kernels_pallas.gemm_cpu import available_isas, cpu_gemm_unavailable_reason, resolve_matmul


def test_extension_is_built():
    """Not a skip: without the extension the engine silently serves XLA's slower dot."""
    assert cpu_gemm_unavailable_reason() is None, cpu_gemm_unavailable_reason()
    assert "avx2" in available_isas()


# (M, K, N): M around the 12- and 6-row tiles, N around the 32- and 16-column panels, K over 256-row blocks
SHAPES = [(1, 8, 1), (4, 64, 48), (5, 300, 33), (12, 512, 1024), (13, 257, 17), (29, 1408, 100), (48, 96, 512),
          (7, 513, 2816), (64, 512, 96), (300, 260, 70)]


ISA_PATHS = ["avx2", "avx512", "amx"]


@pytest.mark.parametrize("isa", ISA_PATHS)
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_gemm_equals_float64_product(isa, m, k, n):
    if isa not in available_isas():
        pytest.skip(f"this CPU has no {isa}")
    rng = np.random.default_rng(m * 1000 + n)
    a = rng.standard_normal((m, k)).astype(np.float32)
    b = rng.standard_normal((k, n)).astype(np.float32)
    got = np.asarray(jax.jit(lambda x, y: gemm_cpu.gemm_cpu(x, y, n, isa=isa))(a, gemm_cpu.pack(b)))
    want = a.astype(np.float64) @ b.astype(np.float64)
    # float32 sums of k terms of size ~1: error ~ sqrt(k) * 2^-24 * |terms|
    np.testing.assert_allclose(got, want, atol=2e-5 * np.sqrt(k), rtol=1e-5)


@pytest.mark.parametrize("isa", ISA_PATHS)
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_bf16_weights_give_the_float32_bits(isa, m, k, n):
    """B held in bfloat16 (values that are bfloat16 values: a bf16 checkpoint run in float32) gives the
    float32 call's result bit for bit: the kernel widens each value exactly and runs the same FMAs (AMX:
    a float32 B's lower pieces are zeros, whose products add nothing)."""
    if isa not in available_isas():
        pytest.skip(f"this CPU has no {isa}")
    rng = np.random.default_rng(m * 7 + n)
    a = jnp.asarray(rng.standard_normal((m, k)).astype(np.float32))
    b = rng.standard_normal((k, n)).astype(jnp.bfloat16).astype(np.float32)
    assert gemm_cpu.bf16_exact(b)
    f = jax.jit(lambda x, y: gemm_cpu.gemm_cpu(x, y, n, isa=isa))
    want = np.asarray(f(a, jnp.asarray(gemm_cpu.pack(b))))
    got = np.asarray(f(a, jnp.asarray(gemm_cpu.pack(b, jnp.bfloat16))))
    np.testing.assert_array_equal(got, want)


def test_bf16_exact():
    b = np.float32([[1.0, -2.5, 0.0], [3.0e-30, 1e20, -0.0]]).astype(jnp.bfloat16).astype(np.float32)
    assert gemm_cpu.bf16_exact(b)
    b[1, 2] = 1.0 + 2.0 ** -10  # needs more than bfloat16's 8 significant bits
    assert not gemm_cpu.bf16_exact(b)
    assert not gemm_cpu.bf16_exact(np.zeros((0, 3), np.float32))


@pytest.mark.parametrize("isa", ["avx512", "amx"])
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("m", [40, 300])
def test_gemm_threads_give_the_same_bits(isa, threads, m):
    """Items are column panels (and for many rows, as at 300, blocks of rows, as many as the thread count
    asks for): every thread count sums each output in the same order."""
    if isa not in available_isas():
        pytest.skip(f"this CPU has no {isa}")
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.standard_normal((m, 600)).astype(np.float32))
    b = jnp.asarray(gemm_cpu.pack(rng.standard_normal((600, 700)).astype(np.float32)))
    one = np.asarray(gemm_cpu.gemm_cpu(a, b, 700, num_threads=1, isa=isa))
    np.testing.assert_array_equal(np.asarray(gemm_cpu.gemm_cpu(a, b, 700, num_threads=threads, isa=isa)), one)


@pytest.mark.parametrize("isa", ["avx512", "amx"])
def test_rows_do_not_change_a_rows_bits(isa):
    """On one path, each output row is summed in the same order whatever the other rows: a sequence's
    logits do not depend on the batch it runs in, as long as the step's row count keeps ``auto`` on one
    path (``test_auto_takes_amx_from_its_row_counts``)."""
    if isa not in available_isas():
        pytest.skip(f"this CPU has no {isa}")
    rng = np.random.default_rng(2)
    a = rng.standard_normal((250, 512)).astype(np.float32)  # 250 rows: items cut by rows too
    b = jnp.asarray(gemm_cpu.pack(rng.standard_normal((512, 300)).astype(np.float32)))
    full = np.asarray(gemm_cpu.gemm_cpu(jnp.asarray(a), b, 300, isa=isa))
    for rows in (1, 5, 13, 33, 64, 101):
        got = np.asarray(gemm_cpu.gemm_cpu(jnp.asarray(a[:rows]), b, 300, isa=isa))
        np.testing.assert_array_equal(got, full[:rows])


@pytest.mark.parametrize("weights", ["float32", "bfloat16"])
def test_auto_takes_amx_from_its_row_counts(weights):
    """``auto`` runs AMX where it is faster: from AMX_MIN_ROWS rows (a prompt chunk for float32 weights, a
    decode step of 16 rows for bfloat16 ones), the AVX-512 kernel below; its result is that path's, bit for
    bit."""
    if "amx" not in available_isas():
        pytest.skip("this CPU has no AMX")
    rng = np.random.default_rng(3)
    threshold = gemm_cpu.AMX_MIN_ROWS[weights]
    b = gemm_cpu.pack(rng.standard_normal((192, 80)).astype(jnp.bfloat16).astype(np.float32), weights)
    for rows, path in ((threshold - 1, "avx512"), (threshold, "amx"), (threshold + 7, "amx")):
        a = jnp.asarray(rng.standard_normal((rows, 192)).astype(np.float32))
        got = np.asarray(gemm_cpu.gemm_cpu(a, jnp.asarray(b), 80))
        np.testing.assert_array_equal(got, np.asarray(gemm_cpu.gemm_cpu(a, jnp.asarray(b), 80, isa=path)))
        # the two paths differ by float32 rounding only
        other = np.asarray(gemm_cpu.gemm_cpu(a, jnp.asarray(b), 80, isa="amx" if path == "avx512" else "avx512"))
        np.testing.assert_allclose(got, other, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("m,k,n", [(1, 8, 1), (5, 300, 33), (13, 513, 1000), (40, 520, 70)])
def test_dpbf16_is_the_product_of_a_rounded_to_bfloat16(m, k, n):
    """``isa="dpbf16"`` (AVX512_BF16: the greedy head's approximate product) gives ``bf16(a) @ B`` for a
    bfloat16 B to float32's summation accuracy, and is refused for a float32 B."""
    if "dpbf16" not in available_isas():
        pytest.skip("this CPU has no AVX512_BF16")
    rng = np.random.default_rng(m + k)
    a = rng.standard_normal((m, k)).astype(np.float32)
    b = rng.standard_normal((k, n)).astype(jnp.bfloat16).astype(np.float32)
    got = np.asarray(gemm_cpu.gemm_cpu(jnp.asarray(a), jnp.asarray(gemm_cpu.pack(b, jnp.bfloat16)), n, isa="dpbf16"))
    a16 = a.astype(jnp.bfloat16).astype(np.float64)
    want = a16 @ b.astype(np.float64)
    np.testing.assert_allclose(got, want, atol=2e-5 * np.sqrt(k), rtol=1e-5)
    assert np.abs(got - a.astype(np.float64) @ b.astype(np.float64)).max() > 1e-4 * np.sqrt(k)  # a was rounded
    with pytest.raises(Exception, match="dpbf16"):
        np.asarray(gemm_cpu.gemm_cpu(jnp.asarray(a), jnp.asarray(gemm_cpu.pack(b)), n, isa="dpbf16"))


def test_amx_is_refused_where_the_cpu_has_none():
    if "amx" in available_isas():
        pytest.skip("this CPU has AMX")
    a, b = jnp.ones((4, 32), jnp.float32), jnp.asarray(gemm_cpu.pack(np.ones((32, 32), np.float32)))
    with pytest.raises(Exception, match="AMX"):
        np.asarray(gemm_cpu.gemm_cpu(a, b, 32, isa="amx"))


def test_rows_past_the_real_ones_are_zeros():
    """``rows`` (a traced scalar: the step's real rows) leaves the bucket's padding rows out."""
    rng = np.random.default_rng(4)
    a = jnp.asarray(rng.standard_normal((40, 96)).astype(np.float32))
    b = jnp.asarray(gemm_cpu.pack(rng.standard_normal((96, 70)).astype(np.float32)))
    full = np.asarray(gemm_cpu.gemm_cpu(a, b, 70))
    f = jax.jit(lambda x, w, r: gemm_cpu.gemm_cpu(x, w, 70, rows=r))
    for rows in (0, 1, 13, 40, 99):
        got = np.asarray(f(a, b, jnp.int32(rows)))
        np.testing.assert_array_equal(got[:rows], full[:rows])
        np.testing.assert_array_equal(got[rows:], 0)


def test_pack_layout_and_bad_shapes():
    b = np.arange(5 * 70, dtype=np.float32).reshape(5, 70)
    p = gemm_cpu.pack(b)
    assert p.shape == gemm_cpu.packed_shape(5, 70) == (3, 5, 32)
    np.testing.assert_array_equal(p[1, 2], b[2, 32:64])  # panel 1, row 2: columns 32..63
    np.testing.assert_array_equal(p[2, :, 6:], 0)  # the last panel's padding
    np.testing.assert_array_equal(gemm_cpu.unpack(p, 5, 70), b)
    np.testing.assert_array_equal(np.asarray(gemm_cpu.pack(jnp.asarray(b))), p)
    # bfloat16: rows in pairs, interleaved column by column (AMX's order), K zero-padded to 32
    b16 = b % 128  # bfloat16 values
    q = gemm_cpu.pack(b16, jnp.bfloat16)
    assert q.dtype == jnp.bfloat16 and q.shape == gemm_cpu.packed_shape(5, 70, jnp.bfloat16) == (3, 16, 64)
    np.testing.assert_array_equal(q[1, 1, :4].astype(np.float32), [b16[2, 32], b16[3, 32], b16[2, 33], b16[3, 33]])
    np.testing.assert_array_equal(q[:, 2, 1::2].astype(np.float32), 0)  # row 5 (past K)
    np.testing.assert_array_equal(q[:, 3:].astype(np.float32), 0)  # rows 6..31
    np.testing.assert_array_equal(gemm_cpu.unpack(q, 5, 70).astype(np.float32), b16)
    np.testing.assert_array_equal(np.asarray(gemm_cpu.pack(jnp.asarray(b16), jnp.bfloat16)), q)
    with pytest.raises(ValueError, match="b_packed"):
        gemm_cpu.gemm_cpu(jnp.zeros((2, 5), jnp.float32), jnp.asarray(p, jnp.bfloat16), 70)  # float32's layout
    with pytest.raises(ValueError, match="b_packed"):
        gemm_cpu.gemm_cpu(jnp.zeros((2, 5), jnp.float32), jnp.asarray(b), 70)  # not packed
    with pytest.raises(ValueError, match="float32"):
        gemm_cpu.gemm_cpu(jnp.zeros((2, 5), jnp.bfloat16), jnp.asarray(p, jnp.bfloat16), 70)


def test_pack_linears_packs_the_linear_layers_only():
    from jaxserve.model import PACKED_LINEARS, pack_linears

    rng = np.random.default_rng(3)
    kernel = rng.standard_normal((8, 2, 3, 4)).astype(np.float32)  # [in, *features] (a fused qkv)
    stacked = rng.standard_normal((2, 8, 6)).astype(np.float32)  # [L, in, out]
    params = {"embed": {"embedding": jnp.ones((10, 8))}, "final_norm": {"scale": jnp.ones(8)},
              "layers_0": {"qkv_proj": {"kernel": jnp.asarray(kernel), "bias": jnp.ones((2, 3, 4))},
                           "input_norm": {"scale": jnp.ones(8)}},
              "layers": {"down_proj": {"kernel": jnp.asarray(stacked)}},
              "lm_head": {"kernel": jnp.ones((8, 10))}}
    out = pack_linears(params)
    assert set(PACKED_LINEARS) >= {"qkv_proj", "down_proj", "lm_head"}
    np.testing.assert_array_equal(np.asarray(out["layers_0"]["qkv_proj"]["packed_kernel"]),
                                  gemm_cpu.pack(kernel.reshape(8, 24)))
    assert "kernel" not in out["layers_0"]["qkv_proj"] and out["layers_0"]["qkv_proj"]["bias"].shape == (2, 3, 4)
    packed = np.asarray(out["layers"]["down_proj"]["packed_kernel"])
    assert packed.shape == (2,) + gemm_cpu.packed_shape(8, 6)
    np.testing.assert_array_equal(packed[1], gemm_cpu.pack(stacked[1]))
    # float32 weights stay float32; weights whose values are bfloat16 values (ones here) are held in bf16,
    # in bf16's layout
    assert out["layers_0"]["qkv_proj"]["packed_kernel"].dtype == jnp.float32
    assert out["lm_head"]["packed_kernel"].dtype == jnp.bfloat16
    assert out["lm_head"]["packed_kernel"].shape == gemm_cpu.packed_shape(8, 10, jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(out["lm_head"]["packed_kernel"]),
                                  gemm_cpu.pack(np.ones((8, 10), np.float32), jnp.bfloat16))
    assert out["embed"]["embedding"] is params["embed"]["embedding"]  # the rest untouched
    assert out["layers_0"]["input_norm"]["scale"] is params["layers_0"]["input_norm"]["scale"]


def test_resolve_matmul():
    # auto: the kernel wherever it runs (AVX2/FMA or AVX-512)
    assert resolve_matmul("auto", "cpu") == "cpu"
    assert resolve_matmul("cpu", "cpu") == "cpu"
    assert resolve_matmul("xla", "cpu") == "xla"
    assert resolve_matmul("auto", "tpu") == "xla" and resolve_matmul("auto", "gpu") == "xla"
    assert resolve_matmul("auto", "cpu", dtype=jnp.bfloat16) == "xla"
    assert resolve_matmul("auto", "cpu", quantization="int8") == "xla"
    with pytest.raises(ValueError, match="matmul_impl.*platform is tpu"):
        resolve_matmul("cpu", "tpu")
    with pytest.raises(ValueError, match="matmul_impl.*bfloat16"):
        resolve_matmul("cpu", "cpu", dtype=jnp.bfloat16)
    with pytest.raises(ValueError, match="matmul_impl: must be one of"):
        resolve_matmul("mkl", "cpu")


def test_engine_config_rejects_unknown_matmul_impl(llama_dir):
    from jaxserve import Engine

    with pytest.raises(ValueError, match="matmul_impl"):
        Engine.from_pretrained(llama_dir, matmul_impl="mkl")


def test_engine_tokens_equal_xla_engine_and_programs_per_bucket(llama_dir):
    """Greedy tokens with the kernel equal those with XLA's dot over decode and mixed buckets (prompts of
    several chunks, more requests than slots), and the kernel adds no program; prompt logprobs (the LM head
    of ``head_logits`` on the packed weights) match too."""
    from jaxserve import Engine

    lengths = [3, 90, 17, 40, 64, 5, 33, 71, 9, 50]
    prompts = random_prompts(lengths, seed=3)
    tokens, compiles = {}, {}
    for impl in ("cpu", "xla"):
        engine = Engine.from_pretrained(llama_dir, max_num_seqs=6, max_model_len=256, max_num_batched_tokens=64,
                                        matmul_impl=impl)
        assert engine.runner.matmul_impl == impl
        tokens[impl] = greedy_tokens(engine, prompts, max_tokens=[12] * len(prompts))
        compiles[impl] = engine.runner.compile_count
        assert compiles[impl] <= engine.runner.num_buckets
    assert tokens["cpu"] == tokens["xla"]


def test_bf16_checkpoint_in_float32_equals_hf(tmp_path):
    """A checkpoint stored in bfloat16 (as most Hugging Face checkpoints are) served in float32: the engine
    holds its linear layers' weights in bf16 for the kernel (half the bytes) and its greedy tokens equal
    transformers' on the same checkpoint in float32, and the float32-weight engine's (XLA's dot)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from conftest import hf_greedy_cached

    from jaxserve import Engine
    from jaxserve.make_model import hf_config

    torch.manual_seed(7)
    model = transformers.AutoModelForCausalLM.from_config(hf_config("llama", "tiny"), dtype=torch.bfloat16)
    model.save_pretrained(tmp_path)
    model = model.float().eval()
    prompts = random_prompts([5, 70, 17, 33], seed=11, vocab=model.config.vocab_size)
    ref = [hf_greedy_cached(model, p, 10) for p in prompts]
    tokens = {}
    for impl in ("cpu", "xla"):
        engine = Engine.from_pretrained(str(tmp_path), dtype="float32", matmul_impl=impl, max_num_seqs=4,
                                        max_model_len=128, max_num_batched_tokens=64)
        if impl == "cpu":
            params = engine.runner.params
            assert params["lm_head"]["packed_kernel"].dtype == jnp.bfloat16
            assert params["layers_0"]["down_proj"]["packed_kernel"].dtype == jnp.bfloat16
        tokens[impl] = greedy_tokens(engine, prompts, max_tokens=[10] * len(prompts))
    assert tokens["cpu"] == ref
    assert tokens["xla"] == ref


def test_prompt_chunks_through_amx_equal_hf(tmp_path):
    """Prompt chunks of AMX_MIN_ROWS["float32"] rows and more run the AMX path on a CPU that has it (float32
    weights as bf16 pieces, float32 sums): greedy tokens equal transformers' in float32, with decode steps
    on the AVX-512 kernel in between."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from conftest import hf_greedy_cached

    from jaxserve import Engine
    from jaxserve.make_model import hf_config

    torch.manual_seed(5)
    model = transformers.AutoModelForCausalLM.from_config(hf_config("llama", "tiny"), dtype=torch.float32)
    model.save_pretrained(tmp_path)
    model = model.eval()
    rows = gemm_cpu.AMX_MIN_ROWS["float32"]
    prompts = random_prompts([rows + 40, 9, rows // 2 + 3], seed=13, vocab=model.config.vocab_size)
    ref = [hf_greedy_cached(model, p, 8) for p in prompts]
    engine = Engine.from_pretrained(str(tmp_path), dtype="float32", matmul_impl="cpu", max_num_seqs=4,
                                    max_model_len=512, max_num_batched_tokens=512)
    assert greedy_tokens(engine, prompts, max_tokens=[8] * len(prompts)) == ref


# -- the greedy LM head (gemm_cpu.argmax_head) -----------------------------------------------------------

def _greedy_head(w):
    return (jnp.asarray(gemm_cpu.pack(w)), jnp.asarray(gemm_cpu.greedy_hi(w)), jnp.asarray(gemm_cpu.greedy_slack(w)))


@pytest.mark.parametrize("isa", ISA_PATHS + ["dpbf16"])
@pytest.mark.parametrize("m,k,n,spread", [(1, 64, 1000, 1.0), (5, 300, 777, 1.0), (16, 512, 3000, 1e-3),
                                          (40, 520, 2049, 1e-4), (64, 96, 4096, 0.0)])
def test_argmax_head_gives_the_full_heads_argmax(isa, m, k, n, spread):
    """The argmax of the kernel's logits (AVX-512 and AVX2 give the same bits), whatever path computes the
    approximate product, with columns far apart and with near-duplicate columns (``spread``: every column
    a copy of one plus that much relative noise, so that bf16 rounding reorders them: many candidates per
    row; 0: exact duplicates, ties broken to the first index as jnp.argmax)."""
    if isa not in available_isas():
        pytest.skip(f"this CPU has no {isa}")
    rng = np.random.default_rng(m + n)
    if spread:
        base = rng.standard_normal((k, 1)) * 0.05
        w = (base * (1 + spread * rng.standard_normal((k, n))) if spread < 1 else rng.standard_normal((k, n)) * 0.05)
    else:
        w = np.repeat(rng.standard_normal((k, 8)) * 0.05, n // 8, axis=1)
    w = w.astype(np.float32)
    x = jnp.asarray(rng.standard_normal((m, k)).astype(np.float32) * 3)
    packed, hi, slack = _greedy_head(w)
    tokens, computed = jax.jit(lambda x: gemm_cpu.argmax_head(x, packed, hi, slack, n, isa=isa))(x)
    for full_isa in [i for i in ("avx512", "avx2") if i in available_isas()]:
        logits = gemm_cpu.gemm_cpu(x, packed, n, isa=full_isa)
        np.testing.assert_array_equal(np.asarray(tokens), np.asarray(jnp.argmax(logits, axis=-1)))
    computed = np.asarray(computed)
    assert computed.min() >= 1 and computed.max() <= n
    if spread == 1.0:  # columns far apart: the bound leaves out almost all of them
        assert computed.max() <= max(8, n // 50), computed


def test_argmax_head_on_zero_and_non_finite_rows():
    """A zero row (every logit 0) ties every column: all are computed and the first wins; a row with a NaN
    or an infinity computes every column and gives jnp.argmax's answer on the full logits."""
    rng = np.random.default_rng(3)
    k, n = 64, 200
    w = (rng.standard_normal((k, n)) * 0.1).astype(np.float32)
    packed, hi, slack = _greedy_head(w)
    x = rng.standard_normal((5, k)).astype(np.float32)
    x[0] = 0
    x[1, 5] = np.nan
    x[2, 7] = np.inf
    x[3] *= 2.0 ** -110  # below the norm greedy_slack's bound on bf16(a)'s rounding assumes
    tokens, computed = gemm_cpu.argmax_head(jnp.asarray(x), packed, hi, slack, n)
    want = jnp.argmax(gemm_cpu.gemm_cpu(jnp.asarray(x), packed, n), axis=-1)
    np.testing.assert_array_equal(np.asarray(tokens), np.asarray(want))
    assert list(np.asarray(computed)[:4]) == [n, n, n, n] and int(tokens[0]) == 0
    assert int(computed[4]) < n


def test_argmax_head_rows_past_the_real_ones_give_token_0():
    """``rows``: the first rows get the argmax of the full call, the rest (a bucket's padding slots) token 0
    and no column computed; ``rows`` may be traced."""
    rng = np.random.default_rng(8)
    k, n = 96, 700
    w = (rng.standard_normal((k, n)) * 0.1).astype(np.float32)
    packed, hi, slack = _greedy_head(w)
    x = jnp.asarray(rng.standard_normal((6, k)).astype(np.float32))
    full_tokens, full_computed = gemm_cpu.argmax_head(x, packed, hi, slack, n)
    for rows in (0, 3, 6, 9):
        tokens, computed = jax.jit(lambda x, r: gemm_cpu.argmax_head(x, packed, hi, slack, n, rows=r))(x, rows)
        real = min(rows, 6)
        np.testing.assert_array_equal(np.asarray(tokens)[:real], np.asarray(full_tokens)[:real])
        np.testing.assert_array_equal(np.asarray(computed)[:real], np.asarray(full_computed)[:real])
        assert not np.asarray(tokens)[real:].any() and not np.asarray(computed)[real:].any()
    assert np.asarray(full_computed).min() >= 1


def test_padding_slots_and_rows_are_left_out(llama_dir):
    """``sampled_slots``: the LM head's rows of a step are its slots up to the last sequence (the decodes
    first, then the prefills after the decode block), and a decode-only step's real rows
    (``real_rows(..., decode_only=True)``) are its decodes, not its bucket: checked on every step the
    runner prepares while requests finish at different lengths, prefills join and the bucket has padding."""
    from jaxserve import Engine
    from jaxserve.model import real_rows, sampled_slots

    engine = Engine.from_pretrained(llama_dir, max_num_seqs=8, max_model_len=256, max_num_batched_tokens=64,
                                    matmul_impl="cpu")
    runner, seen = engine.runner, []
    prepare = runner.prepare

    def capture(out):
        res = prepare(out)
        (d, tp), arrays = res.key, res.arrays
        meta = runner._to_inputs(arrays, False).meta
        want = d + len(out.prefills) if out.prefills else len(out.decodes)
        assert int(sampled_slots(meta)) == want
        if not tp:
            assert int(real_rows(meta, decode_only=True)) == len(out.decodes)
        seen.append((d, len(out.decodes), len(out.prefills)))
        return res

    runner.prepare = capture
    try:
        prompts = random_prompts([5, 40, 9, 70, 12, 3], seed=2)
        greedy_tokens(engine, prompts, [3, 20, 7, 11, 2, 15])  # capture checks every step
    finally:
        runner.prepare = prepare
    assert any(p == 0 and n < d for d, n, p in seen)  # decode-only steps with padding slots
    assert any(p and n < d for d, n, p in seen)  # mixed steps with padding decode slots


def test_greedy_slack_refuses_non_finite_weights_and_bounds_the_difference():
    w = np.ones((8, 4), np.float32)
    w[2, 1] = np.inf
    assert gemm_cpu.greedy_slack(w) is None
    rng = np.random.default_rng(9)
    w = rng.standard_normal((300, 100)).astype(np.float32)
    x = rng.standard_normal((20, 300)).astype(np.float32)
    exact = x.astype(np.float64) @ w.astype(np.float64)
    bound = np.linalg.norm(x, axis=1)[:, None] * gemm_cpu.greedy_slack(w)[None, :]
    w16 = w.astype(jnp.bfloat16).astype(np.float64)
    for a in (x.astype(np.float64), x.astype(jnp.bfloat16).astype(np.float64)):  # AMX / AVX-512; dpbf16
        assert np.all(np.abs(exact - a @ w16) <= bound)
    # the bound is not loose: within a few times the worst difference seen
    assert np.max(np.abs(exact - x.astype(jnp.bfloat16).astype(np.float64) @ w16) / bound) > 0.05


def test_engine_greedy_head_tokens_equal_the_full_head(llama_dir, monkeypatch):
    """Where the runner takes the greedy head (AMX, AVX512_BF16 or AVX-512: its approximate product is
    cheaper than the head), greedy tokens equal those of an engine without it, in all-greedy steps and in
    steps where a sampled request (or one asking for logprobs) sends the step through the full head; the
    bucket set's programs are unchanged."""
    from jaxserve import Engine, SamplingParams

    if not {"amx", "dpbf16", "avx512"} & set(available_isas()):
        pytest.skip("the runner takes the greedy head only on AMX, AVX512_BF16 or AVX-512")
    prompts = random_prompts([3, 90, 17, 40, 64, 5], seed=21)
    kw = dict(max_num_seqs=4, max_model_len=256, max_num_batched_tokens=64, matmul_impl="cpu")
    engine = Engine.from_pretrained(llama_dir, **kw)
    assert engine.runner.greedy_head and "greedy_hi" in engine.runner.params["lm_head"]
    with monkeypatch.context() as m:
        m.setattr(gemm_cpu, "available_isas", lambda: ["avx2"])
        plain = Engine.from_pretrained(llama_dir, **kw)
    assert not plain.runner.greedy_head and "greedy_hi" not in plain.runner.params["lm_head"]
    lens = [12] * len(prompts)
    assert greedy_tokens(engine, prompts, lens) == greedy_tokens(plain, prompts, lens)
    mixed = [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True) for _ in prompts]
    mixed[1] = SamplingParams(temperature=0.8, seed=4, max_tokens=12, ignore_eos=True)
    mixed[3] = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=2)
    got = [o.token_ids for o in engine.generate(prompts, mixed)]
    want = [o.token_ids for o in plain.generate(prompts, mixed)]
    assert got == want
    assert engine.runner.compile_count <= engine.runner.num_buckets
