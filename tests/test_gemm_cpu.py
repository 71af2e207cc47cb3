"""The C++ CPU matmul of the layers' weights (``matmul_impl``, ``csrc/gemm_cpu/`` behind ``jax.ffi``): it is
built (a missing extension FAILS here, as the attention kernel's does), it equals the float64 product over
ragged shapes (rows not a multiple of the register tile, columns not a multiple of a panel, K over several
K blocks) on every instruction-set path this CPU has, ``dot_general`` hands it exactly the dots it serves,
``auto`` resolves to it only where it can serve, bad values name the field, and an engine with it gives the
XLA engine's greedy tokens with the same programs compiled.  (Greedy parity with Hugging Face:
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
          (7, 513, 2816)]


@pytest.mark.parametrize("isa", ["avx2", "avx512"])
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_gemm_equals_float64_product(isa, m, k, n):
    if isa not in available_isas():
        pytest.skip(f"this CPU has no {isa}")
    rng = np.random.default_rng(m * 1000 + n)
    a = rng.standard_normal((m, k)).astype(np.float32)
    b = rng.standard_normal((k, n)).astype(np.float32)
    got = np.asarray(jax.jit(lambda x, y: gemm_cpu.gemm_cpu(x, y, isa=isa))(a, b))
    want = a.astype(np.float64) @ b.astype(np.float64)
    # float32 sums of k terms of size ~1: error ~ sqrt(k) * 2^-24 * |terms|
    np.testing.assert_allclose(got, want, atol=2e-5 * np.sqrt(k), rtol=1e-5)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_gemm_threads_give_the_same_bits(threads):
    """Items are column panels: every thread count sums each output in the same order."""
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.standard_normal((20, 600)).astype(np.float32))
    b = jnp.asarray(rng.standard_normal((600, 700)).astype(np.float32))
    one = np.asarray(gemm_cpu.gemm_cpu(a, b, num_threads=1))
    np.testing.assert_array_equal(np.asarray(gemm_cpu.gemm_cpu(a, b, num_threads=threads)), one)


def test_dot_general_serves_only_its_shapes():
    f32, bf16 = jnp.float32, jnp.bfloat16
    x = jax.ShapeDtypeStruct((16, 512), f32)
    w = jax.ShapeDtypeStruct((512, 4, 4, 64), f32)  # a DenseGeneral kernel [in, *features]
    last = (((1,), (0,)), ((), ()))
    assert gemm_cpu.serves(x, w, last)
    assert not gemm_cpu.serves(jax.ShapeDtypeStruct((gemm_cpu.MAX_ROWS + 1, 512), f32), w, last)  # a prompt chunk
    assert gemm_cpu.serves(x, jax.ShapeDtypeStruct((512, 32000), f32), last)  # the LM head
    assert not gemm_cpu.serves(jax.ShapeDtypeStruct((16, 512), bf16), jax.ShapeDtypeStruct((512, 64), bf16), last)
    assert not gemm_cpu.serves(x, jax.ShapeDtypeStruct((64, 512), f32), (((1,), (1,)), ((), ())))  # tied embedding
    # served or not, it computes the dot (features axes kept)
    rng = np.random.default_rng(1)
    for rows in (16, gemm_cpu.MAX_ROWS + 3):
        lhs = jnp.asarray(rng.standard_normal((rows, 64)).astype(np.float32))
        rhs = jnp.asarray(rng.standard_normal((64, 2, 40)).astype(np.float32))
        got = jax.jit(lambda p, q: gemm_cpu.dot_general(p, q, last, fallback=jax.lax.dot_general))(lhs, rhs)
        assert got.shape == (rows, 2, 40)
        np.testing.assert_allclose(np.asarray(got), np.einsum("mk,kab->mab", np.asarray(lhs, np.float64),
                                                              np.asarray(rhs, np.float64)), atol=2e-4, rtol=1e-5)


def test_resolve_matmul():
    # auto: the kernel where its AVX-512 path runs (its AVX2 path was slower than XLA's dot)
    assert resolve_matmul("auto", "cpu") == ("cpu" if "avx512" in available_isas() else "xla")
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
    several chunks, more requests than slots), and the kernel adds no program."""
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
