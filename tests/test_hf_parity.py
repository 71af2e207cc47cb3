"""Greedy decoding matches Hugging Face transformers token for token.

Each checkpoint is written by ``transformers`` itself (``from_config`` with a
seeded torch initialiser, then ``save_pretrained``), so the weight names, the
layouts, the config keys (``rope_parameters`` in transformers 5) and the tied
embeddings are whatever transformers really produces.  The reference is the
plainest possible greedy loop: full recompute of the whole sequence at every
step, argmax of the last logits, in float32.

The engine runs the batch with fewer slots than requests (requests queue),
small pages (sequences cross page boundaries) and a small token budget (long
prompts are prefilled in several chunks, with cached context).
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from conftest import assert_clean, greedy, random_prompts  # noqa: E402
from jaxserve import Engine, SamplingParams  # noqa: E402
from jaxserve.make_model import hf_config  # noqa: E402

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64, "rope_theta": 10000.0}

VARIANTS = {
    "llama": ("llama", {}),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {}),
    # A window much shorter than the prompts: the engine's sliding-window masking
    # (in the paged context and in the in-step block) must match HF's.  (With the
    # default window of 4096 Mistral would be Llama again.)
    "mistral": ("mistral", {"sliding_window": 24}),
    "llama-tied": ("llama", {"tie_word_embeddings": True}),
    "llama-llama3-rope": ("llama", {"rope_parameters": LLAMA3_ROPE}),
}

PROMPT_LENGTHS = [1, 5, 17, 33, 150, 64, 2, 90, 16, 40, 120, 9]
MAX_TOKENS = [8, 20, 5, 12, 30, 3, 25, 10, 16, 7, 14, 1]
# min_prefill_bucket=64: a single prefill bucket, so that each engine compiles at most three
# step programs (compiling dominates the time of these tests on CPU).
ENGINE_KW = dict(max_num_seqs=4, page_size=8, max_model_len=256, max_num_batched_tokens=64,
                 min_prefill_bucket=64)


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = []
    with torch.no_grad():
        for _ in range(n):
            t = int(model(ids).logits[0, -1].argmax())
            out.append(t)
            ids = torch.cat([ids, torch.tensor([[t]])], dim=1)
    return out


@pytest.fixture(scope="module", params=list(VARIANTS))
def hf_checkpoint(request, tmp_path_factory):
    """(name, directory, HF model in eval mode, prompts, greedy reference tokens)."""
    name = request.param
    arch, overrides = VARIANTS[name]
    cfg = hf_config(arch, "tiny", **overrides)
    torch.manual_seed(sum(map(ord, name)))
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.eval()
    d = str(tmp_path_factory.mktemp(f"hf_{name}"))
    model.save_pretrained(d)
    prompts = random_prompts(PROMPT_LENGTHS, seed=len(name), vocab=cfg.vocab_size)
    ref = [hf_greedy(model, p, n) for p, n in zip(prompts, MAX_TOKENS)]
    return name, d, model, prompts, ref


@pytest.fixture(scope="module")
def hf_engine(hf_checkpoint):
    """A float32 engine on the variant's checkpoint (shared by the tests of that variant)."""
    return Engine.from_pretrained(hf_checkpoint[1], dtype="float32", **ENGINE_KW)


def test_greedy_matches_hf(hf_checkpoint, hf_engine):
    name, d, _, prompts, ref = hf_checkpoint
    assert len(prompts) > ENGINE_KW["max_num_seqs"]
    engine = hf_engine
    outs = engine.generate(prompts, [greedy(n) for n in MAX_TOKENS])
    assert_clean(engine)
    assert [o.finish_reason for o in outs] == ["length"] * len(prompts)
    for i, (o, r) in enumerate(zip(outs, ref)):
        assert o.prompt_token_ids == prompts[i]
        assert o.token_ids == r, f"{name}: prompt {i} (length {len(prompts[i])}) differs from HF"


def test_scan_layer_loop_matches_hf(hf_checkpoint, hf_engine):
    """The stacked layer scan (what TPU and GPU run) gives the same tokens as the per-layer-buffer loop
    the CPU runs by default, and as HF: the two loops read one stacked checkpoint."""
    name, d, _, prompts, ref = hf_checkpoint
    assert hf_engine.runner.layer_loop == "switch"
    engine = Engine.from_pretrained(d, dtype="float32", layer_loop="scan", **ENGINE_KW)
    assert engine.runner.layer_loop == "scan" and "layers" in engine.runner.params
    outs = engine.generate(prompts, [greedy(n) for n in MAX_TOKENS])
    assert_clean(engine)
    assert [o.token_ids for o in outs] == ref, name


