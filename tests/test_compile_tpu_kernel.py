"""The TPU Pallas kernel compiles for real TPUs (v5e, v6e): Mosaic and XLA TPU, deviceless.

No TPU is needed: ``jaxserve.targets`` gives compile-only TPU devices (libtpu), the kernel is lowered
inside a jitted step-sized function on ``jax.ShapeDtypeStruct`` arguments placed on one of them, and
``.compile()`` runs the real compilers (Mosaic for the kernel, XLA TPU around it).  A compile error
here is an error on hardware; a pass says the kernel is accepted, not that it is fast or correct
(``test_pallas_tpu.py`` checks correctness in interpret mode).

**libtpu is required**: this module imports it at module level, so without it (``pip install
'jax[tpu]'``) the module fails to import and the run reports the error; it is never skipped.

Grid: target (v5e, v6e) x dtype (float32, bfloat16) x head dim (64, 128, 256) x GQA (1-8) x page size
(16, 32, 64) x step (decode-only: 64 sequences; mixed: 32 decodes + 480 prefill tokens; prefill-only:
512 tokens) x options (none, sliding window, soft cap, both), on a cache of 2 layers x 2 kv heads x
64K tokens with ``max_model_len`` 4096.  The default run is ``PAIRWISE``: every pair of values of any
two factors appears in some case (32 cases, the minimum: 8 GQA ratios x 4 options), so every value of
every factor is compiled for each target and dtype; the full product (3456 cases) is marked ``slow``.

Page tables too large for SMEM stay in HBM (``page_table_fits_smem``): 64 sequences x 8192 pages
(131072 tokens) and 256 x 2048 pages (32K tokens) at 16-token pages compile for both targets in
bfloat16, decode-only and mixed (``test_long_context_page_table_compiles``).
"""

from __future__ import annotations

import itertools
import os
import sys

if "jax" not in sys.modules:  # the compile-only devices need the CPU backend, not a real accelerator
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import libtpu  # noqa: E402,F401  (required: fail loudly, never skip, when it is missing)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from jaxserve.targets import get_target, set_default_device  # noqa: E402
from kernels_pallas.ragged_paged_attention_tpu import (  # noqa: E402
    chip_generation,
    page_table_fits_smem,
    ragged_paged_attention_tpu,
    tpu_unsupported_reason,
)

TARGETS = ["tpu-v5e", "tpu-v6e"]
DTYPES = ["float32", "bfloat16"]
HEAD_DIMS = [64, 128, 256]
GQA = list(range(1, 9))
PAGE_SIZES = [16, 32, 64]
STEPS = {  # name -> (tokens, num_decode_rows, sequence slots)
    "decode": (64, 64, 64),
    "mixed": (32 + 480, 32, 32 + 16),
    "prefill": (512, 0, 16),
}
OPTIONS = {"none": {}, "window": dict(sliding_window=1024), "cap": dict(soft_cap=50.0),
           "window+cap": dict(sliding_window=512, soft_cap=30.0)}
FACTORS = [TARGETS, DTYPES, HEAD_DIMS, GQA, PAGE_SIZES, list(STEPS), list(OPTIONS)]
NUM_LAYERS, NUM_KV_HEADS, MAX_MODEL_LEN, CACHE_TOKENS = 2, 2, 4096, 65536

