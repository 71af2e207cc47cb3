"""The GPU Pallas kernel compiles for H100 and H200: real Triton and ptxas for sm_90, no GPU needed.

Each case lowers ``ragged_paged_attention_gpu`` (default block sizes, as the
engine calls it) with ``jax.ShapeDtypeStruct`` arguments on a compile-only
device of ``jaxserve.targets`` and calls ``.compile()``, which runs Triton's
passes (shared-memory allocation included: a tile that does not fit is a
``RESOURCE_EXHAUSTED`` error here, as on a real device) and ptxas.

These tests need the CUDA plugin (``jax[cuda12]``, ``pip install -e
".[compile]"``).  They are NOT skipped without it: ``get_target`` raises and
the tests fail, so a CI machine that lost the plugin is noticed.  They also
need ``JAX_PLATFORMS=cpu`` from before jax starts (otherwise the CUDA plugin
tries to open a GPU, fails, and registers no compile-only topology): in a
process without it (a plain ``pytest`` run) the cases run in one subprocess
that has it (``test_compile_cases_in_cpu_process``), whose output names any
failing case.

Factors: target (H100, H200) x dtype (bfloat16, float32) x head_dim (64, 128,
256) x GQA group (1..8) x page size (16, 32, 64) x step (decode-only: 64
sequences; mixed: 32 decodes + 480 prefill tokens; prefill-only: 512 tokens)
x options (none, sliding window, soft cap, both), with max_model_len 4096 and 2
layers.  The default run (144 cases, about 4-5 minutes on 2 CPU cores) has
every combination of dtype x head_dim x GQA group x step -- the factors that
decide the tile shapes, their shared memory and Triton's layouts -- and picks
target, page size and options so that every pair of values of any two factors
appears in some case (pairwise); the full product (3456 cases, hours) is
marked ``slow``.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxserve.targets import get_target
from kernels_pallas.ragged_paged_attention_gpu import ragged_paged_attention_gpu

MAX_MODEL_LEN = 4096
NUM_LAYERS = 2
NUM_KV_HEADS = 4
STEPS = {  # name -> (tokens, sequence slots, decode rows)
    "decode": (64, 64, 64),
    "mixed": (32 + 480, 64, 32),
    "prefill": (512, 16, 0),
}
OPTIONS = {"plain": {}, "window": dict(sliding_window=1024), "softcap": dict(soft_cap=30.0),
           "window+softcap": dict(sliding_window=512, soft_cap=50.0)}
FACTORS = {
    "target": ["h100", "h200"],
    "dtype": ["bfloat16", "float32"],
    "head_dim": [64, 128, 256],
    "group": list(range(1, 9)),
    "page_size": [16, 32, 64],
    "step": list(STEPS),
    "options": list(OPTIONS),
}


CORE = ("dtype", "head_dim", "group", "step")  # what decides the tiles, their shared memory and layouts


def covering_grid(factors: dict[str, list], core=CORE) -> list[tuple]:
    """Every combination of the ``core`` factors once, the other factors chosen greedily (deterministic)
    so that every pair of values of any two factors also appears in some case."""
    names = list(factors)
    rest = [n for n in names if n not in core]
    pairs_of = lambda case: {(i, case[i], j, case[j]) for i, j in itertools.combinations(range(len(case)), 2)}
    todo = set().union(*(pairs_of(c) for c in itertools.product(*factors.values())))
    uses = {(n, v): 0 for n in rest for v in factors[n]}  # ties go to the least used values
    cases = []
    for core_values in itertools.product(*(factors[n] for n in core)):
        fixed = dict(zip(core, core_values))
        options = []
        for rest_values in itertools.product(*(factors[n] for n in rest)):
            full = dict(fixed, **dict(zip(rest, rest_values)))
            options.append(tuple(full[n] for n in names))
        best = max(options, key=lambda c: (len(pairs_of(c) & todo),
                                           -sum(uses[n, c[names.index(n)]] for n in rest)))
        for n in rest:
            uses[n, best[names.index(n)]] += 1
        cases.append(best)
        todo -= pairs_of(best)
    assert not todo, "the core product is too small to cover every pair"
    return cases


DEFAULT = covering_grid(FACTORS)
_DEFAULT_SET = set(DEFAULT)
FULL = [c for c in itertools.product(*FACTORS.values()) if c not in _DEFAULT_SET]


def sds(mesh, shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, P()))


def compile_kernel(target: str, dtype: str, head_dim: int, group: int, page_size: int, step: str,
                   options: str, *, num_layers: int = NUM_LAYERS, max_num_seqs: int | None = None):
    """Lower and compile one case; returns the compiled executable."""
    tg = get_target(target)  # raises (does not skip) without the CUDA plugin
    mesh = Mesh(np.array(tg.devices[:1]), ("x",))
    tokens, slots, num_decode = STEPS[step]
    width = MAX_MODEL_LEN // page_size
    num_pages = (max_num_seqs or slots) * width
    hkv, hq, d = NUM_KV_HEADS, NUM_KV_HEADS * group, head_dim
    args = (sds(mesh, (tokens, hq, d), dtype),
            sds(mesh, (num_layers, hkv, num_pages, page_size, 2 * d), dtype),
            sds(mesh, (), jnp.int32),  # layer
            sds(mesh, (slots,), jnp.int32),  # kv_lens
            sds(mesh, (slots, width), jnp.int32),  # page_indices
            sds(mesh, (slots + 1,), jnp.int32),  # cu_q_lens
            sds(mesh, (), jnp.int32))  # num_seqs
    fn = jax.jit(lambda *a: ragged_paged_attention_gpu(*a, sm_scale=d ** -0.5, num_decode_rows=num_decode,
                                                       **OPTIONS[options]))
    previous = jax.config.jax_default_device
    jax.config.update("jax_default_device", tg.devices[0])  # Pallas lowers for this chip generation
    try:
        return fn.lower(*args).compile()
    finally:
        jax.config.update("jax_default_device", previous)


def check_compiles(case):
    compiled = compile_kernel(*case)
    target, dtype, head_dim, group, page_size, step, _ = case
    # The layer is read inside the kernel: no XLA copy of a layer (or of the cache) in temporaries.
    tokens, slots, _ = STEPS[step]
    layer_bytes = NUM_KV_HEADS * slots * MAX_MODEL_LEN * 2 * head_dim * np.dtype(dtype).itemsize
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp < layer_bytes // 4, f"{temp} bytes of temporaries: a copy of the cache?"


def _id(case):
    return "-".join(map(str, case))


# The compile-only GPU devices exist only in a process that started jax with JAX_PLATFORMS=cpu.
IN_CPU_PROCESS = os.environ.get("JAX_PLATFORMS", "") == "cpu"


def _run_in_cpu_process(marker: str) -> None:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", marker,
                           os.path.relpath(__file__, root)], cwd=root, env=env, capture_output=True, text=True)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"GPU kernel compile checks failed (JAX_PLATFORMS=cpu subprocess):\n{output[-8000:]}"
    assert " passed" in output and " skipped" not in output, output[-2000:]


if IN_CPU_PROCESS:
    @pytest.mark.parametrize("case", DEFAULT, ids=_id)
    def test_gpu_kernel_compiles(case):
        check_compiles(case)

    @pytest.mark.slow
    @pytest.mark.parametrize("case", FULL, ids=_id)
    def test_gpu_kernel_compiles_full_grid(case):
        check_compiles(case)

    def test_cache_over_4gib_compiles():
        """A realistic cache (32 layers, 40 GiB of bfloat16 on an H200) needs 64-bit offsets in the
        kernel's gathers; it compiles for decode and prefill."""
        for step in ("decode", "prefill"):
            compile_kernel("h200", "bfloat16", 128, 4, 16, step, "plain", num_layers=32, max_num_seqs=160)
else:
    def test_compile_cases_in_cpu_process():
        """The default compile grid, in a JAX_PLATFORMS=cpu subprocess."""
        _run_in_cpu_process("not slow")

    @pytest.mark.slow
    def test_compile_full_grid_in_cpu_process():
        _run_in_cpu_process("slow")


def test_default_grid_is_pairwise():
    """Every value of every factor appears with every value of every other factor (in particular with
    each target and dtype)."""
    names = list(FACTORS)
    for i, j in itertools.combinations(range(len(names)), 2):
        seen = {(c[i], c[j]) for c in DEFAULT}
        assert seen == set(itertools.product(FACTORS[names[i]], FACTORS[names[j]])), (names[i], names[j])