def test_config_picked_up(hf_checkpoint):
    """The engine read the variant's special config, and it agrees with what HF uses."""
    name, d, model, _, _ = hf_checkpoint
    arch, overrides = VARIANTS[name]
    from jaxserve.config import ModelConfig

    mc = ModelConfig.from_dir(d)
    assert mc.model_type == arch
    assert mc.tie_word_embeddings == bool(overrides.get("tie_word_embeddings", False))
    assert mc.attention_bias == (arch == "qwen2")
    assert mc.qk_norm == (arch == "qwen3")
    if arch == "mistral":
        assert mc.sliding_window == 24
    # Rotary frequencies equal HF's (this is where llama3 scaling lives).
    hf_inv = model.model.rotary_emb.inv_freq.double().numpy()
    np.testing.assert_allclose(mc.inv_freq(), hf_inv, rtol=1e-6)
    if name == "llama-llama3-rope":
        rs = mc.rope_scaling_dict
        assert rs["rope_type"] == "llama3"
        assert rs["factor"] == 8.0 and rs["original_max_position_embeddings"] == 64
        assert mc.rope_theta == 10000.0
        # ... and the scaling really changes the frequencies (some are divided by the factor).
        import dataclasses

        plain = dataclasses.replace(mc, rope_scaling=(("rope_type", "default"),)).inv_freq()
        assert not np.allclose(plain, mc.inv_freq())
        assert np.isclose(mc.inv_freq()[-1], plain[-1] / 8.0)
    else:
        assert mc.rope_scaling_dict.get("rope_type", "default") == "default"


def test_llama3_rope_matters_beyond_original_context(tmp_path_factory):
    """The long prompts of the parity batch exceed the original 64 positions, where the
    scaled and unscaled rotary embeddings give different models: the same weights with
    the default rope must not produce the same greedy tokens (otherwise the parity test
    would not exercise the scaling)."""
    cfg = hf_config("llama", "tiny", rope_parameters=LLAMA3_ROPE)
    torch.manual_seed(sum(map(ord, "llama-llama3-rope")))
    scaled = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    plain_cfg = hf_config("llama", "tiny")
    plain = transformers.AutoModelForCausalLM.from_config(plain_cfg, dtype=torch.float32).eval()
    plain.load_state_dict(scaled.state_dict())
    ids = torch.tensor(random_prompts([150], seed=3)[:1])
    with torch.no_grad():
        a = scaled(ids).logits[0]
        b = plain(ids).logits[0]
    # Positions < 64 differ too (the scaling changes low frequencies), but both must differ.
    assert not torch.allclose(a[100:], b[100:], atol=1e-4)


@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory):
    """A Qwen2 checkpoint saved by transformers in bfloat16 (BF16 tensors in the safetensors file)."""
    cfg = hf_config("qwen2", "tiny")
    torch.manual_seed(5)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).to(torch.bfloat16)
    d = str(tmp_path_factory.mktemp("hf_qwen2_bf16"))
    model.save_pretrained(d)
    return d


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_bfloat16_checkpoint_loads_and_generates(bf16_checkpoint, dtype):
    """No equality with HF is demanded in bfloat16: the engine must load, and produce
    max_tokens in-vocabulary tokens for every request of a chunked, queued batch."""
    engine = Engine.from_pretrained(bf16_checkpoint, dtype=dtype, **ENGINE_KW)
    assert engine.dtype_name == dtype
    # The cache of all layers; on CPU a 16-bit cache is stored as its uint16 bits (jaxserve/kv_cache.py).
    assert str(engine.runner.cache.dtype) == ("uint16" if dtype == "bfloat16" else dtype)
    # In float32 the CPU matmul kernel holds the linear layers' weights in bf16: the checkpoint's values,
    # widened exactly in the kernel (kernels_pallas/gemm_cpu.py bf16_exact); the rest is float32.
    held = {(jax.tree_util.keystr(k).endswith("['packed_kernel']"), str(w.dtype))
            for k, w in jax.tree_util.tree_leaves_with_path(engine.runner.params)}
    packed = "bfloat16" if engine.runner.matmul_impl == "cpu" else dtype
    assert held == {(False, dtype), (True, packed)} if engine.runner.matmul_impl == "cpu" else {(False, dtype)}
    prompts = random_prompts([3, 100, 40, 1, 70], seed=11)
    max_tokens = [6, 9, 4, 12, 5]
    outs = engine.generate(prompts, [greedy(n) for n in max_tokens])
    for o, n in zip(outs, max_tokens):
        assert o.finished and o.finish_reason == "length"
        assert len(o.token_ids) == n
        assert all(0 <= t < 1024 for t in o.token_ids)
    assert_clean(engine)


def test_sampled_request_runs_on_hf_checkpoint(hf_checkpoint, hf_engine):
    """A non-greedy request on a transformers-written checkpoint (no tokenizer) finishes with
    max_tokens in-vocabulary tokens and no text."""
    name, d, _, prompts, _ = hf_checkpoint
    engine = hf_engine
    assert engine.tokenizer is None
    o = engine.generate(prompts[2], SamplingParams(temperature=1.0, top_p=0.9, max_tokens=9,
                                                   ignore_eos=True, seed=1))[0]
    assert len(o.token_ids) == 9 and o.text is None
    assert all(0 <= t < 1024 for t in o.token_ids)
    assert_clean(engine)
