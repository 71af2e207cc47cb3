"""Gemma 2, Gemma 3 (text, and the language model of a multimodal checkpoint), Qwen3-MoE and Mixtral:
greedy tokens equal Hugging Face transformers' token for token.

As in ``test_hf_parity.py``: transformers writes each random checkpoint itself (``from_config``,
``save_pretrained``), the reference is a full-recompute greedy loop in float32, and the engine runs
12 prompts of 1-150 tokens on 4 slots (requests wait and refill slots mid-run), 8-token pages and a
64-token budget (long prompts are prefilled in chunks over cached context).  ``sliding_window`` is 16,
far shorter than most prompts, so the window of the sliding layers is exercised in the paged
context and in the step's own tokens; the Gemma models mix sliding and global layers under one
layer scan.  Norm weights are randomized (transformers initialises Gemma's to zero, which would hide
the ``1 + weight`` offset).
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from conftest import assert_clean, greedy, hf_greedy_cached, random_prompts  # noqa: E402
from jaxserve import Engine  # noqa: E402
from jaxserve.config import ModelConfig  # noqa: E402

TINY = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            vocab_size=1024, max_position_embeddings=2048, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2,
            pad_token_id=0)
SLIDING, FULL = "sliding_attention", "full_attention"
WINDOW = 16

VARIANTS = {
    # Alternating local/global layers, both soft caps, query_pre_attn_scalar != head_dim.
    "gemma2": ("gemma2", dict(intermediate_size=128, sliding_window=WINDOW, query_pre_attn_scalar=24,
                              attn_logit_softcapping=2.0, final_logit_softcapping=3.0,
                              layer_types=[SLIDING, FULL, SLIDING, FULL])),
    # Local layers on their own RoPE (base 10k) and the global ones on a linearly scaled 1M base; q/k norms.
    "gemma3_text": ("gemma3_text", dict(
        intermediate_size=128, sliding_window=WINDOW, query_pre_attn_scalar=16,
        layer_types=[SLIDING, SLIDING, FULL, SLIDING],
        rope_parameters={SLIDING: {"rope_type": "default", "rope_theta": 10000.0},
                         FULL: {"rope_type": "linear", "factor": 4.0, "rope_theta": 1000000.0}})),
    # 8 experts, top 2, the top-k weights not renormalized.
    "qwen3_moe": ("qwen3_moe", dict(intermediate_size=128, moe_intermediate_size=32, num_experts=8,
                                    num_experts_per_tok=2, norm_topk_prob=False, num_hidden_layers=2)),
    # 4 experts, top 2 (softmax over the top 2), with Mistral's sliding window on every layer.
    "mixtral": ("mixtral", dict(intermediate_size=48, num_local_experts=4, num_experts_per_tok=2,
                                sliding_window=WINDOW, num_hidden_layers=2)),
}

PROMPT_LENGTHS = [1, 5, 17, 33, 150, 64, 2, 90, 16, 40, 120, 9]
MAX_TOKENS = [8, 20, 5, 12, 30, 3, 25, 10, 16, 7, 14, 1]
ENGINE_KW = dict(max_num_seqs=4, page_size=8, max_model_len=256, max_num_batched_tokens=64,
                 min_prefill_bucket=64)


def randomize_norms(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (0.0 if "gemma" in model.config.model_type else 1.0))


def make_hf(arch: str, overrides: dict, seed: int):
    kw = dict(TINY, **overrides)
    cfg = transformers.AutoConfig.for_model(arch, **kw)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    randomize_norms(model, seed)
    return model


@pytest.fixture(scope="module", params=list(VARIANTS))
def family_checkpoint(request, tmp_path_factory):
    name = request.param
    arch, overrides = VARIANTS[name]
    model = make_hf(arch, overrides, sum(map(ord, name)))
    d = str(tmp_path_factory.mktemp(f"hf_{name}"))
    model.save_pretrained(d)
    prompts = random_prompts(PROMPT_LENGTHS, seed=len(name), vocab=TINY["vocab_size"])
    ref = [hf_greedy_cached(model, p, n) for p, n in zip(prompts, MAX_TOKENS)]
    return name, d, model, prompts, ref


def test_greedy_matches_hf(family_checkpoint):
    name, d, model, prompts, ref = family_checkpoint
    engine = Engine.from_pretrained(d, dtype="float32", **ENGINE_KW)
    outs = engine.generate(prompts, [greedy(n) for n in MAX_TOKENS])
    assert_clean(engine)
    for i, (o, r) in enumerate(zip(outs, ref)):
        assert o.token_ids == r, f"{name}: prompt {i} (length {len(prompts[i])}) differs from HF"
    # Compiled programs stay within the bucket set (decode x prefill buckets), alternating windows or not.
    runner = engine.runner
    assert runner.programs_compiled <= len(runner.decode_buckets) * len(runner.prefill_buckets)
    # The sliding window really matters for this batch: prompts are longer than it.
    if name != "qwen3_moe":
        assert max(PROMPT_LENGTHS) > 4 * WINDOW and ModelConfig.from_dir(d).sliding_window == WINDOW


def test_config_matches_hf(family_checkpoint):
    """What the engine reads from config.json agrees with what HF's modules use."""
    name, d, model, _, _ = family_checkpoint
    mc = ModelConfig.from_dir(d)
    hf = model.config
    if name.startswith("gemma"):
        layers = model.model.layers
        assert mc.layer_windows() == tuple(l.self_attn.sliding_window for l in layers)
        assert mc.attn_scale == pytest.approx(layers[0].self_attn.scaling)
        assert mc.embed_scale == pytest.approx(float(model.model.embed_tokens.embed_scale))
        assert mc.attn_logit_softcap == hf.attn_logit_softcapping
        assert mc.final_logit_softcap == hf.final_logit_softcapping
        assert mc.mixed_windows
    if name == "gemma3_text":
        rot = model.model.rotary_emb
        np.testing.assert_allclose(mc.inv_freq(), rot.full_attention_inv_freq.double().numpy(), rtol=1e-6)
        np.testing.assert_allclose(mc.inv_freq(local=True), rot.sliding_attention_inv_freq.double().numpy(),
                                   rtol=1e-6)
        assert mc.layer_local_rope() == (True, True, False, True)
    if name in ("qwen3_moe", "mixtral"):
        assert mc.is_moe and mc.num_experts == (8 if name == "qwen3_moe" else 4)
        assert mc.num_experts_per_tok == 2
        assert mc.norm_topk_prob == (name == "mixtral")


