"""prompt_logprobs: the logprob (and rank, and top-n) of every prompt token given the tokens before it,
computed from the logits of every prompt row (behind a per-step flag), checked against Hugging Face
transformers on the tiny Llama; prompts long enough to be prefilled in several chunks."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import greedy, random_prompts

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hf_model(llama_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(llama_dir, torch_dtype=torch.float32).eval()


def hf_logprobs(model, prompt: list[int]) -> np.ndarray:
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0]
    return torch.log_softmax(logits.float(), dim=-1).numpy()


def test_prompt_logprobs_equal_hf(engine, hf_model):
    prompts = random_prompts([100, 7, 1], seed=5)  # 100 tokens: two 64-token prefill chunks
    params = [greedy(3, prompt_logprobs=5), greedy(3, prompt_logprobs=0), greedy(2, prompt_logprobs=2)]
    outs = engine.generate(prompts, params)
    plain = engine.generate(prompts[:2], greedy(3))
    for prompt, out, p in zip(prompts, outs, params):
        assert len(out.prompt_logprobs) == len(prompt) and out.prompt_logprobs[0] is None
        ref = hf_logprobs(hf_model, prompt)
        for pos in range(1, len(prompt)):
            lp = out.prompt_logprobs[pos]
            assert lp.token_id == prompt[pos]
            np.testing.assert_allclose(lp.logprob, ref[pos - 1, prompt[pos]], atol=2e-4)
            assert abs(lp.rank - (1 + int(np.sum(ref[pos - 1] > ref[pos - 1, prompt[pos]])))) <= 1  # float ties
            assert len(lp.top) == p.prompt_logprobs
            if lp.top:
                best = int(np.argmax(ref[pos - 1]))
                assert best in lp.top
    # the generated tokens are those of the same requests without prompt logprobs
    assert [o.token_ids for o in outs[:2]] == [o.token_ids for o in plain]


def test_prompt_logprobs_validated():
    from jaxserve import SamplingParams

    with pytest.raises(ValueError, match="^prompt_logprobs:"):
        SamplingParams(prompt_logprobs=21)
