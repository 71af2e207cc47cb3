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

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "gemma3", "qwen3_moe",
                         "mixtral")
GEMMA_TYPES = ("gemma2", "gemma3_text")
MOE_TYPES = ("qwen3_moe", "mixtral")
SLIDING, FULL = "sliding_attention", "full_attention"  # HF's layer_types


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything the Flax decoder needs to know about a checkpoint (Llama family, Gemma 2/3,
    mixture-of-experts Qwen3-MoE/Mixtral).  The fields after ``eos_token_ids`` have defaults that mean
    "a Llama-family model" (the GGUF loader builds only those)."""

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
    # -- Gemma 2 / 3 --
    hidden_act: str = "silu"  # the gated MLP's activation: silu, or gelu_pytorch_tanh (GeGLU, Gemma)
    norm_offset: float = 0.0  # RMSNorm multiplies by (norm_offset + weight): 1.0 in Gemma
    embed_scale: float | None = None  # embeddings multiplied by this (Gemma: sqrt(hidden_size))
    query_pre_attn_scalar: float | None = None  # attention scale = this ** -0.5 (default head_dim)
    attn_logit_softcap: float | None = None  # cap * tanh(scores / cap) (Gemma 2)
    final_logit_softcap: float | None = None  # on the LM head's logits (Gemma 2)
    sandwich_norms: bool = False  # norms on the attention output and around the MLP (Gemma)
    # HF's layer_types ("sliding_attention" / "full_attention" per layer); None: every layer alike,
    # windowed iff sliding_window is set (Mistral).
    layer_types: tuple[str, ...] | None = None
    # RoPE of the sliding layers when it differs from the global one (Gemma 3: base 10k, no scaling).
    local_rope_theta: float | None = None
    local_rope_scaling: tuple[tuple[str, Any], ...] | None = None
    # -- mixture of experts (Qwen3-MoE, Mixtral): every layer's MLP is a routed set of experts --
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0  # each expert's intermediate size
    norm_topk_prob: bool = True  # renormalize the top-k routing weights to sum to 1 (Mixtral: always)

    @property
    def rope_scaling_dict(self) -> dict[str, Any]:
        return dict(self.rope_scaling or ())

    @classmethod
    def from_hf(cls, hf: Any) -> "ModelConfig":
        """Build from a ``transformers`` PretrainedConfig (or anything with the same attributes).

        A multimodal ``gemma3`` config gives its language model (``text_config``); the vision tower is
        not served (text prompts only)."""
        model_type = getattr(hf, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model_type: {model_type!r} is not supported; supported model types: "
                             f"{', '.join(SUPPORTED_MODEL_TYPES)}")
        outer_eos = None
        if model_type == "gemma3":
            logger.warning("gemma3: serving the language model of this multimodal checkpoint only; its "
                           "vision tower and projector are not loaded (text prompts only, no images)")
            outer_eos = getattr(hf, "eos_token_id", None)
            hf = hf.text_config
            model_type = getattr(hf, "model_type", None)
            if model_type != "gemma3_text":
                raise ValueError(f"model_type: gemma3 text_config has model_type {model_type!r}, "
                                 "expected 'gemma3_text'")
        num_heads = hf.num_attention_heads
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // num_heads
        gemma = model_type in GEMMA_TYPES
        # transformers >= 5 keeps theta and scaling in rope_parameters (Gemma 3: one dict per layer
        # type); older ones in rope_theta / rope_scaling (Gemma 3: and rope_local_base_freq).
        params = dict(getattr(hf, "rope_parameters", None) or {})
        local_rope = None
        if FULL in params or SLIDING in params:
            local_rope = dict(params.get(SLIDING) or {})
            params = dict(params.get(FULL) or {})
        elif getattr(hf, "rope_local_base_freq", None) is not None:
            local_rope = {"rope_theta": hf.rope_local_base_freq, "rope_type": "default"}
        theta, rope = _parse_rope(params, getattr(hf, "rope_scaling", None), getattr(hf, "rope_theta", None))
        local_theta = local_scaling = None
        if local_rope is not None:
            local_theta, local_scaling = _parse_rope(local_rope, None, None)
            if (local_theta, local_scaling) == (theta, rope):
                local_theta = local_scaling = None
        layer_types = None
        sliding_window = None
        if model_type in ("mistral", "mixtral"):
            sliding_window = getattr(hf, "sliding_window", None)
        elif model_type in ("qwen2", "qwen3", "qwen3_moe") and getattr(hf, "use_sliding_window", False):
            raise ValueError("use_sliding_window: Qwen sliding-window layers are not supported")
        elif gemma:
            sliding_window = getattr(hf, "sliding_window", None)
            types = getattr(hf, "layer_types", None)
            if types is None:  # pre-layer_types configs: Gemma 2 alternates from layer 0, Gemma 3 1 of 6 global
                pattern = getattr(hf, "sliding_window_pattern", None) or (2 if model_type == "gemma2" else 6)
                types = [FULL if (i + 1) % pattern == 0 else SLIDING for i in range(hf.num_hidden_layers)]
            unknown = sorted(set(types) - {SLIDING, FULL})
            if unknown:
                raise ValueError(f"layer_types: {unknown[0]!r} is not supported (supported: {SLIDING}, {FULL})")
            if len(types) != hf.num_hidden_layers:
                raise ValueError(f"layer_types: {len(types)} entries for {hf.num_hidden_layers} layers")
            layer_types = tuple(types) if sliding_window else None
            if getattr(hf, "use_bidirectional_attention", False):
                raise ValueError("use_bidirectional_attention: bidirectional (embedding) Gemma models are "
                                 "not supported")
        act = getattr(hf, "hidden_activation", None) or getattr(hf, "hidden_act", None) or "silu"
        if act not in _ACTIVATIONS:
            raise ValueError(f"hidden_act: {act!r} is not supported (supported: {', '.join(_ACTIVATIONS)})")
        moe = {}
        if model_type in MOE_TYPES:
            if model_type == "qwen3_moe":
                if getattr(hf, "mlp_only_layers", None) or getattr(hf, "decoder_sparse_step", 1) != 1:
                    raise ValueError("mlp_only_layers / decoder_sparse_step: Qwen3-MoE models with dense "
                                     "layers between the expert layers are not supported")
                moe = dict(num_experts=hf.num_experts, moe_intermediate_size=hf.moe_intermediate_size,
                           norm_topk_prob=bool(hf.norm_topk_prob))
            else:  # Mixtral: softmax over the top-k logits, i.e. the top-k probabilities renormalized
                moe = dict(num_experts=hf.num_local_experts, moe_intermediate_size=hf.intermediate_size,
                           norm_topk_prob=True)
            moe["num_experts_per_tok"] = hf.num_experts_per_tok
            if not 0 < moe["num_experts_per_tok"] <= moe["num_experts"]:
                raise ValueError(f"num_experts_per_tok: must be in [1, {moe['num_experts']}], "
                                 f"got {moe['num_experts_per_tok']}")
        eos = outer_eos if outer_eos is not None else getattr(hf, "eos_token_id", None)
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
            rope_scaling=rope,
            max_position_embeddings=hf.max_position_embeddings,
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            attention_bias=model_type == "qwen2" or bool(getattr(hf, "attention_bias", False)),
            qk_norm=model_type in ("qwen3", "qwen3_moe", "gemma3_text"),
            sliding_window=sliding_window,
            bos_token_id=getattr(hf, "bos_token_id", None),
            eos_token_ids=eos_ids,
            hidden_act=act,
            norm_offset=1.0 if gemma else 0.0,
            embed_scale=float(np.float32(hf.hidden_size ** 0.5)) if gemma else None,
            query_pre_attn_scalar=float(hf.query_pre_attn_scalar) if gemma else None,
            attn_logit_softcap=getattr(hf, "attn_logit_softcapping", None) if gemma else None,
            final_logit_softcap=getattr(hf, "final_logit_softcapping", None) if gemma else None,
            sandwich_norms=gemma,
            layer_types=layer_types,
            local_rope_theta=None if local_theta is None else float(local_theta),
            local_rope_scaling=local_scaling,
            **moe,
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
        cfg = cls.from_hf(hf)
        # Chat models often list their end-of-turn token only in generation_config.json (Gemma's
        # <end_of_turn>): it stops generation too.
        gen_path = os.path.join(model_dir, "generation_config.json")
        if os.path.isfile(gen_path):
            try:
                with open(gen_path) as f:
                    eos = json.load(f).get("eos_token_id")
            except (OSError, json.JSONDecodeError):
                eos = None
            extra = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
            merged = tuple(dict.fromkeys(cfg.eos_token_ids + tuple(int(t) for t in extra)))
            if merged != cfg.eos_token_ids:
                cfg = dataclasses.replace(cfg, eos_token_ids=merged)
        return cfg

    # -- per-layer attention (windows, rope) ---------------------------------------------------------

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def attn_scale(self) -> float:
        """The attention's score scale (``query_pre_attn_scalar ** -0.5``, default ``head_dim ** -0.5``)."""
        return float(self.query_pre_attn_scalar or self.head_dim) ** -0.5

    def layer_windows(self) -> tuple[int | None, ...]:
        """The sliding window of every layer (None: global attention)."""
        if self.layer_types is None:
            return (self.sliding_window,) * self.num_layers
        return tuple(self.sliding_window if t == SLIDING else None for t in self.layer_types)

    @property
    def mixed_windows(self) -> bool:
        """Layers differ in their window (Gemma): the window is per-layer data of the layer scan."""
        return len(set(self.layer_windows())) > 1

    def layer_local_rope(self) -> tuple[bool, ...] | None:
        """Per layer, whether it uses the local (sliding-layer) RoPE; None when all use the global one."""
        if self.local_rope_theta is None:
            return None
        return tuple(t == SLIDING for t in (self.layer_types or (FULL,) * self.num_layers))

    def inv_freq(self, local: bool = False) -> np.ndarray:
        """RoPE inverse frequencies [head_dim // 2] (float32), with Llama-3 / linear scaling
        (``local``: those of the sliding-window layers, when they have their own)."""
        dim = self.head_dim
        theta, scaling = self.rope_theta, self.rope_scaling
        if local and self.local_rope_theta is not None:
            theta, scaling = self.local_rope_theta, self.local_rope_scaling
        inv = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))
        inv = inv.astype(np.float32)
        rs = dict(scaling or ())
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
        mlp = (self.num_experts * 3 * h * self.moe_intermediate_size + h * self.num_experts if self.is_moe
               else 3 * h * i)
        per_layer = attn + mlp + (4 if self.sandwich_norms else 2) * h
        emb = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + emb + h

    def num_active_params(self) -> int:
        """Parameters one token's forward pass uses (a mixture of experts runs only its top-k)."""
        if not self.is_moe:
            return self.num_params()
        unused = self.num_experts - self.num_experts_per_tok
        return self.num_params() - self.num_layers * unused * 3 * self.hidden_size * self.moe_intermediate_size


