"""Load Hugging Face safetensors checkpoints into the Flax parameter tree of ``model.CausalLM``.

The safetensors format is read directly (8-byte header length, JSON header,
raw little-endian data) through ``numpy.memmap``, so bfloat16 checkpoints load
without torch and without copying the file into memory first.  Sharded
checkpoints (``model.safetensors.index.json``) are handled the same way.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import struct
from typing import Any, Iterator, Mapping

import jax
import ml_dtypes
import numpy as np

from jaxserve.config import ModelConfig

logger = logging.getLogger(__name__)

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}

NP_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


def read_safetensors(path: str) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (name, array) for every tensor of one .safetensors file (arrays are memory-mapped)."""
    try:
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_len))
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"model: could not read safetensors header of {path}: {e}") from e
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_len)
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _DTYPES:
            raise ValueError(f"model: tensor {name} in {path} has unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        arr = data[begin:end].view(_DTYPES[info["dtype"]]).reshape(info["shape"])
        yield name, arr


def checkpoint_files(model_dir: str) -> list[str]:
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        files = sorted({os.path.join(model_dir, v) for v in weight_map.values()})
        missing = [p for p in files if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(f"model: {missing[0]} (listed in {index}) not found")
        return files
    files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"model: no *.safetensors file in {model_dir}")
    return files


def load_hf_tensors(model_dir: str) -> dict[str, np.ndarray]:
    tensors: dict[str, np.ndarray] = {}
    for path in checkpoint_files(model_dir):
        tensors.update(read_safetensors(path))
    return tensors


def hf_to_params(cfg: ModelConfig, tensors: Mapping[str, np.ndarray], dtype: Any,
                 progress: bool = False, quantization: str | None = None) -> dict[str, Any]:
    """Map Hugging Face tensor names to our (fused, transposed) Linen parameter tree, as numpy.

    Layouts (see ``model.py``): ``qkv_proj`` kernel ``[H, Hkv, G+2, D]``, ``gate_up_proj`` kernel
    ``[H, 2, I]``, the other kernels ``[in, out]``; every layer weight is stacked on a leading layer
    axis under ``params["layers"]`` (the model scans over it).  ``quantization="int8"``: each layer's
    linear kernels, then the embedding and LM head, are quantized as they are laid out
    (``jaxserve/quant.py``), so the float tree is never held whole.  A tensor may also come as GGUF
    blocks kept quantized (``gguf_loader.gguf_blocks``: ``{"kernel": int8 [out, in], "scale": [out, in/G],
    "zero"?}``): its codes, scales and zero points are laid out alike (the group axis is the input axis),
    in one format per fused or stacked weight (``quant.harmonize``)."""
    from jaxserve import quant

    # "language_model.model." / "model.language_model.": the language model inside a multimodal Gemma 3
    # checkpoint (the vision tower's tensors are never read).
    prefixes = ("", "model.", "language_model.model.", "model.language_model.", "language_model.")

    def has(name: str) -> bool:
        return any(prefix + name in tensors for prefix in prefixes)

    def get(name: str) -> np.ndarray:
        for prefix in prefixes:
            if prefix + name in tensors:
                x = tensors[prefix + name]
                return x if isinstance(x, dict) else np.asarray(x)
        raise ValueError(f"model: tensor {name!r} missing from the checkpoint")

    requantize = quantization in ("int8", "w8a8")  # per channel; "gguf" keeps GGUF blocks as they come
    # Float weights: each layer's (transposed, fused) weights are written once, straight into the stacked
    # [layers, ...] arrays (no per-layer contiguous copy, then no second copy to stack them).
    direct = not requantize and quantization != "gguf"

    def cast(x: np.ndarray) -> np.ndarray:
        x = x.astype(dtype, copy=False)
        return x if direct else np.ascontiguousarray(x)

    def lay(fn, *xs, key: str = "kernel") -> dict[str, np.ndarray]:
        """``{key: fn(*xs)}`` in ``dtype``; for GGUF blocks, ``fn`` of their codes, scales and zero points."""
        if not any(isinstance(x, dict) for x in xs):
            return {key: cast(fn(*xs))}
        parts = quant.harmonize([x if isinstance(x, dict) else {"kernel": x} for x in xs], -1, np.float32)
        out = {k: np.ascontiguousarray(fn(*(p[k] for p in parts))) for k in parts[0]}
        kernel = out.pop("kernel")
        return {key: kernel if "scale" in out else cast(kernel), **out}

    hq, hkv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    g = hq // hkv

    def grouped_qkv(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
        """HF q [Hq*D, ...], k/v [Hkv*D, ...] (out features first) -> [..., Hkv, G+2, D]: each KV head's
        query group, then its K and V (see model.py: the layout that splits on KV heads)."""
        rest = q.shape[1:]
        q = q.reshape(hkv, g, d, *rest)
        k, v = k.reshape(hkv, 1, d, *rest), v.reshape(hkv, 1, d, *rest)
        out = np.concatenate([q, k, v], axis=1)  # [Hkv, G+2, D, ...]
        return np.moveaxis(out, (0, 1, 2), (-3, -2, -1)) if rest else out

    params: dict[str, Any] = {"embed": lay(lambda e: e, get("embed_tokens.weight"), key="embedding")}
    layers = []
    stacked = None  # direct: the [layers, ...] arrays
    from tqdm.auto import tqdm

    for i in tqdm(range(cfg.num_layers), desc="weights", unit="layer", disable=not progress, leave=False):
        p = f"layers.{i}."
        layer = {
            "input_norm": {"scale": cast(get(p + "input_layernorm.weight"))},
            "qkv_proj": lay(grouped_qkv, *(get(p + f"self_attn.{n}_proj.weight") for n in "qkv")),  # [H, Hkv, G+2, D]
            "o_proj": lay(np.transpose, get(p + "self_attn.o_proj.weight")),
            "post_attention_norm": {"scale": cast(get(p + "post_attention_layernorm.weight"))},
        }
        if cfg.sandwich_norms:
            layer["pre_feedforward_norm"] = {"scale": cast(get(p + "pre_feedforward_layernorm.weight"))}
            layer["post_feedforward_norm"] = {"scale": cast(get(p + "post_feedforward_layernorm.weight"))}
        if cfg.is_moe:
            layer["moe"] = moe_params(cfg, p, get, has, cast, dtype)
        else:
            layer["gate_up_proj"] = lay(lambda g, u: np.stack([g.T, u.T], axis=1),  # [H, 2, I]
                                        get(p + "mlp.gate_proj.weight"), get(p + "mlp.up_proj.weight"))
            layer["down_proj"] = lay(np.transpose, get(p + "mlp.down_proj.weight"))
        if cfg.attention_bias:
            layer["qkv_proj"]["bias"] = cast(grouped_qkv(
                *(get(p + f"self_attn.{n}_proj.bias") for n in "qkv")))  # [Hkv, G+2, D]
        if cfg.qk_norm:
            layer["q_norm"] = {"scale": cast(get(p + "self_attn.q_norm.weight"))}
            layer["k_norm"] = {"scale": cast(get(p + "self_attn.k_norm.weight"))}
        if direct:
            if stacked is None:
                stacked = jax.tree_util.tree_map(lambda x: np.empty((cfg.num_layers, *x.shape), x.dtype), layer)
            jax.tree_util.tree_map(lambda out, x: np.copyto(out[i], x), stacked, layer)
            continue
        layers.append(quant.quantize_layer(layer, stacked=False) if requantize else layer)
    for name in quant.LAYER_LINEARS:  # GGUF blocks: one format for the name in every layer
        if not requantize and not direct and name in layers[0]:
            for layer, part in zip(layers, quant.harmonize([x[name] for x in layers], 0, dtype)):
                layer[name] = {**{k: v for k, v in layer[name].items() if k not in ("kernel", "scale", "zero")},
                               **part}
    params["layers"] = stacked if direct else stack_layers(layers)
    params["final_norm"] = {"scale": np.ascontiguousarray(cast(get("norm.weight")))}
    if not cfg.tie_word_embeddings:
        params["lm_head"] = lay(np.transpose, get("lm_head.weight"))
    if direct:  # the embedding and LM head (a transposed view) as contiguous arrays
        params = jax.tree_util.tree_map(np.ascontiguousarray, params)
    if requantize:
        return quant.quantize_globals(params)
    return quant.pack_params(params) if quantization == "gguf" else params  # 4-bit codes: two per byte


def moe_params(cfg: ModelConfig, p: str, get, has, cast, dtype) -> dict[str, Any]:
    """One layer's router and experts, the per-expert HF tensors stacked on an expert axis:
    ``router.kernel [H, E]``, ``gate_up [E, H, 2, I]``, ``down [E, I, H]``.

    Names: Qwen3-MoE ``mlp.gate`` / ``mlp.experts.{e}.{gate,up,down}_proj``; Mixtral
    ``block_sparse_moe.gate`` / ``block_sparse_moe.experts.{e}.{w1,w3,w2}`` (gate, up, down); or the
    fused ``experts.gate_up_proj [E, 2I, H]`` / ``experts.down_proj [E, H, I]`` of transformers 5."""
    e, h, inter = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
    block = p + ("block_sparse_moe." if has(p + "block_sparse_moe.gate.weight") else "mlp.")
    names = ("w1", "w3", "w2") if cfg.model_type == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    gate_up = np.empty((e, h, 2, inter), dtype)
    down = np.empty((e, inter, h), dtype)
    if has(block + "experts.gate_up_proj"):
        fused = get(block + "experts.gate_up_proj")  # [E, 2I, H]
        gate_up[...] = cast(np.moveaxis(fused.reshape(e, 2, inter, h), 3, 1))
        down[...] = cast(np.swapaxes(get(block + "experts.down_proj"), 1, 2))
    else:
        for x in range(e):
            q = f"{block}experts.{x}."
            gate_up[x, :, 0] = cast(get(q + names[0] + ".weight").T)
            gate_up[x, :, 1] = cast(get(q + names[1] + ".weight").T)
            down[x] = cast(get(q + names[2] + ".weight").T)
    return {"router": {"kernel": cast(get(block + "gate.weight").T)}, "gate_up": gate_up, "down": down}


def stack_layers(layers: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-layer parameter trees -> one tree whose leaves have a leading layer axis."""
    def stack(*xs):
        out = np.empty((len(xs), *xs[0].shape), xs[0].dtype)
        for i, x in enumerate(xs):
            out[i] = x
        return out

    return jax.tree_util.tree_map(stack, *layers)


def load_params(model_dir: str, cfg: ModelConfig, dtype: Any, progress: bool = False,
                quantization: str | None = None) -> dict[str, Any]:
    """Read a Hugging Face checkpoint directory into a numpy parameter tree of ``dtype``
    (``progress``: a tqdm bar over the layers on stderr; ``quantization``: see ``hf_to_params``)."""
    return hf_to_params(cfg, load_hf_tensors(model_dir), dtype, progress, quantization)
