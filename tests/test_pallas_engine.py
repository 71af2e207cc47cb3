"""The engine with the Pallas kernels: which implementation runs where, the fallback for shapes a kernel
does not serve, and greedy tokens equal to the reference engine's with each kernel (interpreted on CPU).

The kernels' own correctness grids are in test_pallas_tpu.py / test_pallas_gpu.py (interpret mode) and
their compile checks in test_compile_*_kernel.py; here the kernels run inside the engine's layer scan,
reading the stacked cache by layer index.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest
from conftest import ENGINE_KW, assert_clean, greedy, random_prompts

from jaxserve import Engine
from jaxserve.config import EngineConfig, ModelConfig
from jaxserve.model_runner import resolve_attention
from kernels_pallas import ATTENTION_IMPLS, ragged_paged_attention, resolve_impl
from kernels_pallas.ragged_paged_attention import ragged_paged_attention_dense
from test_attention import make_batch


def test_resolve_impl_per_backend():
    assert resolve_impl("auto", "tpu") == ("tpu", False)
    assert resolve_impl("auto", "gpu") == ("gpu", False)
    assert resolve_impl("auto", "cpu") == ("cpu", False)  # the C++ kernel (tests/test_attention_cpu.py)
    assert resolve_impl("pallas", "tpu") == ("tpu", False)
    assert resolve_impl("pallas", "gpu") == ("gpu", False)
    assert resolve_impl("pallas", "cpu") == ("gpu", True)
    assert resolve_impl("pallas_tpu", "cpu") == ("tpu", True)
    assert resolve_impl("pallas_tpu", "tpu") == ("tpu", False)
    assert resolve_impl("pallas_gpu", "tpu") == ("gpu", True)
    assert resolve_impl("reference", "gpu") == ("reference", False)
    with pytest.raises(ValueError, match="attention_impl"):
        resolve_impl("triton")


def test_auto_is_the_default():
    assert EngineConfig().attention_impl == "auto"
    with pytest.raises(ValueError, match="attention_impl"):
        EngineConfig(attention_impl="flash").validate()


@pytest.mark.parametrize("impl", ATTENTION_IMPLS)
def test_entry_point_every_impl(impl):
    """The entry point the model calls gives the dense result with every implementation."""
    rng = np.random.default_rng(6)
    args = make_batch(rng, page_size=16, gqa=3, num_decode_rows=4, num_decode_pad=1,
                      prefills=[(20, 0), (5, 17)], pad_rows=2, pad_seqs=1, max_pages_per_seq=4, head_dim=64)
    got = np.asarray(ragged_paged_attention(*args, sm_scale=0.125, num_decode_rows=4, sliding_window=12,
                                            impl=impl))
    want = ragged_paged_attention_dense(*args, sm_scale=0.125, sliding_window=12)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)


def _cfg(**kw) -> ModelConfig:
    base = ModelConfig(model_type="llama", vocab_size=1024, hidden_size=512, intermediate_size=1024, num_layers=2,
                       num_heads=8, num_kv_heads=2, head_dim=64, rms_norm_eps=1e-6, rope_theta=1e4,
                       rope_scaling=None, max_position_embeddings=2048, tie_word_embeddings=False,
                       attention_bias=False, qk_norm=False, sliding_window=None, bos_token_id=1, eos_token_ids=(2,))
    return dataclasses.replace(base, **kw)


@pytest.mark.parametrize("platform,kernel", [("tpu", "pallas_tpu"), ("gpu", "pallas_gpu")])
def test_auto_picks_the_platform_kernel(platform, kernel):
    assert resolve_attention("auto", platform, _cfg(), 16, np.dtype("float32")) == kernel
    assert resolve_attention("auto", "cpu", _cfg(), 16, np.dtype("float32")) == "cpu"


def test_unserved_shape_falls_back_to_the_reference_with_one_warning(caplog):
    """A head dim Triton cannot tile (not a power of two) on GPU, a 16-bit page smaller than TPU's packed
    sublane tile on TPU: the engine serves them with the reference and says so once, naming the shape."""
    with caplog.at_level(logging.WARNING, logger="jaxserve.model_runner"):
        assert resolve_attention("auto", "gpu", _cfg(head_dim=24, hidden_size=192), 16, np.dtype("float32")) \
            == "reference"
    assert len(caplog.records) == 1
    assert "GPU kernel does not serve head_dim=24" in caplog.records[0].getMessage()
    caplog.clear()
    import ml_dtypes

    with caplog.at_level(logging.WARNING, logger="jaxserve.model_runner"):
        assert resolve_attention("auto", "tpu", _cfg(), 8, np.dtype(ml_dtypes.bfloat16)) == "reference"
    assert len(caplog.records) == 1 and "page_size=8" in caplog.records[0].getMessage()


def test_engine_gpu_kernel_greedy_tokens_match_reference(llama_dir, reference_outputs):
    """The GPU kernel (interpreted on CPU) inside the engine's layer scan: the reference's tokens
    (decodes, a chunked prompt, page boundaries)."""
    prompts = random_prompts([5, 17, 80], seed=21)
    max_tokens = [12, 9, 6]
    engine = Engine.from_pretrained(llama_dir, attention_impl="pallas_gpu", **ENGINE_KW)
    assert engine.runner.attention_impl == "pallas_gpu"
    outs = engine.generate(prompts, [greedy(n) for n in max_tokens])
    assert_clean(engine)
    assert [o.token_ids for o in outs] == reference_outputs(prompts, max_tokens)


def test_engine_tpu_kernel_greedy_tokens_match_reference(llama_dir, reference_outputs):
    """The TPU kernel (TPU interpret mode) inside the engine's layer scan: the reference's tokens."""
    prompts = random_prompts([9, 70], seed=22)
    max_tokens = [5, 3]
    engine = Engine.from_pretrained(llama_dir, attention_impl="pallas_tpu", **ENGINE_KW)
    assert engine.runner.attention_impl == "pallas_tpu"
    outs = engine.generate(prompts, [greedy(n) for n in max_tokens])
    assert_clean(engine)
    assert [o.token_ids for o in outs] == reference_outputs(prompts, max_tokens)
