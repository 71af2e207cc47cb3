"""The engine's real step compiles for TPU and GPU, deviceless, for real model shapes, and fits the chip.

Each case is ``jaxserve plan`` (``jaxserve/plan.py``): the model's parameter tree and KV cache as
``ShapeDtypeStruct``s with the engine's shardings on compile-only devices (no weights, nothing
downloaded), every bucket lowered through the engine's own ``ModelRunner`` with the backend's Pallas
attention kernel (``attention_impl="auto"``), bfloat16, and compiled by the real XLA TPU + Mosaic or
XLA GPU + Triton + ptxas.  Per chip, the weights + the KV cache + the largest step's temporary bytes
(``memory_analysis()``) must fit the chip's HBM, and the temporaries must not hold a copy of the cache
(a layout change of the cache around its write would show up here as gigabytes of temporaries).

By default SmolLM2 (on one v5e and one H100) compiles the representative buckets (largest decode-only,
largest prefill-only, largest mixed) and every other model and mesh its largest mixed bucket alone: that
one program holds the kernel's decode launch and its prefill rows, and the most tokens (the other two
buckets cost 60% of a case's compile time: 55 + 72 of 218 s for Gemma 2 2B on v5e, 14 + 21 of 52 s for
Llama-3.1-8B on H100, measured with the machine shared).  The representative buckets of every case and
the full bucket set are marked ``slow``.  The compilers come from
``jax[tpu]`` and ``jax[cuda12]`` (``.ci/run`` installs both): when they are missing this module fails,
it is never skipped.
"""

from __future__ import annotations

import os

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import libtpu  # noqa: E402,F401  (required: fail loudly when the TPU compiler is missing)
from jaxserve.targets import cuda_plugin  # noqa: E402

assert cuda_plugin(), "the CUDA plugin (jax[cuda12] or jax[cuda13]) is required: it brings ptxas"
import pytest  # noqa: E402

from conftest import ROOT  # noqa: E402
from jaxserve.config import EngineConfig  # noqa: E402
from jaxserve.plan import format_plan, make_plan  # noqa: E402

CONFIGS = os.path.join(ROOT, "configs", "models", "hf")
SEVEN_EIGHT_B = ["llama-3.1-8b", "qwen2.5-7b", "mistral-7b", "qwen3-8b"]

# (model, target, topology, mesh): one chip where the weights fit one chip (Llama-3.1-8B on one v6e is
# test_default_settings_of_a_long_context_model_compile; Mistral-7B's shapes are Llama-3.1-8B's but the
# vocabulary), 4-way tensor parallel on a v5e 2x2 (16 GiB chips: an 8B model does not fit one), 70B on
# 8 v6e chips; and one H100 / H200.  TPU compiles of one-chip 7-8B programs take 70-100 s each here,
# hence the pruning of the TPU cases: the one-chip v6e 7-8B case is Llama-3.1-8B at its full context
# (below); Qwen2.5-7B and Qwen3-8B on one v6e and Mistral-7B TP4 are in the slow set (their shapes are
# those of cases kept, on v5e 2x2 and H100, but for the chip, the q/k norms or the vocabulary).
# Qwen2.5-7B and Qwen3-8B TP4 on v5e 2x2 are slow too (68 s and 90 s of a 47-minute suite): their shapes
# are Llama-3.1-8B's TP4 case but for the q/k/v bias (compiled on H100) and the q/k norms (compiled on
# H100, and on TPU by Qwen3-30B-A3B); Mistral-7B on H100 is Llama-3.1-8B's shapes but the vocabulary.
SLOW_TPU = [("qwen2.5-7b", "tpu-v6e", None, None), ("qwen3-8b", "tpu-v6e", None, None),
            ("mistral-7b", "tpu-v5e", "2x2", {"data": 1, "model": 4}),
            ("qwen2.5-7b", "tpu-v5e", "2x2", {"data": 1, "model": 4}),
            ("qwen3-8b", "tpu-v5e", "2x2", {"data": 1, "model": 4}), ("mistral-7b", "h100", None, None),
            # data-parallel attention: the Pallas TPU kernel per (data group, KV-head shard), pages split on data
            ("llama-3.1-8b", "tpu-v6e", "2x4", {"data": 2, "model": 4})]
CASES = (
    [("smollm2-135m", "tpu-v5e", None, None)]
    + [("llama-3.1-8b", "tpu-v5e", "2x2", {"data": 1, "model": 4})]
    + [("llama-3.1-70b", "tpu-v6e", "2x4", {"data": 1, "model": 8})]
    + [(m, "h100", None, None) for m in ["smollm2-135m"] + SEVEN_EIGHT_B if m != "mistral-7b"]
    + [("llama-3.1-8b", "h200", None, None)]
    # Gemma 2 2B on one v5e: head_dim 256, the attention soft cap, sliding and global layers alternating
    # (each layer's window is data of the one layer scan, scalar-prefetched by the kernel).
    + [("gemma-2-2b", "tpu-v5e", None, None)]
    # Qwen3-30B-A3B on 8 v6e chips: 128 experts, 16 per chip (expert parallel), top 8 of 128.
    + [("qwen3-30b-a3b", "tpu-v6e", "2x4", {"data": 1, "model": 8})]
)
IDS = [f"{m}-{t}-{topo or '1'}" for m, t, topo, _ in CASES]