# (target, dtype, head_dim, gqa, page_size, step, options): a pairwise covering array of FACTORS
# (greedy construction; test_pairwise_grid_covers_every_pair checks it).
PAIRWISE = [
    ('tpu-v5e', 'bfloat16', 64, 1, 16, 'prefill', 'cap'),
    ('tpu-v5e', 'bfloat16', 128, 2, 64, 'prefill', 'window+cap'),
    ('tpu-v5e', 'bfloat16', 128, 3, 16, 'mixed', 'cap'),
    ('tpu-v5e', 'bfloat16', 128, 5, 32, 'prefill', 'none'),
    ('tpu-v5e', 'float32', 64, 4, 16, 'decode', 'window+cap'),
    ('tpu-v5e', 'float32', 64, 7, 64, 'mixed', 'none'),
    ('tpu-v5e', 'float32', 128, 4, 32, 'mixed', 'window'),
    ('tpu-v5e', 'float32', 128, 5, 64, 'mixed', 'window'),
    ('tpu-v5e', 'float32', 128, 6, 32, 'decode', 'cap'),
    ('tpu-v5e', 'float32', 128, 7, 32, 'decode', 'cap'),
    ('tpu-v5e', 'float32', 128, 8, 16, 'prefill', 'cap'),
    ('tpu-v5e', 'float32', 256, 1, 64, 'prefill', 'none'),
    ('tpu-v5e', 'float32', 256, 3, 16, 'decode', 'window+cap'),
    ('tpu-v5e', 'float32', 256, 8, 32, 'mixed', 'window+cap'),
    ('tpu-v6e', 'bfloat16', 64, 1, 32, 'mixed', 'window+cap'),
    ('tpu-v6e', 'bfloat16', 64, 2, 64, 'decode', 'none'),
    ('tpu-v6e', 'bfloat16', 64, 4, 64, 'prefill', 'cap'),
    ('tpu-v6e', 'bfloat16', 64, 6, 16, 'mixed', 'none'),
    ('tpu-v6e', 'bfloat16', 64, 7, 16, 'mixed', 'window+cap'),
    ('tpu-v6e', 'bfloat16', 128, 1, 16, 'decode', 'window'),
    ('tpu-v6e', 'bfloat16', 128, 8, 32, 'prefill', 'none'),
    ('tpu-v6e', 'bfloat16', 256, 5, 64, 'decode', 'window+cap'),
    ('tpu-v6e', 'bfloat16', 256, 6, 16, 'mixed', 'window+cap'),
    ('tpu-v6e', 'bfloat16', 256, 7, 16, 'prefill', 'window'),
    ('tpu-v6e', 'float32', 64, 2, 32, 'mixed', 'window'),
    ('tpu-v6e', 'float32', 64, 3, 64, 'decode', 'none'),
    ('tpu-v6e', 'float32', 64, 5, 16, 'prefill', 'cap'),
    ('tpu-v6e', 'float32', 64, 8, 64, 'decode', 'window'),
    ('tpu-v6e', 'float32', 256, 2, 16, 'decode', 'cap'),
    ('tpu-v6e', 'float32', 256, 3, 32, 'prefill', 'window'),
    ('tpu-v6e', 'float32', 256, 4, 16, 'decode', 'none'),
    ('tpu-v6e', 'float32', 256, 6, 64, 'prefill', 'window'),
]
FULL = list(itertools.product(*FACTORS))