_ACTIVATIONS = ("silu", "swish", "gelu_pytorch_tanh", "gelu_new", "gelu_fast", "gelu")  # see jaxserve/moe.py


def _parse_rope(params: dict[str, Any], legacy: Any, legacy_theta: Any) -> tuple[float, tuple]:
    """(theta, hashable scaling dict with its rope_type) from HF's rope_parameters (or the legacy
    rope_scaling / rope_theta)."""
    rope = dict(params)
    if legacy and not rope.get("rope_type"):
        rope.update(legacy)
    theta = rope.pop("rope_theta", None) or legacy_theta or 10000.0
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "linear", "llama3"):
        raise ValueError(f"rope_scaling: rope type {rope_type!r} is not supported "
                         "(supported: default, linear, llama3)")
    rope["rope_type"] = rope_type
    return float(theta), tuple(sorted(rope.items()))


# --async-scheduling (CLI, bench/throughput.py) to EngineConfig.async_scheduling
ASYNC_SCHEDULING_FLAGS = {"auto": None, "on": True, "off": False}


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
    # the KV cache's values: auto (= dtype) | int8 (per-token-per-head scales) | fp8_e4m3; layout and
    # quantization: jaxserve/kv_cache.py
    kv_cache_dtype: str = "auto"
    # None: the weights in ``dtype``; "int8": weight-only int8 (W8A16) with per-output-channel scales,
    # quantized at load (a quantized checkpoint is served as int8 whatever this says); jaxserve/quant.py
    quantization: str | None = None
    scheduling: str = "continuous"  # or "static"
    # Continuous scheduling: schedule and prepare the next step, and process the last step's tokens, while
    # a step runs (Engine.step; vLLM's async_scheduling).  Requests with penalties, bad words, logit bias,
    # min_tokens, structured outputs or prompt logprobs, and speculative decoding, run step by step.
    # None: on (the host's work leaves the device's critical path; on a 2-core CPU too, where the host
    # shares the cores with the step: longtail-256 at 64 slots, 1.02x; README "Async scheduling").
    async_scheduling: bool | None = None
    enable_prefix_caching: bool = True  # share the KV pages of identical prompt prefixes
    enable_chunked_prefill: bool = True  # else a prompt is prefilled in one step (budget >= max_model_len)
    # auto: the backend's Pallas kernel on TPU/GPU, the C++ kernel on CPU (the reference if it is not
    # built; kernels_pallas); or reference | cpu | pallas | pallas_tpu | pallas_gpu
    attention_impl: str = "auto"
    # mixture-of-experts FFN (jaxserve/moe.py): auto (ragged_dot on TPU/GPU, tiled loops on CPU) |
    # ragged_dot | tiled | dense (every expert on every token: the reference)
    moe_impl: str = "auto"
    # the layers' matmuls: auto (the C++ kernel kernels_pallas/gemm_cpu.py for float32 weights on one CPU
    # device, at the step shapes where it beats XLA; XLA's dot elsewhere) | xla | cpu (the kernel, or an error)
    matmul_impl: str = "auto"
    # how the step runs the layers: auto (switch on one CPU device, scan elsewhere) | scan | switch;
    # see jaxserve/model.py resolve_layer_loop
    layer_loop: str = "auto"
    # a decoder layer in one call: auto (the C++ kernel kernels_pallas/layer_cpu.py where the model is
    # Llama-shaped and the matmuls and attention are the CPU kernels') | fused (it, or an error) | ops
    layer_impl: str = "auto"
    seed: int = 0  # seeds requests that do not set their own
    min_decode_bucket: int = 4
    min_prefill_bucket: int = 32
    # {"data": D, "model": M}: serve on a D x M device mesh (tensor parallel on "model"; data-parallel
    # attention on "data": D groups, each its own sequences and KV pages; see jaxserve/sharding.py).
    # None: one device, no sharding at all.
    mesh_shape: dict[str, int] | None = None
    # JAX's persistent compilation cache: "auto" ($JAXSERVE_COMPILE_CACHE, else
    # $XDG_CACHE_HOME/jaxserve/xla or ~/.cache/jaxserve/xla), a directory, or None (off); see
    # jaxserve/compile_cache.py.
    compile_cache_dir: str | None = "auto"
    # Speculative decoding (jaxserve/spec_decode.py), vLLM's names: {"method": "ngram",
    # "num_speculative_tokens": k, "prompt_lookup_max": 4, "prompt_lookup_min": 1}; None: off.
    speculative_config: Any = None

    def validate(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_num_prefill_seqs", "page_size",
                     "min_decode_bucket", "min_prefill_bucket"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: must be a positive integer, got {value!r}")
        if self.async_scheduling is not None and not isinstance(self.async_scheduling, bool):
            raise ValueError(f"async_scheduling: must be true, false or None (auto), got {self.async_scheduling!r}")
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
        if self.kv_cache_dtype not in ("auto", "int8", "fp8_e4m3"):  # jaxserve.kv_cache.KV_CACHE_DTYPES
            raise ValueError(f"kv_cache_dtype: must be auto, int8 or fp8_e4m3, got {self.kv_cache_dtype!r}")
        from jaxserve.quant import QUANTIZATIONS

        if self.quantization is not None and self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization: must be None or one of {', '.join(QUANTIZATIONS)}, "
                             f"got {self.quantization!r}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl: must be one of {', '.join(ATTENTION_IMPLS)}, "
                             f"got {self.attention_impl!r}")
        from kernels_pallas.gemm_cpu import MATMUL_IMPLS
        from jaxserve.moe import MOE_IMPLS

        if self.matmul_impl not in MATMUL_IMPLS:
            raise ValueError(f"matmul_impl: must be one of {', '.join(MATMUL_IMPLS)}, got {self.matmul_impl!r}")

        from kernels_pallas.layer_cpu import LAYER_IMPLS

        if self.layer_impl not in LAYER_IMPLS:
            raise ValueError(f"layer_impl: must be one of {', '.join(LAYER_IMPLS)}, got {self.layer_impl!r}")
        if self.moe_impl not in MOE_IMPLS:
            raise ValueError(f"moe_impl: must be one of {', '.join(MOE_IMPLS)}, got {self.moe_impl!r}")
        if self.layer_loop not in LAYER_LOOPS:
            raise ValueError(f"layer_loop: must be one of {', '.join(LAYER_LOOPS)}, got {self.layer_loop!r}")
        if self.compile_cache_dir is not None and (not isinstance(self.compile_cache_dir, str)
                                                   or not self.compile_cache_dir):
            raise ValueError(f"compile_cache_dir: must be 'auto', a directory or None, got {self.compile_cache_dir!r}")
        from jaxserve.spec_decode import SpeculativeConfig

        self.speculative_config = SpeculativeConfig.from_value(self.speculative_config)
        if self.mesh_shape is not None:
            from jaxserve.sharding import normalize_mesh_shape

            self.mesh_shape = normalize_mesh_shape(self.mesh_shape)
        d = self.data_groups
        if d > 1:  # data-parallel attention: each data group schedules its share (jaxserve/sharding.py)
            for name in ("max_num_seqs", "max_num_batched_tokens", "num_pages"):
                value = getattr(self, name)
                if value is not None and value % d:
                    raise ValueError(f"{name}: must be a multiple of the 'data' axis ({d}), got {value}: each data "
                                     f"group owns {name} / {d}")
            if self.scheduling == "static":
                raise ValueError(f"scheduling: 'static' is not supported on a 'data' axis of {d} "
                                 "(data-parallel attention)")
            if self.speculative_config is not None:
                raise ValueError(f"speculative_config: speculative decoding is not supported on a 'data' axis "
                                 f"of {d} (data-parallel attention)")

    # Data-parallel attention (a mesh with data D > 1): D groups, each with its own sequences, pages and
    # share of every step; with D = 1 these are the engine's own limits.
    @property
    def data_groups(self) -> int:
        return (self.mesh_shape or {}).get("data", 1)

    @property
    def group_max_num_seqs(self) -> int:
        return self.max_num_seqs // self.data_groups

    @property
    def group_max_num_batched_tokens(self) -> int:
        return self.max_num_batched_tokens // self.data_groups

    @property
    def group_max_num_prefill_seqs(self) -> int:
        return min(self.max_num_prefill_seqs, self.group_max_num_seqs)
