"""Configuration dataclasses: the model's shapes (read from a Hugging Face config) and the engine's knobs."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from typing import Any

import numpy as np

from kernels_pallas import ATTENTION_IMPLS

LAYER_LOOPS = ("auto", "scan", "switch")  # EngineConfig.layer_loop; see model.resolve_layer_loop

logger = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything the Flax decoder needs to know about a Llama-family checkpoint."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: tuple[tuple[str, Any], ...] | None  # hashable copy of the HF dict
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool  # q/k/v projections carry a bias (Qwen2)
    qk_norm: bool  # RMSNorm on q and k per head (Qwen3)
    sliding_window: int | None
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]

    @property
    def rope_scaling_dict(self) -> dict[str, Any]:
        return dict(self.rope_scaling or ())

    @classmethod
    def from_hf(cls, hf: Any) -> "ModelConfig":
        """Build from a ``transformers`` PretrainedConfig (or anything with the same attributes)."""
        model_type = getattr(hf, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model_type: {model_type!r} is not supported; supported model types: "
                             f"{', '.join(SUPPORTED_MODEL_TYPES)}")
        num_heads = hf.num_attention_heads
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // num_heads
        # transformers >= 5 keeps theta and scaling in rope_parameters; older ones in
        # rope_theta / rope_scaling.
        rope = dict(getattr(hf, "rope_parameters", None) or {})
        legacy = getattr(hf, "rope_scaling", None)
        if legacy and not rope.get("rope_type"):
            rope.update(legacy)
        theta = rope.pop("rope_theta", None) or getattr(hf, "rope_theta", None) or 10000.0
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "linear", "llama3"):
            raise ValueError(f"rope_scaling: rope type {rope_type!r} is not supported "
                             "(supported: default, linear, llama3)")
        rope["rope_type"] = rope_type
        sliding_window = None
        if model_type == "mistral":
            sliding_window = getattr(hf, "sliding_window", None)
        elif model_type in ("qwen2", "qwen3") and getattr(hf, "use_sliding_window", False):
            raise ValueError("use_sliding_window: Qwen sliding-window layers are not supported")
        eos = getattr(hf, "eos_token_id", None)
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
        return cls(
            model_type=model_type,
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size,
            num_layers=hf.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=getattr(hf, "num_key_value_heads", None) or num_heads,
            head_dim=head_dim,
            rms_norm_eps=hf.rms_norm_eps,
            rope_theta=float(theta),
            rope_scaling=tuple(sorted(rope.items())),
            max_position_embeddings=hf.max_position_embeddings,
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            attention_bias=model_type == "qwen2" or bool(getattr(hf, "attention_bias", False)),
            qk_norm=model_type == "qwen3",
            sliding_window=sliding_window,
            bos_token_id=getattr(hf, "bos_token_id", None),
            eos_token_ids=eos_ids,
        )

    @classmethod
    def from_dir(cls, model_dir: str) -> "ModelConfig":
        path = os.path.join(model_dir, "config.json")
        if not os.path.isdir(model_dir):
            raise FileNotFoundError(f"model: directory {model_dir!r} does not exist")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"model: {path} not found (a Hugging Face model directory "
                                    "needs config.json and *.safetensors)")
        try:
            with open(path) as f:
                raw = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"model: could not read {path}: {e}") from e
        if raw.get("model_type") not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model_type: {raw.get('model_type')!r} in {path} is not supported; "
                             f"supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}")
        from transformers import AutoConfig

        try:
            hf = AutoConfig.from_pretrained(model_dir)
        except Exception as e:  # noqa: BLE001 - transformers raises many types
            raise ValueError(f"model: could not parse {path}: {e}") from e
        return cls.from_hf(hf)

    def inv_freq(self) -> np.ndarray:
        """RoPE inverse frequencies [head_dim // 2] (float32), with Llama-3 / linear scaling."""
        dim = self.head_dim
        inv = 1.0 / (self.rope_theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))
        inv = inv.astype(np.float32)
        rs = self.rope_scaling_dict
        kind = rs.get("rope_type", "default")
        if kind == "linear":
            inv = inv / np.float32(rs["factor"])
        elif kind == "llama3":
            factor = rs["factor"]
            low, high = rs["low_freq_factor"], rs["high_freq_factor"]
            old_ctx = rs["original_max_position_embeddings"]
            low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
            wavelen = 2 * math.pi / inv
            scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
            smooth = (old_ctx / wavelen - low) / (high - low)
            smoothed = (1 - smooth) * scaled / factor + smooth * scaled
            medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
            inv = np.where(medium, smoothed, scaled).astype(np.float32)
        return inv

    def num_params(self) -> int:
        h, i, d = self.hidden_size, self.intermediate_size, self.head_dim
        attn = h * d * (self.num_heads * 2 + self.num_kv_heads * 2)
        per_layer = attn + 3 * h * i + 2 * h
        emb = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + emb + h


