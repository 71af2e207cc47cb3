"""Packs a scheduled step into fixed-shape arrays and runs the jit-compiled model step.

Layout of one step (vLLM's convention, decodes first)::

    token rows : [ D decode tokens | T_p prefill-chunk tokens              ]
    seq slots  : [ D decode seqs   | P prefill seqs                         ]

``D`` is padded up to a power of two (the *decode bucket*), ``T_p`` likewise
(the *prefill bucket*), and ``P`` is fixed (``max_num_prefill_seqs``), so the
number of compiled programs is at most ``len(decode_buckets) * len(prefill_buckets)``.
Each program is compiled ahead of time once (``jit(...).lower(...).compile()``),
logged, and counted in ``compile_count``; an unexpected shape could not slip
into a silent recompile.  The KV cache is donated, so XLA updates it in place.

On a device mesh (``mesh`` given) each bucket's program is jitted with explicit
``in_shardings``/``out_shardings``: the weights and the KV cache in their
tensor-parallel shardings (``jaxserve/sharding.py``), the token ids and
positions split on ``data`` (when the bucket's row count divides by it), the
metadata and the sampled tokens replicated.  Without a mesh the program is the
plain single-device one.

Data-parallel attention (a mesh with ``data`` G > 1, ``jaxserve/sharding.py``): the step is G blocks
of equal size, block ``g`` the layout above for data group ``g``'s sequences alone (its decodes, then
its prefill chunks, padded to the group's bucket), so that the row split on ``data`` hands each group
its own rows.  Buckets are G times a group's bucket; the attention metadata gets a leading group axis
(``[G, ...]``, split on ``data``) in each group's local rows and local page ids (global page id less
``g * num_pages / G``), and sequence slot ``g * S / G + i`` is the group's slot ``i``.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import logging
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jax.sharding import Mesh

from jaxserve import compile_cache, kv_cache, quant, sharding
from jaxserve.config import EngineConfig, ModelConfig
from jaxserve.model import (AttentionMetadata, CausalLM, head_logits, pack_linears, resolve_layer_loop, sampled_slots,
                            unstack_layers)
from jaxserve.sampling import (MAX_BAD_WORD_BANS, MAX_LOGPROBS, PenaltyArrays, PenaltyState, SamplingArrays,
                               allocate_penalty_state, apply_penalties, compute_logprobs, init_penalty_row, sample,
                               update_penalty_counts)
from jaxserve.scheduler import SchedulerOutput
from jaxserve.spec_decode import SpecInputs, verify
from jaxserve.structured import apply_token_bitmask
from kernels_pallas import gemm_cpu, resolve_impl, unsupported_reason
from kernels_pallas.gemm_cpu import resolve_matmul
from kernels_pallas.layer_cpu import resolve_layer

logger = logging.getLogger(__name__)

PROMPT_LOGPROBS_BLOCK = 128  # rows whose prompt logprobs are computed at once (temporaries [block, vocab])


def power_of_two_buckets(lo: int, hi: int) -> list[int]:
    """Powers of two from ``lo`` (rounded up) up to and including ``hi``."""
    out, b = [], 1
    while b < lo:
        b *= 2
    while b < hi:
        out.append(b)
        b *= 2
    out.append(hi)
    return out


def pick_bucket(n: int, buckets: list[int]) -> int:
    for b in buckets:
        if b >= n:
            return b
    raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class StepInputs:
    input_ids: jax.Array  # [T]
    positions: jax.Array  # [T]
    meta: AttentionMetadata
    logits_indices: jax.Array  # [S] row of each sequence's last new token
    sampling: SamplingArrays  # [S]
    want_logprobs: jax.Array  # [] bool
    penalties: PenaltyArrays  # [S] (+ the step's bad-word bans)
    bitmask: jax.Array  # [S, ceil(V / 32)] int32: allowed tokens of constrained rows (structured outputs)
    mask_active: jax.Array  # [S] bool: the row's bitmask applies
    prompt_targets: jax.Array  # [T] int32: the next prompt token of a row wanting prompt logprobs (else -1)
    want_prompt_logprobs: jax.Array  # [] bool
    greedy: jax.Array  # [] bool: every row greedy, no logprobs, penalties or grammar (ModelRunner._step)
    spec: SpecInputs | None = None  # rows verified by speculative decoding (engines with a speculative_config)


@dataclasses.dataclass
class StepResult:
    """A collected step's results on the host, beside the ``HostStep`` they answer (its slots, prompt-logprob
    rows and verified rows say which sequence each row is)."""
    tokens: np.ndarray  # [S] sampled token per sequence slot
    logprob: np.ndarray | None  # [S]
    top_ids: np.ndarray | None  # [S, MAX_LOGPROBS]
    top_logprobs: np.ndarray | None
    host: "HostStep"
    # Prompt logprobs of host.prompt_rows' rows: per row (logprob of the next prompt token, its rank, top ids,
    # top logprobs).
    prompt: tuple | None = None
    # Speculative decoding: per verified row (host.spec_first), the token to emit if the chain stops there and
    # whether the next proposal was accepted.
    spec_tokens: np.ndarray | None = None
    spec_accept: np.ndarray | None = None


@dataclasses.dataclass
class HostStep:
    """What ``ModelRunner.prepare`` makes of a scheduler step on the host: its bucket (``key``: decode slots,
    prefill rows), its input arrays, and what ``collect`` and the engine need to read its results."""
    key: tuple[int, int]
    arrays: dict[str, np.ndarray]
    want_logprobs: bool
    slots: list  # sequence slot of each decode, then each prefill
    prompt_rows: list  # (seq, first position, first row, count): rows whose prompt logprobs are returned
    spec_first: dict  # slot -> the index of its first verified row (speculative decoding)
    patch: list  # (row, sequence): a decode whose input token the step before is still sampling

    @property
    def decode_slots(self) -> int:
        """The bucket's decode slots: the first prefill slot."""
        return self.key[0]