def compile_kernel(target, dtype, head_dim, gqa, page_size, step, options, *, num_kv_heads=NUM_KV_HEADS,
                   max_model_len=MAX_MODEL_LEN, num_slots=None, **kernel_opts):
    """Lower the kernel in a jitted step-sized function for ``target`` and compile it (``kernel_opts``
    go to the kernel, e.g. ``pages_per_block``)."""
    tg = get_target(target)
    set_default_device(tg)  # Pallas lowers for the default device's chip
    mesh = Mesh(np.array(tg.devices[:1]), ("x",))

    def spec(shape, dt):
        return jax.ShapeDtypeStruct(shape, dt, sharding=NamedSharding(mesh, P()))

    tokens, num_decode_rows, slots = STEPS[step]
    slots = num_slots or slots
    dt = jnp.dtype(dtype)
    args = (spec((tokens, num_kv_heads * gqa, head_dim), dt),
            spec((NUM_LAYERS, num_kv_heads, CACHE_TOKENS // page_size, page_size, 2 * head_dim), dt),
            spec((), jnp.int32),  # layer
            spec((slots,), jnp.int32),  # kv_lens
            spec((slots, max_model_len // page_size), jnp.int32),  # page_indices
            spec((slots + 1,), jnp.int32),  # cu_q_lens
            spec((), jnp.int32))  # num_seqs
    step_fn = jax.jit(lambda *a: ragged_paged_attention_tpu(
        *a, sm_scale=head_dim ** -0.5, num_decode_rows=num_decode_rows, **OPTIONS[options], **kernel_opts))
    lowered = step_fn.lower(*args)
    assert chip_generation() == {"tpu-v5e": 5, "tpu-v6e": 6}[target]
    compiled = lowered.compile()
    assert compiled is not None
    assert "tpu_custom_call" in compiled.as_text(), "the Pallas kernel is not in the compiled program"
    return compiled


@pytest.fixture(autouse=True)
def _restore_default_device():
    yield
    jax.config.update("jax_default_device", None)


def test_pairwise_grid_covers_every_pair():
    pairs = list(itertools.combinations(range(len(FACTORS)), 2))
    have = {(i, row[i], j, row[j]) for row in PAIRWISE for i, j in pairs}
    want = {(i, a, j, b) for i, j in pairs for a in FACTORS[i] for b in FACTORS[j]}
    assert not want - have, f"pairs not covered: {sorted(want - have, key=str)[:10]}"
    assert all(row in FULL for row in PAIRWISE)


@pytest.mark.parametrize("target,dtype,head_dim,gqa,page_size,step,options", PAIRWISE)
def test_kernel_compiles(target, dtype, head_dim, gqa, page_size, step, options):
    compile_kernel(target, dtype, head_dim, gqa, page_size, step, options)


@pytest.mark.slow
@pytest.mark.parametrize("target,dtype,head_dim,gqa,page_size,step,options", FULL)
def test_kernel_compiles_full_grid(target, dtype, head_dim, gqa, page_size, step, options):
    compile_kernel(target, dtype, head_dim, gqa, page_size, step, options)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("case", [
    ("float32", 64, 2, 8, "mixed", "window+cap"),  # the float32-only page size
    ("bfloat16", 96, 3, 16, "mixed", "cap"),  # head_dims served by the zero-extended q path
    ("float32", 80, 4, 32, "prefill", "window"),
])
def test_other_served_shapes_compile(target, case):
    """Shapes outside the main grid that ``tpu_unsupported_reason`` accepts also compile."""
    dtype, head_dim, gqa, page_size, step, options = case
    assert tpu_unsupported_reason(head_dim=head_dim, num_q_heads=2 * gqa, num_kv_heads=2, page_size=page_size,
                                  dtype=dtype) is None
    compile_kernel(target, dtype, head_dim, gqa, page_size, step, options)


@pytest.mark.parametrize("target", TARGETS)
def test_large_page_table_compiles(target):
    """A page table near the SMEM limit, still scalar-prefetched into SMEM (256 sequences x 32K tokens
    / 64-token pages: 512 KiB of int32), compiles; one kv head, as under tensor parallelism."""
    assert tpu_unsupported_reason(head_dim=128, num_q_heads=8, num_kv_heads=1, page_size=64, dtype="bfloat16",
                                  max_num_seqs=256, pages_per_seq=512) is None
    assert page_table_fits_smem(num_slots=256, pages_per_seq=512, num_query_blocks=64)
    compile_kernel(target, "bfloat16", 128, 8, 64, "decode", "none", num_kv_heads=1, max_model_len=32768,
                   num_slots=256)


# (sequences, max_model_len) at 16-token pages: page tables of 2 MiB that do not fit in SMEM, so they
# stay in HBM.  64 x 8192 pages: Llama-3.1's 131072-token context (GQA 4 as in Llama-3.1-8B);
# 256 x 2048 pages: 32K tokens (GQA 8 as in Llama-3.1-70B).
LONG_TABLES = [(64, 131072, 4), (256, 32768, 8)]


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("step", ["decode", "mixed"])
@pytest.mark.parametrize("num_slots,max_model_len,gqa", LONG_TABLES)
def test_long_context_page_table_compiles(target, step, num_slots, max_model_len, gqa):
    """Page tables too large for SMEM are served (``tpu_unsupported_reason`` accepts them) and compile,
    bfloat16, decode-only and mixed steps."""
    pages_per_seq = max_model_len // 16
    assert tpu_unsupported_reason(head_dim=128, num_q_heads=NUM_KV_HEADS * gqa, num_kv_heads=NUM_KV_HEADS,
                                  page_size=16, dtype="bfloat16", max_num_seqs=num_slots,
                                  pages_per_seq=pages_per_seq) is None
    assert not page_table_fits_smem(num_slots=num_slots, pages_per_seq=pages_per_seq)
    compile_kernel(target, "bfloat16", 128, gqa, 16, step, "none", max_model_len=max_model_len,
                   num_slots=num_slots)


@pytest.mark.parametrize("target", TARGETS)
def test_long_context_page_table_other_options_compile(target):
    """The HBM page-table path with page-id windows of two tiles (24 pages per block does not divide
    128), sliding window and soft cap, head dim 64 (zero-extended q), and the path forced on a small
    table, compile."""
    compile_kernel(target, "bfloat16", 64, 2, 32, "mixed", "window+cap", max_model_len=131072, num_slots=64,
                   pages_per_block=24)
    compile_kernel(target, "float32", 128, 4, 16, "decode", "cap", page_table_in_smem=False)