@dataclasses.dataclass
class EngineConfig:
    """Engine knobs (names follow vLLM where it has one)."""

    max_num_seqs: int = 64  # running sequences at most (decode slots)
    max_num_batched_tokens: int = 512  # tokens per step (decode + prefill chunks)
    max_num_prefill_seqs: int = 8  # sequences prefilled in one step at most
    page_size: int = 16
    num_pages: int | None = None  # KV cache size in pages ...
    kv_cache_bytes: int | None = None  # ... or in bytes; default: every slot can hold max_model_len
    # default: the model's max_position_embeddings, at most what the KV cache holds for one sequence
    max_model_len: int | None = None
    # GPU/TPU, without num_pages/kv_cache_bytes: the KV cache gets this fraction of each device's memory
    # less the weights and the largest step's temporaries (None: 0.9).  Unused on CPU.
    memory_utilization: float | None = None
    dtype: str = "auto"  # float32 on CPU, bfloat16 on GPU/TPU
    scheduling: str = "continuous"  # or "static"
    enable_prefix_caching: bool = True  # share the KV pages of identical prompt prefixes
    enable_chunked_prefill: bool = True  # else a prompt is prefilled in one step (budget >= max_model_len)
    # auto: the backend's Pallas kernel on TPU/GPU, the reference on CPU (kernels_pallas); or reference |
    # pallas | pallas_tpu | pallas_gpu
    attention_impl: str = "auto"
    # how the step runs the layers: auto (switch on one CPU device, scan elsewhere) | scan | switch;
    # see jaxserve/model.py resolve_layer_loop
    layer_loop: str = "auto"
    seed: int = 0  # seeds requests that do not set their own
    min_decode_bucket: int = 4
    min_prefill_bucket: int = 32
    # {"data": D, "model": M}: serve on a D x M device mesh (tensor parallel on "model", token rows
    # of the batch on "data"; see jaxserve/sharding.py).  None: one device, no sharding at all.
    mesh_shape: dict[str, int] | None = None
    # JAX's persistent compilation cache: "auto" ($JAXSERVE_COMPILE_CACHE, else
    # $XDG_CACHE_HOME/jaxserve/xla or ~/.cache/jaxserve/xla), a directory, or None (off); see
    # jaxserve/compile_cache.py.
    compile_cache_dir: str | None = "auto"

    def validate(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_num_prefill_seqs", "page_size",
                     "min_decode_bucket", "min_prefill_bucket"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: must be a positive integer, got {value!r}")
        if self.scheduling not in ("continuous", "static"):
            raise ValueError(f"scheduling: must be 'continuous' or 'static', got {self.scheduling!r}")
        if self.num_pages is not None and (not isinstance(self.num_pages, int) or self.num_pages < 1):
            raise ValueError(f"num_pages: must be a positive integer, got {self.num_pages!r}")
        if self.kv_cache_bytes is not None and self.kv_cache_bytes < 1:
            raise ValueError(f"kv_cache_bytes: must be positive, got {self.kv_cache_bytes!r}")
        if self.memory_utilization is not None and not 0 < self.memory_utilization <= 1:
            raise ValueError(f"memory_utilization: must be in (0, 1], got {self.memory_utilization!r}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len: must be at least 2, got {self.max_model_len!r}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype: must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl: must be one of {', '.join(ATTENTION_IMPLS)}, "
                             f"got {self.attention_impl!r}")
        if self.layer_loop not in LAYER_LOOPS:
            raise ValueError(f"layer_loop: must be one of {', '.join(LAYER_LOOPS)}, got {self.layer_loop!r}")
        if self.compile_cache_dir is not None and (not isinstance(self.compile_cache_dir, str)
                                                   or not self.compile_cache_dir):
            raise ValueError(f"compile_cache_dir: must be 'auto', a directory or None, got {self.compile_cache_dir!r}")
        if self.mesh_shape is not None:
            from jaxserve.sharding import normalize_mesh_shape

            self.mesh_shape = normalize_mesh_shape(self.mesh_shape)
