"""Write small random-weight checkpoints in Hugging Face format, plus a BPE tokenizer trained here.

Nothing is downloaded: the weights are random normals (std 0.02, as the HF
initialisers), the tokenizer is trained with ``tokenizers`` on text that ships
with the package.  Speed does not depend on the weights' values, so these
checkpoints serve the benchmarks as well as the tests.
"""

from __future__ import annotations

import json
import logging
import os
from importlib import resources

import numpy as np

logger = logging.getLogger(__name__)

SIZES = {
    # name: hidden, intermediate, layers, heads, kv heads, vocab
    "tiny": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1024),
    "56m": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                num_key_value_heads=4, vocab_size=32000),
    "200m": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=12, num_attention_heads=16,
                 num_key_value_heads=8, vocab_size=32000),
    # Llama-3.2-1B's shapes with a 32k vocabulary (1.1B parameters): the device check's model.
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=32000),
}
ARCHS = ("llama", "qwen2", "qwen3", "mistral")


def hf_config(arch: str, size: str, **overrides):
    """A ``transformers`` config object for one of our sizes and architectures."""
    from transformers import AutoConfig

    if arch not in ARCHS:
        raise ValueError(f"arch: must be one of {', '.join(ARCHS)}, got {arch!r}")
    if size not in SIZES:
        raise ValueError(f"size: must be one of {', '.join(SIZES)}, got {size!r}")
    kw = dict(SIZES[size], max_position_embeddings=2048, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2,
              tie_word_embeddings=False)
    if arch == "qwen3":
        kw["head_dim"] = kw["hidden_size"] // kw["num_attention_heads"]
    kw.update(overrides)
    return AutoConfig.for_model(arch, **kw)


def random_hf_tensors(config, seed: int = 0) -> dict[str, np.ndarray]:
    """Random weights with Hugging Face names and [out, in] layouts, float32."""
    rng = np.random.default_rng(seed)
    h, i = config.hidden_size, config.intermediate_size
    hq, hkv = config.num_attention_heads, config.num_key_value_heads
    d = getattr(config, "head_dim", None) or h // hq

    def normal(*shape):
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float32)

    t = {"model.embed_tokens.weight": normal(config.vocab_size, h), "model.norm.weight": np.ones(h, np.float32)}
    for layer in range(config.num_hidden_layers):
        p = f"model.layers.{layer}."
        t[p + "input_layernorm.weight"] = np.ones(h, np.float32)
        t[p + "post_attention_layernorm.weight"] = np.ones(h, np.float32)
        t[p + "self_attn.q_proj.weight"] = normal(hq * d, h)
        t[p + "self_attn.k_proj.weight"] = normal(hkv * d, h)
        t[p + "self_attn.v_proj.weight"] = normal(hkv * d, h)
        t[p + "self_attn.o_proj.weight"] = normal(h, hq * d)
        if config.model_type == "qwen2":
            for n, width in (("q", hq * d), ("k", hkv * d), ("v", hkv * d)):
                t[p + f"self_attn.{n}_proj.bias"] = normal(width)
        if config.model_type == "qwen3":
            t[p + "self_attn.q_norm.weight"] = np.ones(d, np.float32)
            t[p + "self_attn.k_norm.weight"] = np.ones(d, np.float32)
        t[p + "mlp.gate_proj.weight"] = normal(i, h)
        t[p + "mlp.up_proj.weight"] = normal(i, h)
        t[p + "mlp.down_proj.weight"] = normal(h, i)
    if not config.tie_word_embeddings:
        t["lm_head.weight"] = normal(config.vocab_size, h)
    return t


def corpus_lines() -> list[str]:
    text = resources.files("jaxserve").joinpath("data/corpus.txt").read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.strip()]


def train_tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer (ids 0..2 = <unk>, <s>, </s>) wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=min(vocab_size, 4096), special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus_lines(), trainer)
    # The shipped text yields only a few thousand merges; pad the vocabulary with placeholder
    # tokens so every id of the model decodes to visible text ("<id1234>"), never to nothing.
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for i in range(len(vocab), vocab_size):
        vocab[f"<id{i}>"] = i
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def save_safetensors(tensors: dict[str, np.ndarray], path: str) -> None:
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, path, metadata={"format": "pt"})


DTYPES = ("float32", "bfloat16")


def make_model(out_dir: str, arch: str = "llama", size: str = "tiny", seed: int = 0,
               tokenizer: bool = True, dtype: str = "float32", **overrides) -> str:
    """Write ``config.json``, ``model.safetensors`` and a tokenizer to ``out_dir``; returns ``out_dir``.
    ``dtype``: how the tensors are stored; ``bfloat16`` (the same random weights rounded to bf16, as most
    Hugging Face checkpoints are stored) for the code paths of a bf16 checkpoint."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype: must be one of {', '.join(DTYPES)}, got {dtype!r}")
    config = hf_config(arch, size, torch_dtype=dtype, **overrides)
    os.makedirs(out_dir, exist_ok=True)
    config.save_pretrained(out_dir)
    tensors = random_hf_tensors(config, seed)
    if dtype == "bfloat16":
        import ml_dtypes

        tensors = {k: v.astype(ml_dtypes.bfloat16) for k, v in tensors.items()}
    save_safetensors(tensors, os.path.join(out_dir, "model.safetensors"))
    if tokenizer:
        train_tokenizer(config.vocab_size).save_pretrained(out_dir)
    with open(os.path.join(out_dir, "config.json")) as f:
        n = json.load(f)
    logger.info("wrote a random %s-%s checkpoint (%s layers, hidden %s, vocab %s) to %s", arch, size,
                n["num_hidden_layers"], n["hidden_size"], n["vocab_size"], out_dir)
    return out_dir