def test_gemma3_multimodal_checkpoint_serves_its_language_model(tmp_path):
    """A ``gemma3`` (vision + language) checkpoint: the engine loads the language model, ignores the
    vision tower (with a warning), and its greedy tokens equal HF's on text-only prompts."""
    arch, overrides = VARIANTS["gemma3_text"]
    text = dict(TINY, **overrides)
    cfg = transformers.AutoConfig.for_model(
        "gemma3", text_config=text, mm_tokens_per_image=4,
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=28, patch_size=14))
    torch.manual_seed(3)
    model = transformers.Gemma3ForConditionalGeneration(cfg).eval()
    randomize_norms(model, 3)
    model.save_pretrained(str(tmp_path))
    mc = ModelConfig.from_dir(str(tmp_path))
    assert mc.model_type == "gemma3_text" and mc.mixed_windows
    prompts = random_prompts([40, 3, 70], seed=9, vocab=TINY["vocab_size"])
    max_tokens = [6, 9, 4]
    ref = [hf_greedy_cached(model, p, n) for p, n in zip(prompts, max_tokens)]
    engine = Engine.from_pretrained(str(tmp_path), dtype="float32", **ENGINE_KW)
    outs = engine.generate(prompts, [greedy(n) for n in max_tokens])
    assert [o.token_ids for o in outs] == ref
    assert_clean(engine)


def test_alternating_windows_stay_one_layer_scan(family_checkpoint):
    """Sliding and global layers (and the MoE layers) run under one scan over all layers: the step's
    program holds a single scan of length num_layers, whose body looks the window up by layer index."""
    import jax
    import jax.extend.core
    import jax.numpy as jnp

    from jaxserve import kv_cache
    from jaxserve.model import AttentionMetadata, CausalLM

    name, d, _, _, _ = family_checkpoint
    cfg = ModelConfig.from_dir(d)
    t, s = 8, 2
    meta = AttentionMetadata(slot_mapping=jnp.arange(t, dtype=jnp.int32), query_start_loc=jnp.array([0, 4, 8]),
                             seq_lens=jnp.array([4, 4]), block_tables=jnp.array([[0], [1]]), num_seqs=jnp.int32(2))
    cache = jnp.zeros(kv_cache.cache_shape(cfg, 2, 8), jnp.float32)
    model = CausalLM(cfg, jnp.float32)
    ids = jnp.zeros(t, jnp.int32)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), ids, ids, cache, meta, jnp.array([3, 7])))
    jaxpr = jax.make_jaxpr(lambda p: model.apply(p, ids, ids, cache, meta, jnp.array([3, 7])))(params)

    def scans(jx):
        for eqn in jx.eqns:
            if eqn.primitive.name == "scan":
                yield eqn
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                yield from scans(sub)

    layer_scans = [e for e in scans(jaxpr.jaxpr) if e.params["length"] == cfg.num_layers]
    assert len(layer_scans) == 1, name


@pytest.mark.parametrize("impl", ["pallas_tpu", "pallas_gpu"])
def test_gemma2_with_pallas_kernels_matches_hf(family_checkpoint, impl):
    """The Pallas kernels (interpreted on CPU) inside the layer scan, reading each layer's window as
    the scan's data: Gemma 2's greedy tokens still equal HF's (prompts longer than the window)."""
    name, d, _, prompts, ref = family_checkpoint
    if name != "gemma2":
        pytest.skip("one model is enough for the kernels' per-layer windows")
    picks = [3, 1, 8]  # 33, 5 and 16 tokens: one crosses the 16-token window in its prompt
    engine = Engine.from_pretrained(d, dtype="float32", attention_impl=impl, **ENGINE_KW)
    assert engine.runner.attention_impl == impl
    outs = engine.generate([prompts[i] for i in picks], [greedy(min(MAX_TOKENS[i], 6)) for i in picks])
    assert [o.token_ids for o in outs] == [ref[i][:min(MAX_TOKENS[i], 6)] for i in picks]
    assert_clean(engine)