# The engine's settings of a server: 64 sequences, 512-token steps, 4k context.
ENGINE = dict(max_num_seqs=64, max_num_batched_tokens=512, max_model_len=4096, page_size=16)


def check(plan) -> None:
    report = format_plan(plan)
    assert plan.ok, report
    assert plan.attention_impl == f"pallas_{'tpu' if plan.target.startswith('tpu') else 'gpu'}", report
    assert plan.fits, report
    # The cache is updated in place: the step's temporaries are far below one copy of it.
    assert plan.max_temp_bytes < plan.kv_cache_bytes / 4, report
    assert all(b.alias_bytes >= plan.kv_cache_bytes for b in plan.buckets), report  # the donated cache
    assert plan.kv_tokens_fit >= ENGINE["max_model_len"], report


def compile_buckets(model, target, topology, mesh, buckets) -> None:
    plan = make_plan(os.path.join(CONFIGS, f"{model}.json"), target, topology=topology, mesh_shape=mesh,
                     buckets=buckets, engine_config=EngineConfig(**ENGINE), progress=False)
    want = [(64, 0), (0, 512), (64, 512)] if buckets == "representative" else [(64, 512)]
    assert [(b.decode, b.prefill_tokens) for b in plan.buckets] == want
    check(plan)


@pytest.mark.parametrize("model,target,topology,mesh", CASES, ids=IDS)
def test_engine_step_compiles_and_fits(model, target, topology, mesh):
    compile_buckets(model, target, topology, mesh, "representative" if model == "smollm2-135m" else "largest")


@pytest.mark.slow
@pytest.mark.parametrize("model,target,topology,mesh", CASES, ids=IDS)
def test_engine_step_compiles_representative_buckets(model, target, topology, mesh):
    compile_buckets(model, target, topology, mesh, "representative")


@pytest.mark.slow
@pytest.mark.parametrize("model,target,topology,mesh", SLOW_TPU, ids=[f"{m}-{t}-{topo or '1'}" for m, t, topo, _ in SLOW_TPU])
def test_engine_step_compiles_more_models(model, target, topology, mesh):
    compile_buckets(model, target, topology, mesh, "representative")


@pytest.mark.slow
@pytest.mark.parametrize("model,target,topology,mesh", CASES + SLOW_TPU, ids=IDS + [f"{m}-{t}-{topo or '1'}" for m, t, topo, _ in SLOW_TPU])
def test_engine_step_compiles_every_bucket(model, target, topology, mesh):
    plan = make_plan(os.path.join(CONFIGS, f"{model}.json"), target, topology=topology, mesh_shape=mesh,
                     engine_config=EngineConfig(**ENGINE), progress=False)
    assert len(plan.buckets) == plan.num_buckets
    check(plan)


def test_default_settings_of_a_long_context_model_compile():
    """Llama-3.1-8B with the engine's defaults (max_model_len = the model's 131,072 tokens) on one v6e."""
    plan = make_plan(os.path.join(CONFIGS, "llama-3.1-8b.json"), "tpu-v6e", buckets="largest", progress=False)
    check(plan)


def test_plan_cli_reports_and_exits_nonzero_on_failure(tmp_path, capsys):
    from jaxserve.cli import main

    out = tmp_path / "plan.json"
    # (H100, the largest bucket: the CLI path; SmolLM2's representative buckets on H100 and TPU are cases of
    # test_engine_step_compiles_and_fits.)
    rc = main(["plan", "--model", os.path.join(CONFIGS, "smollm2-135m.json"), "--target", "h100",
               "--buckets", "largest", "--max-model-len", "2048", "--json", str(out), "--no-progress"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "KV tokens that fit" in text and "(64, 512)" in text and "fits" in text
    import json

    data = json.loads(out.read_text())
    assert data["ok"] and data["fits"] and data["kv_tokens_fit"] > 0 and len(data["buckets"]) == 1
    # A cache that cannot fit (more pages than the chip holds): every bucket fails, exit code 1,
    # and the compiler's message is printed.
    rc = main(["plan", "--model", os.path.join(CONFIGS, "smollm2-135m.json"), "--target", "tpu-v5e",
               "--buckets", "largest", "--num-pages", "200000", "--no-progress"])
    text = capsys.readouterr().out
    assert rc == 1 and "FAILED" in text and "failed:" in text