@dataclasses.dataclass
class PreparedStep:
    """One step between ``ModelRunner.prepare_step`` and ``collect``: what ``prepare`` made of it on the host,
    its inputs, its program and, once launched, its outputs on the device."""
    host: HostStep
    inputs: StepInputs
    exe: Any
    t_launch: float = 0.0
    outputs: list = dataclasses.field(default_factory=list)


class ModelRunner:
    def __init__(self, model_cfg: ModelConfig, engine_cfg: EngineConfig, params: Any, cache: Any,
                 dtype: Any, max_model_len: int, num_pages: int, mesh: Mesh | None = None,
                 platform: str | None = None):
        """``model_cfg`` is the model as it runs (with replicated KV heads on a mesh that needs them);
        ``params``/``cache`` are already placed (sharded on ``mesh`` if given), or are
        ``jax.ShapeDtypeStruct``s with shardings for a compile-only run (``jaxserve plan``).
        ``platform``: what the steps are compiled for (default: the mesh's devices, else
        ``jax.default_backend()``)."""
        self.model_cfg = model_cfg
        self.platform = platform or (mesh.devices.flat[0].platform if mesh is not None else jax.default_backend())
        self.attention_impl = resolve_attention(engine_cfg.attention_impl, self.platform, model_cfg,
                                                engine_cfg.page_size, dtype, kv_cache_dtype(cache, dtype))
        self.layer_loop = resolve_layer_loop(engine_cfg.layer_loop, self.platform, mesh)
        if self.layer_loop == "switch" and "layers" in params:
            params = unstack_layers(params, model_cfg.num_layers)
        self.mesh = mesh
        self._multi_process = mesh is not None and jax.process_count() > 1
        self.cfg = engine_cfg
        # int8 weights (jaxserve/quant.py): W8A16 ("int8") unless the engine asks for "w8a8"
        self.quantization = (engine_cfg.quantization or "int8") if quant.is_quantized(params) else None
        self.matmul_impl = resolve_matmul(engine_cfg.matmul_impl, self.platform, mesh=mesh, dtype=dtype,
                                          quantization=self.quantization)
        # Greedy steps find each row's token from the LM head with gemm_cpu.argmax_head (where its approximate
        # product is cheaper than the head: AMX, AVX512_BF16, or AVX-512 reading half the bytes; measured in
        # bench/gemm_cpu.py): a float32 head, one device, plain logits (see _step).
        self.greedy_head = (self.matmul_impl == "cpu" and mesh is None and engine_cfg.speculative_config is None
                            and not model_cfg.tie_word_embeddings and model_cfg.final_logit_softcap is None
                            and self.quantization is None
                            and bool({"amx", "dpbf16", "avx512"} & set(gemm_cpu.available_isas())))
        if self.matmul_impl == "cpu":  # the linear layers' weights in the CPU matmul kernel's layout, once
            params = pack_linears(params, greedy_head=self.greedy_head)
        # a decoder layer in one call (kernels_pallas/layer_cpu.py): per-layer packed weights, CPU kernels
        self.layer_impl = resolve_layer(
            engine_cfg.layer_impl, model_cfg, matmul_impl=self.matmul_impl, attention_impl=self.attention_impl,
            kv_dtype=kv_cache_dtype(cache, dtype), mesh=mesh, quantization=self.quantization,
            layer_loop=self.layer_loop)
        head = params.get("lm_head", {})
        self.greedy_head = self.greedy_head and "greedy_hi" in head and "bias" not in head
        self.params = params
        self.cache = cache
        self.dtype = dtype
        self.page_size = engine_cfg.page_size
        self.num_pages = num_pages
        self.groups = engine_cfg.data_groups  # data-parallel attention's data groups (1: none)
        self.group_pages = num_pages // self.groups
        self.pages_per_seq = -(-max_model_len // self.page_size)
        seqs, tokens = engine_cfg.group_max_num_seqs, engine_cfg.group_max_num_batched_tokens
        self.decode_buckets = [0] + [self.groups * b for b in power_of_two_buckets(
            min(engine_cfg.min_decode_bucket, seqs), seqs)]
        self.prefill_slots = engine_cfg.group_max_num_prefill_seqs  # per data group
        spec = engine_cfg.speculative_config
        self.spec_k = spec.num_speculative_tokens if spec is not None else 0
        # With speculation the smallest prefill bucket holds one verified chunk (k + 1 rows, rounded up to a
        # power of two), so a lone speculated sequence does not pay for a prompt-sized bucket.
        lo = engine_cfg.min_prefill_bucket if not self.spec_k else min(
            engine_cfg.min_prefill_bucket, 1 << self.spec_k.bit_length())
        self.prefill_buckets = [0] + [self.groups * b for b in power_of_two_buckets(min(lo, tokens), tokens)]
        self._executables: dict[tuple[int, int], Any] = {}
        # While buckets are compiled in the background (serve): a step whose bucket is not compiled yet runs
        # in the smallest compiled bucket that holds it instead of waiting for a compile (counted here).
        self.use_compiled_cover = False
        self.cover_steps = 0
        self.last_bucket: tuple[int, int] | None = None  # the bucket the last step ran in (bench/roofline.py)
        self.compile_count = 0  # programs obtained (compiled or loaded from the compile cache)
        self.cache_hits = 0  # ... of which loaded from the persistent compile cache
        self.compile_seconds = 0.0
        # host packing vs device step (+sync); the steps of a bucket with prefill rows (prompt chunks, and
        # with speculative decoding the verified drafts) on their own
        self.stats = {"steps": 0, "prepare_s": 0.0, "device_s": 0.0, "prefill_steps": 0, "prefill_device_s": 0.0}
        self._jitted = jax.jit(self._step, static_argnames=("num_decode_rows",),
                               donate_argnames=("cache", "penalty_state"))
        # Penalty rows (sampling.PenaltyState): one per penalized request in flight; a request gets its row
        # when it is first scheduled (written then from the host) and keeps it until it finishes or is
        # preempted (rows of finished / preempted requests are reclaimed when none is free).
        self.vocab_size = model_cfg.vocab_size
        self.penalty_rows = engine_cfg.max_num_seqs
        if _abstract(cache):  # compile-only (jaxserve plan): shapes on the target
            where = sharding.replicated(mesh) if mesh is not None else jax.tree_util.tree_leaves(cache)[0].sharding
            self.penalty_state = jax.tree_util.tree_map(
                lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=where),
                jax.eval_shape(lambda: allocate_penalty_state(self.penalty_rows, self.vocab_size)))
        else:
            self.penalty_state = allocate_penalty_state(self.penalty_rows, self.vocab_size)
            if mesh is not None:
                self.penalty_state = jax.device_put(self.penalty_state, sharding.replicated(mesh))
        self._free_rows = list(range(self.penalty_rows))
        self._row_owner: dict[int, Any] = {}
        self._row_inits: list[tuple] = []
        self.eos_token_ids: set[int] = set(model_cfg.eos_token_ids)  # the engine adds the tokenizer's
        self.grammar = None  # structured.GrammarBackend, set by the engine on the first constrained request
        self.mask_words = -(-self.vocab_size // 32)
        self._plain_masks: dict[int, tuple] = {}  # rows -> device (bitmask, mask_active) of a batch with no constraint
        self.mask_stats = {"steps": 0, "rows": 0, "seconds": 0.0}  # host time filling bitmasks

    @property
    def num_buckets(self) -> int:
        return len(self.decode_buckets) * len(self.prefill_buckets) - 1

    def _step(self, params, cache, inputs: StepInputs, penalty_state: PenaltyState, *, num_decode_rows: int):
        # A bucket whose sampled rows the full LM head runs on a non-AMX path (argmax_head's bits) can take
        # the greedy head: then a step of greedy rows only (inputs.greedy) computes no [rows, vocab] logits.
        greedy = (self.greedy_head and inputs.spec is None
                  and inputs.logits_indices.shape[0] < gemm_cpu.AMX_MIN_ROWS["float32"])
        model = CausalLM(self.model_cfg, self.dtype, self.attention_impl, num_decode_rows, self.mesh,
                         self.platform, self.layer_loop, self.cfg.moe_impl, return_hidden=True,
                         quantization=self.quantization, skip_head=inputs.spec is not None,
                         matmul_impl=self.matmul_impl, sampled_last_layer=True, defer_head=greedy,
                         layer_impl=self.layer_impl,
                         fixed_shape=self.cfg.scheduling == "static")
        logits, cache, hidden = model.apply({"params": params}, inputs.input_ids, inputs.positions, cache,
                                            inputs.meta, inputs.logits_indices, inputs.want_prompt_logprobs)
        spec = None
        if inputs.spec is not None:  # one LM head over the sampled rows and the verified rows (spec_decode.py)
            logits, spec = verify(lambda h: head_logits(self.model_cfg, params, h, self.dtype, self.quantization,
                                                        self.mesh),
                                  hidden, inputs.logits_indices, inputs.spec, inputs.sampling)
        if greedy:  # `logits` is the head's input
            tokens, logprob, top_ids, top_lp = self._greedy_or_sample(params["lm_head"], logits, inputs, penalty_state)
        else:
            tokens, logprob, top_ids, top_lp = self._sample(logits, inputs, penalty_state)
        penalty_state = update_penalty_counts(penalty_state, inputs.penalties, tokens)
        return (cache, tokens, logprob, top_ids, top_lp, penalty_state, self._prompt_logprobs(params, hidden, inputs),
                spec)

    def _greedy_or_sample(self, head: dict, x, inputs: StepInputs, penalty_state: PenaltyState):
        """A greedy step's tokens by ``gemm_cpu.argmax_head`` (the argmax of the logits the full head gives,
        reading the float32 head only for the columns that can win: a third of its cost, on AMX), or the
        full head and ``_sample``."""
        s, v = x.shape[0], self.vocab_size
        # the slots after the last sequence are the bucket's padding (static batching computes them: its
        # batch keeps its shape)
        rows = None if self.cfg.scheduling == "static" else sampled_slots(inputs.meta)

        def greedy():
            tokens, _ = gemm_cpu.argmax_head(x, head["packed_kernel"], head["greedy_hi"], head["greedy_slack"], v,
                                             rows=rows)
            return (tokens, jnp.zeros((s,), jnp.float32), jnp.zeros((s, MAX_LOGPROBS), jnp.int32),
                    jnp.zeros((s, MAX_LOGPROBS), jnp.float32))

        return jax.lax.cond(inputs.greedy, greedy,
                            lambda: self._sample(gemm_cpu.gemm_cpu(x, head["packed_kernel"], v, rows=rows), inputs,
                                                 penalty_state))

    def _prompt_logprobs(self, params, hidden, inputs: StepInputs):
        """Per token row: logprob and rank of the next prompt token, and the top MAX_LOGPROBS, from the
        logits of every row (the LM head over all rows runs only when some row wants them), in blocks of
        PROMPT_LOGPROBS_BLOCK rows so that the temporaries stay [block, vocab], not [rows, vocab]."""
        t = hidden.shape[0]
        block = min(t, PROMPT_LOGPROBS_BLOCK)
        blocks = -(-t // block)

        def rows(h, target):
            lp = jax.nn.log_softmax(head_logits(self.model_cfg, params, h, self.dtype, self.quantization), axis=-1)
            target = jnp.clip(target, 0, lp.shape[-1] - 1)
            tok = jnp.take_along_axis(lp, target[:, None], axis=-1)[:, 0]
            rank = 1 + jnp.sum(lp > tok[:, None], axis=-1).astype(jnp.int32)
            top_lp, top_ids = jax.lax.top_k(lp, MAX_LOGPROBS)
            return tok, rank, top_ids.astype(jnp.int32), top_lp

        def compute():
            pad = blocks * block - t
            h = jnp.pad(hidden, ((0, pad), (0, 0))).reshape(blocks, block, hidden.shape[-1])
            tg = jnp.pad(inputs.prompt_targets, (0, pad)).reshape(blocks, block)
            out = jax.lax.map(lambda x: rows(*x), (h, tg))
            return tuple(o.reshape((blocks * block,) + o.shape[2:])[:t] for o in out)

        def skip():
            return (jnp.zeros((t,), jnp.float32), jnp.zeros((t,), jnp.int32),
                    jnp.zeros((t, MAX_LOGPROBS), jnp.int32), jnp.zeros((t, MAX_LOGPROBS), jnp.float32))

        return jax.lax.cond(inputs.want_prompt_logprobs, compute, skip)

    @staticmethod
    def _sample(logits, inputs: StepInputs, penalty_state: PenaltyState):
        """Penalties and grammar masks (behind one per-step flag), sampling, logprobs (of the raw logits);
        the caller updates the counts.  A step with neither samples the raw logits: the flag's conditional
        returns tokens, not a [rows, vocab] array, which XLA CPU would copy out of the branch that leaves
        them as they are (4 MB a step at 32 rows)."""
        p = inputs.penalties

        def adjusted():
            x = apply_penalties(logits, penalty_state, p, inputs.sampling.step)
            return sample(apply_token_bitmask(x, inputs.bitmask, inputs.mask_active), inputs.sampling)

        tokens = jax.lax.cond(p.any | jnp.any(inputs.mask_active), adjusted, lambda: sample(logits, inputs.sampling))
        logprob, top_ids, top_lp = compute_logprobs(logits, tokens, inputs.want_logprobs)
        return tokens, logprob, top_ids, top_lp

    # -- packing -----------------------------------------------------------------------------

    def spec_rows(self, num_prefill_tokens: int) -> int:
        """Rows a bucket can verify (fixed per bucket): every prefill row, at most every prefill slot's k + 1."""
        return min(num_prefill_tokens, self.groups * self.prefill_slots * (self.spec_k + 1)) if self.spec_k else 0

    def num_slots(self, num_decode: int, num_prefill_tokens: int) -> int:
        """Sequence slots of a bucket (the rows sampled): its decode rows, then its prefill slots (as many
        chunks as a data group's prefill rows can hold, up to ``max_num_prefill_seqs``, per group; none in a
        decode-only bucket)."""
        g = self.groups
        return num_decode + g * min(self.prefill_slots, num_prefill_tokens // g)

    def _empty_inputs(self, num_decode: int, num_prefill_tokens: int) -> dict[str, np.ndarray]:
        t = num_decode + num_prefill_tokens
        g = self.groups
        s = self.num_slots(num_decode, num_prefill_tokens)
        r = self.spec_rows(num_prefill_tokens)
        spec = {} if not r else dict(spec_rows=np.zeros(r, np.int32), spec_slot=np.full(r, -1, np.int32),
                                     spec_offset=np.zeros(r, np.int32), spec_next=np.full(r, -1, np.int32))
        return dict(**spec,
            input_ids=np.zeros(t, np.int32),
            prompt_targets=np.full(t, -1, np.int32),
            positions=np.zeros(t, np.int32),
            slot_mapping=np.full(t, self.group_pages * self.page_size, np.int32),  # out of range: dropped
            query_start_loc=np.zeros((g, s // g + 1), np.int32),  # per data group (flattened when g == 1)
            num_seqs=np.zeros(g, np.int32),
            seq_lens=np.zeros(s, np.int32),
            block_tables=np.zeros((s, self.pages_per_seq), np.int32),
            logits_indices=np.zeros(s, np.int32),
            temperature=np.zeros(s, np.float32),
            top_k=np.zeros(s, np.int32),
            top_p=np.ones(s, np.float32),
            min_p=np.zeros(s, np.float32),
            seed=np.zeros((s, 2), np.uint32),
            step=np.zeros(s, np.int32),
            pen_row=np.zeros(s, np.int32),
            pen_active=np.zeros(s, bool),
            pen_samples=np.zeros(s, bool),
            repetition=np.ones(s, np.float32),
            presence=np.zeros(s, np.float32),
            frequency=np.zeros(s, np.float32),
            min_tokens=np.zeros(s, np.int32),
            ban_slot=np.full(MAX_BAD_WORD_BANS, s, np.int32),
            ban_token=np.zeros(MAX_BAD_WORD_BANS, np.int32),
        )

    # -- penalty rows ---------------------------------------------------------------------------

    def _penalty_row(self, seq, busy: set[int]) -> int:
        """The request's penalty row, assigned (and its initial contents queued) on first use."""
        row = getattr(seq, "penalty_row", None)
        if row is not None:
            return row
        if not self._free_rows:
            from jaxserve.sequence import Status

            for r, owner in list(self._row_owner.items()):
                if owner.status != Status.RUNNING and id(owner) not in busy:
                    owner.penalty_row = None
                    del self._row_owner[r]
                    self._free_rows.append(r)
        if not self._free_rows:
            raise RuntimeError("no free penalty row (more penalized requests running than max_num_seqs)")
        row = self._free_rows.pop()
        self._row_owner[row] = seq
        seq.penalty_row = row
        p, v = seq.params, self.vocab_size
        counts = np.bincount(np.asarray(seq.output_token_ids, np.int64), minlength=v).astype(np.int32)[:v]
        seen = np.zeros(v, bool)
        seen[np.asarray(seq.prompt_token_ids, np.int64)] = True
        bias = np.zeros(v, np.float32)
        for t, b in (p.logit_bias or {}).items():
            bias[t] = b
        for word in getattr(seq, "bad_word_ids", ()):
            if len(word) == 1:
                bias[word[0]] = -np.inf
        stop = np.zeros(v, bool)
        stop_ids = list(p.stop_token_ids) + ([] if p.ignore_eos else list(self.eos_token_ids))
        stop[[t for t in stop_ids if 0 <= t < v]] = True
        self._row_inits.append((np.int32(row), counts, seen, bias, stop))
        return row

    def release_penalty_row(self, seq) -> None:
        row = getattr(seq, "penalty_row", None)
        if row is not None and self._row_owner.get(row) is seq:
            del self._row_owner[row]
            self._free_rows.append(row)
        seq.penalty_row = None

    @staticmethod
    def _bad_word_bans(seq) -> list[int]:
        """Last tokens of the multi-token bad words whose other tokens end the generated text (vLLM)."""
        out = seq.output_token_ids
        bans = []
        for word in getattr(seq, "bad_word_ids", ()):
            k = len(word) - 1
            if k and len(out) >= k and out[len(out) - k:] == word[:k]:
                bans.append(word[-1])
        return bans

    def prepare(self, out: SchedulerOutput) -> HostStep:
        g_n = self.groups
        dec = [[s for s in out.decodes if s.seq.data_group == g] for g in range(g_n)]
        pre = [[s for s in out.prefills if s.seq.data_group == g] for g in range(g_n)]
        n_dec = g_n * max(max(map(len, dec)), min(out.min_decode_slots, self.cfg.group_max_num_seqs))
        d = pick_bucket(n_dec, self.decode_buckets) if n_dec else 0
        n_pre_tokens = g_n * max(sum(s.num_tokens for s in p) for p in pre)
        tp = pick_bucket(n_pre_tokens, self.prefill_buckets) if n_pre_tokens else 0
        if self.use_compiled_cover and (d, tp) not in self._executables:
            d, tp = self._compiled_cover(n_dec, n_pre_tokens) or (d, tp)
        a = self._empty_inputs(d, tp)
        ps = self.page_size
        d_l = d // g_n  # a data group's decode slots, rows per group, slots per group
        rows_g, slots_g = (d + tp) // g_n, len(a["seq_lens"]) // g_n
        a["query_start_loc"][:, 1:d_l + 1] = np.arange(1, d_l + 1)
        want_logprobs = False
        any_penalty = False
        busy = {id(sch.seq) for sch in out.decodes} | {id(sch.seq) for sch in out.prefills}
        constrained: list[tuple[int, Any]] = []  # (slot, matcher) of rows sampling under a grammar
        prompt_rows: list = []
        spec_first: dict = {}
        patch: list = []
        num_spec = 0
        num_bans = 0
        # In group g's block: decode i is sequence slot i at row i, prefill j is slot d_l + j, its rows
        # after the decodes (one block, g = 0, without data groups).
        placed = {}
        for g in range(g_n):
            placed.update({id(sch): (g * slots_g + i, g * rows_g + i, g) for i, sch in enumerate(dec[g])})
            row = g * rows_g + d_l
            for j, sch in enumerate(pre[g]):
                placed[id(sch)] = (g * slots_g + d_l + j, row, g)
                row += sch.num_tokens
        slots = [placed[id(sch)] + (sch,) for sch in out.decodes + out.prefills]
        # Per sequence, what its rows and its slot need (_write_rows writes them all at once).
        recs: list[tuple] = []
        ids_all: list[int] = []
        page_ids: list[int] = []
        for i, row, g, sch in slots:
            seq, n = sch.seq, sch.num_tokens
            start = seq.num_computed_tokens
            ids = seq.token_ids(start, start + n - len(sch.draft))
            if len(ids) < n - len(sch.draft):  # its last token is being sampled by the step in flight
                patch.append((row + len(ids), seq))
                ids = ids + [0]
            ids_all += ids
            ids_all += sch.draft
            page_ids += seq.page_ids
            p = seq.params
            recs.append((i, row, n, start, g, len(seq.page_ids), len(seq.output_token_ids) + seq.num_pending,
                         p.top_k, seq.seed & 0xFFFFFFFF, seq.seed >> 32, p.temperature, p.top_p, p.min_p))
            if sch.draft:  # verified rows: this slot's last token and its proposals
                spec_first[i] = num_spec
                a["spec_rows"][num_spec:num_spec + n] = np.arange(row, row + n)
                a["spec_slot"][num_spec:num_spec + n] = i
                a["spec_offset"][num_spec:num_spec + n] = np.arange(n)
                a["spec_next"][num_spec:num_spec + n - 1] = sch.draft
                num_spec += n
            if i - g * slots_g >= d_l:
                a["query_start_loc"][g, i - g * slots_g + 1] = row - g * rows_g + n
            want_logprobs |= p.logprobs is not None
            if p.prompt_logprobs is not None:
                count = min(start + n, len(seq.prompt_token_ids) - 1) - start  # rows whose next token is prompt
                if count > 0:
                    a["prompt_targets"][row:row + count] = seq.prompt_token_ids[start + 1:start + 1 + count]
                    prompt_rows.append((seq, start + 1, row, count))
            matcher = getattr(seq, "matcher", None)
            if matcher is not None and sch.samples and not matcher.is_terminated():
                constrained.append((i, matcher))
            if p.penalized:
                any_penalty = True
                a["pen_row"][i] = self._penalty_row(seq, busy)
                a["pen_active"][i] = True
                a["pen_samples"][i] = sch.samples
                a["repetition"][i] = p.repetition_penalty
                a["presence"][i] = p.presence_penalty
                a["frequency"][i] = p.frequency_penalty
                a["min_tokens"][i] = p.min_tokens
                if sch.samples and getattr(seq, "bad_word_ids", None):
                    bans = self._bad_word_bans(seq)
                    if num_bans + len(bans) > MAX_BAD_WORD_BANS:
                        raise RuntimeError(f"bad_words: more than {MAX_BAD_WORD_BANS} bad-word bans in one step")
                    a["ban_slot"][num_bans:num_bans + len(bans)] = i
                    a["ban_token"][num_bans:num_bans + len(bans)] = bans
                    num_bans += len(bans)
        if slots:
            self._write_rows(a, recs, ids_all, page_ids)
        # Prefill slots after the last real one end where the last one ended.
        for g in range(g_n):
            n_pre = len(pre[g])
            a["query_start_loc"][g, d_l + n_pre + 1:] = a["query_start_loc"][g, d_l + n_pre]
            a["num_seqs"][g] = d_l + n_pre
        a["any_penalty"] = np.bool_(any_penalty)
        a["greedy"] = np.bool_(not (want_logprobs or any_penalty or constrained) and all(
            sch.seq.params.greedy for sch in out.decodes + out.prefills))
        a["want_prompt"] = np.bool_(bool(prompt_rows))
        a["spec_any"] = np.bool_(num_spec > 0)
        if constrained:
            t0 = time.perf_counter()
            s = len(a["seq_lens"])
            a["bitmask"] = np.full((s, self.mask_words), -1, np.int32)
            a["mask_active"] = np.zeros(s, bool)
            slots_c = [i for i, _ in constrained]
            self.grammar.fill([m for _, m in constrained], a["bitmask"], slots_c)
            a["mask_active"][slots_c] = True
            self.mask_stats["steps"] += 1
            self.mask_stats["rows"] += len(constrained)
            self.mask_stats["seconds"] += time.perf_counter() - t0
        return HostStep((d, tp), a, want_logprobs, [i for i, _, _, _ in slots], prompt_rows, spec_first, patch)

    def _write_rows(self, a: dict[str, np.ndarray], recs: list[tuple], ids: list[int], pages: list[int]) -> None:
        """``prepare``'s per-sequence records (slot, first row, rows, first position, data group, pages,
        tokens generated, top_k, seed low and high halves, temperature, top_p, min_p) and the concatenated
        token ids and page ids of its sequences into the step's arrays, vectorized over the step."""
        ints = np.array([r[:10] for r in recs], np.int64)
        slot, row, n, start, group, npages = ints[:, :6].T
        off = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)  # a row's index within its sequence
        rows, pos = np.repeat(row, n) + off, np.repeat(start, n) + off
        a["input_ids"][rows] = ids
        a["positions"][rows] = pos
        local = np.asarray(pages, np.int64) - np.repeat(group * self.group_pages, npages)  # the group's shard's ids
        a["block_tables"][np.repeat(slot, npages), np.arange(len(pages)) - np.repeat(np.cumsum(npages) - npages,
                                                                                       npages)] = local
        ps = self.page_size
        a["slot_mapping"][rows] = a["block_tables"][np.repeat(slot, n), pos // ps] * ps + pos % ps
        a["seq_lens"][slot] = start + n
        a["logits_indices"][slot] = row + n - 1
        a["step"][slot] = ints[:, 6]
        a["top_k"][slot] = ints[:, 7]
        a["seed"][slot] = ints[:, 8:10]
        floats = np.array([r[10:] for r in recs], np.float64)
        a["temperature"][slot], a["top_p"][slot], a["min_p"][slot] = floats.T

    def _no_mask(self, rows: int) -> tuple:
        """The bitmask inputs of a batch without constraints: kept on the device once per bucket size
        (nothing is written or sent per step); numpy under a mesh (the executable places them)."""
        masks = self._plain_masks.get(rows)
        if masks is None:
            masks = (np.zeros((rows, self.mask_words), np.int32), np.zeros(rows, bool))
            if self.mesh is None and not _abstract(self.cache):
                masks = tuple(jax.device_put(x) for x in masks)
            self._plain_masks[rows] = masks
        return masks

    def _meta(self, a: dict[str, np.ndarray]) -> AttentionMetadata:
        """The attention metadata: flat, or with data groups a leading group axis on each per-sequence array."""
        g = self.groups
        if g == 1:
            return AttentionMetadata(slot_mapping=a["slot_mapping"], query_start_loc=a["query_start_loc"][0],
                                     seq_lens=a["seq_lens"], block_tables=a["block_tables"], num_seqs=a["num_seqs"][0])
        return AttentionMetadata(slot_mapping=a["slot_mapping"], query_start_loc=a["query_start_loc"],
                                 seq_lens=a["seq_lens"].reshape(g, -1),
                                 block_tables=a["block_tables"].reshape(g, -1, self.pages_per_seq),
                                 num_seqs=a["num_seqs"])

    def _to_inputs(self, a: dict[str, np.ndarray], want_logprobs: bool) -> StepInputs:
        return StepInputs(
            input_ids=a["input_ids"], positions=a["positions"],
            meta=self._meta(a),
            logits_indices=a["logits_indices"],
            sampling=SamplingArrays(temperature=a["temperature"], top_k=a["top_k"], top_p=a["top_p"],
                                    min_p=a["min_p"], seed=a["seed"], step=a["step"]),
            want_logprobs=np.bool_(want_logprobs),
            penalties=PenaltyArrays(row=a["pen_row"], active=a["pen_active"], samples=a["pen_samples"],
                                    repetition=a["repetition"], presence=a["presence"], frequency=a["frequency"],
                                    min_tokens=a["min_tokens"], ban_slot=a["ban_slot"], ban_token=a["ban_token"],
                                    any=a.get("any_penalty", np.bool_(False))),
            bitmask=a["bitmask"] if "bitmask" in a else self._no_mask(len(a["seq_lens"]))[0],
            mask_active=a["mask_active"] if "mask_active" in a else self._no_mask(len(a["seq_lens"]))[1],
            prompt_targets=a["prompt_targets"], want_prompt_logprobs=np.bool_(a.get("want_prompt", False)),
            greedy=np.bool_(a.get("greedy", False)),
            spec=None if "spec_rows" not in a else SpecInputs(
                rows=a["spec_rows"], slot=a["spec_slot"], offset=a["spec_offset"], next_token=a["spec_next"],
                any=a.get("spec_any", np.bool_(False))))

    # -- compiling and running -----------------------------------------------------------------

    def _input_shardings(self, inputs: StepInputs) -> StepInputs:
        """Token ids and positions split on ``data`` (if their count divides), the rest replicated; with
        data groups, the attention metadata split on ``data`` too (each group its own)."""
        mesh = self.mesh
        rows = sharding.rows_sharding(mesh, inputs.input_ids.shape[0])
        shardings = jax.tree_util.tree_map(lambda _: sharding.replicated(mesh), inputs)
        if self.groups > 1:
            shardings.meta = jax.tree_util.tree_map(lambda _: rows, inputs.meta)
        return dataclasses.replace(shardings, input_ids=rows, positions=rows)

    def _sharded_jit(self, inputs: StepInputs, num_decode_rows: int):
        """The step of one bucket, jitted with the shardings of its arguments and results."""
        mesh = self.mesh
        params_s = jax.tree_util.tree_map(lambda x: x.sharding, self.params)
        cache_s = jax.tree_util.tree_map(lambda x: x.sharding, self.cache)
        rep = sharding.replicated(mesh)
        return jax.jit(functools.partial(self._step, num_decode_rows=num_decode_rows), donate_argnums=(1, 3),
                       in_shardings=(params_s, cache_s, self._input_shardings(inputs), rep),
                       out_shardings=(cache_s, rep, rep, rep, rep, rep, rep, rep))

    def _place_inputs(self, inputs: StepInputs) -> StepInputs:
        """Host inputs as they go to the step.  One process: the numpy arrays themselves (the
        executable shards them).  Several processes (``jax.distributed``): global arrays, each
        process supplying its devices' shards from its identical host copy."""
        if not self._multi_process:
            return inputs
        return jax.tree_util.tree_map(sharding.global_array, inputs, self._input_shardings(inputs))

    def _executable(self, key: tuple[int, int], inputs: StepInputs):
        exe = self._executables.get(key)
        if exe is None:
            t0 = time.perf_counter()
            exe, seconds, hit = _compile_timed(self._lower(key, inputs))
            exe = self._record(key, exe, time.perf_counter() - t0 - seconds, seconds, hit)
        return exe

    def _lower(self, key: tuple[int, int], inputs: StepInputs):
        if self.mesh is None:
            return self._jitted.lower(self.params, self.cache, inputs, self.penalty_state, num_decode_rows=key[0])
        # Several processes: numpy inputs split on "data" are refused, global arrays are not.
        return self._sharded_jit(inputs, key[0]).lower(self.params, self.cache, self._place_inputs(inputs),
                                                       self.penalty_state)

    def _record(self, key: tuple[int, int], exe: Any, lower_s: float, compile_s: float, hit: bool):
        """Keep one bucket's compiled step (the first one, if two threads got it) and count it."""
        kept = self._executables.setdefault(key, exe)
        if kept is not exe:
            return kept
        dt = lower_s + compile_s
        self.compile_count += 1
        self.compile_seconds += dt
        if hit:
            self.cache_hits += 1
        logger.info("%s step for bucket (decode=%d, prefill_tokens=%d) in %.2fs [%d/%d]",
                    "loaded (compile cache)" if hit else "compiled", key[0], key[1], dt, self.compile_count,
                    self.num_buckets)
        return exe

    def execute(self, out: SchedulerOutput) -> StepResult:
        """Prepare, run and collect one step."""
        return self.collect(self.launch(self.prepare_step(out)))

    def prepare_step(self, out: SchedulerOutput) -> PreparedStep:
        """A step's inputs on the host and its compiled program, ready to ``launch``.  Under async
        scheduling (``Engine.step``) this runs while the step before it is still running: a decode whose
        input token that step is sampling gets it at ``launch`` (``patch``)."""
        t0 = time.perf_counter()
        host = self.prepare(out)
        self.last_bucket = host.key
        inputs = self._to_inputs(host.arrays, host.want_logprobs)
        exe = self._executable(host.key, inputs)
        prep = PreparedStep(host, inputs, exe)
        self.stats["prepare_s"] += time.perf_counter() - t0
        return prep

    def launch(self, prep: PreparedStep, token_of: Any = None) -> PreparedStep:
        """Dispatch a prepared step (it runs while the host goes on); ``token_of(seq)``: the input token of
        each decode in ``prep.host.patch``, sampled by the step before (async scheduling)."""
        for row, seq in prep.host.patch:
            prep.inputs.input_ids[row] = token_of(seq)
        prep.t_launch = time.perf_counter()
        self.stats["steps"] += 1
        self.stats["prefill_steps"] += bool(prep.host.key[1])
        for init in self._row_inits:  # rows of requests penalized for the first time
            self.penalty_state = init_penalty_row(self.penalty_state, *init)
        self._row_inits = []
        self.cache, *prep.outputs, self.penalty_state, prompt, spec = prep.exe(
            self.params, self.cache, self._place_inputs(prep.inputs), self.penalty_state)
        prep.outputs += [prompt, spec]
        return prep

    def collect(self, prep: PreparedStep) -> StepResult:
        """Wait for a launched step's results and bring them to the host."""
        tokens, logprob, top_ids, top_lp, prompt, spec = prep.outputs
        host = prep.host
        to_host = _local_copy if self._multi_process else np.asarray
        tokens = to_host(tokens)
        spec_tokens, spec_accept = (to_host(spec[0]), to_host(spec[1])) if host.spec_first else (None, None)
        if host.want_logprobs:
            logprob, top_ids, top_lp = (to_host(x) for x in (logprob, top_ids, top_lp))
        else:
            logprob = top_ids = top_lp = None
        prompt = tuple(to_host(x) for x in prompt) if host.prompt_rows else None
        dt = time.perf_counter() - prep.t_launch  # (a step dropped uncollected, Engine.step, adds none)
        self.stats["device_s"] += dt
        if host.key[1]:
            self.stats["prefill_device_s"] += dt
        return StepResult(tokens, logprob, top_ids, top_lp, host, prompt, spec_tokens, spec_accept)

    @property
    def programs_compiled(self) -> int:
        """Step programs compiled by XLA (not loaded from the persistent compile cache)."""
        return self.compile_count - self.cache_hits

    def compile_summary(self) -> str:
        return (f"{self.cache_hits} programs loaded from the compile cache, {self.programs_compiled} compiled "
                f"({self.compile_seconds:.1f}s)")

    @property
    def buckets(self) -> list[tuple[int, int]]:
        """Every (decode rows, prefill tokens) bucket, in compile order."""
        return [(d, t) for d in self.decode_buckets for t in self.prefill_buckets if d or t]

    def serving_buckets(self) -> list[tuple[int, int]]:
        """The buckets that hold every step between them, cheaply where it matters: every decode-only
        bucket (most steps of a serving load), the largest prefill-only bucket and the largest bucket.
        ``serve`` compiles these before it reports ready and the rest in the background."""
        d_max, t_max = self.decode_buckets[-1], self.prefill_buckets[-1]
        keys = [(d, 0) for d in self.decode_buckets if d] + [(0, t_max), (d_max, t_max)]
        return [k for i, k in enumerate(keys) if k not in keys[:i] and k != (0, 0)]

    def _compiled_cover(self, n_decode: int, n_prefill_tokens: int) -> tuple[int, int] | None:
        """The compiled bucket with the fewest rows that holds ``n_decode`` decode rows and
        ``n_prefill_tokens`` prefill tokens (with decode and prefill rows where the exact bucket has
        them), or None."""
        fits = [(kd + kt, (kd, kt)) for kd, kt in list(self._executables)
                if kd >= n_decode and kt >= n_prefill_tokens and (kd > 0) == (n_decode > 0)
                and (kt > 0) == (n_prefill_tokens > 0)]
        if not fits:
            return None
        self.cover_steps += 1
        return min(fits)[1]

    def compile_bucket(self, key: tuple[int, int]):
        """The compiled step of one bucket (compiled now unless it already is)."""
        return self._executable(key, self._bucket_inputs(key))

    def _bucket_inputs(self, key: tuple[int, int]) -> StepInputs:
        """Empty inputs of one bucket's shapes: what its step is lowered with ahead of time."""
        return self._to_inputs(self._empty_inputs(*key), False)

    def warmup(self, buckets: list[tuple[int, int]] | None = None, progress: bool = False,
               on_bucket: Any = None) -> float:
        """Compile (or load from the compile cache) the step for every bucket (or the given ones);
        returns the seconds spent.  ``progress``: a tqdm bar on stderr; ``on_bucket(done, total)``
        is called after each bucket."""
        from tqdm.auto import tqdm

        t0 = time.perf_counter()
        keys = list(buckets or self.buckets)
        # Lowering (tracing) holds the GIL; XLA's compile (or the cache load) does not.  So the next bucket
        # is lowered here while earlier ones compile on a worker thread each: about one program per core.
        workers = max(1, min(len(keys), os.cpu_count() or 1))
        with tqdm(total=len(keys), desc="warm-up", unit="program", disable=not progress, leave=False) as bar, \
                concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="jaxserve-warmup") as pool:
            pending: list[tuple[tuple[int, int], float, concurrent.futures.Future | None]] = []
            done = 0

            def collect(n_left: int) -> None:
                nonlocal done
                while len(pending) > n_left:
                    key, lower_s, fut = pending.pop(0)
                    if fut is not None:  # None: the bucket was compiled already
                        exe, compile_s, hit = fut.result()
                        self._record(key, exe, lower_s, compile_s, hit)
                    done += 1
                    bar.set_postfix_str(f"bucket {key[0]}x{key[1]}, {self.cache_hits} cached", refresh=False)
                    bar.update(1)
                    if on_bucket is not None:
                        on_bucket(done, len(keys))

            for key in keys:
                t1 = time.perf_counter()
                lowered = None if key in self._executables else self._lower(key, self._bucket_inputs(key))
                fut = pool.submit(_compile_timed, lowered) if lowered is not None else None
                pending.append((key, time.perf_counter() - t1, fut))
                collect(workers)  # at most one lowered program waiting per worker
            collect(0)
        return time.perf_counter() - t0


def _compile_timed(lowered) -> tuple[Any, float, bool]:
    """(the compiled program, seconds, whether it came from the persistent compile cache), counted on the
    thread that compiles."""
    hits = compile_cache.thread_cache_hits()
    t0 = time.perf_counter()
    exe = lowered.compile()
    return exe, time.perf_counter() - t0, compile_cache.thread_cache_hits() > hits


def _abstract(cache: Any) -> bool:
    """Whether the cache (one array or the int8 pair) is ``ShapeDtypeStruct``s (compile-only)."""
    return isinstance(jax.tree_util.tree_leaves(cache)[0], jax.ShapeDtypeStruct)


def kv_cache_dtype(cache: Any, dtype: Any) -> np.dtype:
    """The value dtype of the cache: int8 (the pair), fp8 (uint8 bits on CPU), else the model's."""
    kv, scales = kv_cache.split_cache(cache)
    if scales is not None:
        return np.dtype(np.int8)
    if np.dtype(kv.dtype) in (np.dtype(np.uint8), np.dtype(jnp.float8_e4m3fn)):
        return np.dtype(jnp.float8_e4m3fn)
    return np.dtype(dtype)


def resolve_attention(impl: str, platform: str, cfg: ModelConfig, page_size: int, dtype: Any,
                      kv_dtype: Any = None) -> str:
    """The attention implementation the steps use: ``impl`` resolved for ``platform``, or the
    reference, with one warning naming the shape, when the platform's kernel does not serve it
    (``kv_dtype``: an 8-bit cache's value dtype, when not ``dtype``; on CPU also: the C++ kernel's
    extension is not built)."""
    kernel, _ = resolve_impl(impl, platform)
    if kernel == "reference":
        return "reference"
    reason = unsupported_reason(kernel, head_dim=cfg.head_dim, num_q_heads=cfg.num_heads,
                                num_kv_heads=cfg.num_kv_heads, page_size=page_size, dtype=dtype,
                                kv_dtype=kv_dtype)
    if reason is not None:
        logger.warning("attention: the %s kernel does not serve head_dim=%d, %d query / %d KV heads, "
                       "page_size=%d, %s (%s); using the reference attention", kernel.upper(), cfg.head_dim,
                       cfg.num_heads, cfg.num_kv_heads, page_size, np.dtype(dtype).name, reason)
        return "reference"
    return "cpu" if kernel == "cpu" else "pallas_" + kernel


def _local_copy(x: jax.Array) -> np.ndarray:
    """A replicated step output as numpy under several processes: this process's own copy."""
    return np.asarray(x.addressable_data(0))


__all__ = ["ModelRunner", "StepResult", "power_of_two_buckets", "pick_bucket", "MAX_LOGPROBS"]
