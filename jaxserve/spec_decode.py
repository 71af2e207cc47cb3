"""Speculative decoding: a proposer guesses up to ``k`` tokens, the target verifies them in one step.

A running sequence with one token left to compute (a decode) and ``m <= k`` proposed tokens is
scheduled as a chunk of ``1 + m`` rows: its last token, then the proposals.  In shape that is a
short prefill chunk, so it rides in the prefill part of the ragged step (the proposals count in
the token budget and in ``max_num_prefill_seqs``) and the bucket set does not change: no new step
program.  The step computes the target's logits for the chunk's rows (``SpecInputs.rows``, a fixed
number per bucket) and decides on device, per row, whether the proposal that follows the row is
accepted, and which token to emit if the chain stops there:

* greedy rows: accept iff the proposal is the argmax; emit the argmax;
* temperature > 0: the standard rule (Leviathan et al. 2023, Chen et al. 2023) with the proposer's
  distribution q a point mass on the proposal (n-gram lookup): accept with probability
  min(1, p(d)/q(d)) = p(d), else sample from the normalized residual max(0, p - q), which is p with
  the proposal's mass removed.  p is the distribution ``sampling.sample`` draws from (temperature,
  top-k, top-p, min-p), so the output distribution equals the non-speculative one.

The host keeps the leading accepted proposals plus the emitted token of the first rejecting row
(or of the last row: the bonus token), sets ``num_computed_tokens`` past the accepted rows (the
rejected rows' K/V are simply overwritten later) and returns the pages past the accepted end.

Proposers: ``ngram`` (prompt lookup on the host: the last n tokens, n from ``prompt_lookup_max``
down to ``prompt_lookup_min``, matched against the sequence's own earlier tokens; the tokens after
the latest match are proposed) and ``draft`` (a small model of the same vocabulary, run greedily by
an inner engine with its own paged cache and bucketed steps; see ``DraftProposer``).  A request opts out with ``SamplingParams(speculative=False)``;
requests with penalties, logprobs or structured outputs are not speculated.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.sampling import SamplingArrays, _row_key, argmax_rows, keep_sorted

METHODS = ("ngram", "draft")
UNIFORM_SALT = 0x5BD1E995  # folded into a row's key for its acceptance draw (the Gumbel noise uses the key)


@dataclasses.dataclass
class SpeculativeConfig:
    """``EngineConfig.speculative_config`` (vLLM's names)."""

    method: str = "ngram"
    num_speculative_tokens: int = 3
    model: str | None = None  # method "draft": the draft model (anything Engine.from_pretrained loads)
    prompt_lookup_max: int = 4
    prompt_lookup_min: int = 1
    # Per sequence: stop proposing when, after at least ``min_acceptance_window`` proposed tokens,
    # fewer than this fraction were accepted (0: never stop).
    min_acceptance_rate: float = 0.1
    min_acceptance_window: int = 24
    # vLLM's speculative_disable_by_batch_size: no proposals in a step while at least this many requests
    # run (a verification step costs more than a decode step, and a large batch already fills the matmuls).
    disable_by_batch_size: int | None = None

    def off_for_batch(self, num_running: int) -> bool:
        return self.disable_by_batch_size is not None and num_running >= self.disable_by_batch_size

    @classmethod
    def from_value(cls, value: Any) -> "SpeculativeConfig | None":
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"speculative_config: expected a dict, got {type(value).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - names)
        if unknown:
            raise ValueError(f"speculative_config: unknown key {unknown[0]!r} (known: {', '.join(sorted(names))})")
        cfg = cls(**value)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"speculative_config.method: must be one of {', '.join(METHODS)}, got {self.method!r}")
        for name in ("num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min", "min_acceptance_window"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"speculative_config.{name}: must be a positive integer, got {v!r}")
        if self.method == "draft" and not (isinstance(self.model, str) and self.model):
            raise ValueError("speculative_config.model: method 'draft' needs the draft model's path or id")
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError(f"speculative_config.prompt_lookup_min: {self.prompt_lookup_min} exceeds "
                             f"prompt_lookup_max ({self.prompt_lookup_max})")
        v = self.disable_by_batch_size
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise ValueError(f"speculative_config.disable_by_batch_size: must be a positive integer or None, got {v!r}")
        if not isinstance(self.min_acceptance_rate, (int, float)) or not 0 <= self.min_acceptance_rate <= 1:
            raise ValueError(f"speculative_config.min_acceptance_rate: must be in [0, 1], "
                             f"got {self.min_acceptance_rate!r}")


def ngram_propose(tokens: np.ndarray, k: int, n_min: int, n_max: int) -> list[int]:
    """Prompt lookup: for n from ``n_max`` down to ``n_min``, find the latest earlier occurrence of
    the last n tokens and return (up to) the k tokens that followed it; [] when nothing matches."""
    size = len(tokens)
    for n in range(min(n_max, size - 1), n_min - 1, -1):
        suffix = tokens[size - n:]
        windows = np.lib.stride_tricks.sliding_window_view(tokens[:size - 1], n)  # starts 0..size-1-n
        hits = np.flatnonzero((windows == suffix).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            return tokens[start:start + k].tolist()
    return []


class NgramProposer:
    def __init__(self, cfg: SpeculativeConfig):
        self.cfg = cfg

    def propose(self, seq, k: int) -> list[int]:
        """Up to k tokens to verify after ``seq``'s last token ([] if it is not speculated)."""
        if not eligible(seq):
            return []
        tokens = np.asarray(seq.all_token_ids, np.int64)
        return ngram_propose(tokens, k, self.cfg.prompt_lookup_min, self.cfg.prompt_lookup_max)


class DraftProposer:
    """A small model of the same tokenizer proposes k tokens greedily (so its distribution q is a point
    mass, as the n-gram proposer's, and the verification rule is the same).  It runs on an inner
    ``Engine`` of its own (its own ModelRunner, bucket set and paged KV cache of as many pages as the
    target's): before each target step, ``prepare`` brings every decoding sequence's draft cache up to
    the sequence's tokens (the first time its whole prompt, in chunks; afterwards the one or few tokens
    the target accepted, from the first one the draft had wrong) and then runs k - 1 batched decode
    steps.  A draft sequence's computed tokens are rolled back like the target's: its cache past the
    common prefix is overwritten later."""

    def __init__(self, cfg: SpeculativeConfig, target):
        from jaxserve.engine import Engine, load_model

        model_config, params, _ = load_model(cfg.model, target.config.dtype)
        vocab = target.model_config.vocab_size
        if model_config.vocab_size != vocab:
            raise ValueError(f"speculative_config.model: the draft model's vocabulary ({model_config.vocab_size} "
                             f"tokens) differs from the target's ({vocab}); the draft must share the tokenizer")
        config = dataclasses.replace(target.config, speculative_config=None, max_model_len=target.max_model_len,
                                     num_pages=target.num_pages, kv_cache_bytes=None, memory_utilization=None)
        self.engine = Engine(model_config, params, None, config)
        self.cfg = cfg
        self._state: dict[str, Any] = {}  # request id -> its draft Sequence
        self._drafts: dict[str, list[int]] = {}  # request id -> this step's proposals
        self.draft_steps = 0

    def propose(self, seq, k: int) -> list[int]:
        return self._drafts.get(seq.request_id, [])[:k]

    def _drop(self, rid: str) -> None:
        d = self._state.pop(rid)
        self.engine.allocator.release(d.page_ids)

    def release(self, seq) -> None:
        """The request finished or was preempted: free its draft pages."""
        if seq.request_id in self._state:
            self._drop(seq.request_id)

    def _sync(self, seq):
        """The request's draft sequence with the request's tokens, its computed tokens rolled back to the
        prefix it shares with them (at least the last token is left to compute)."""
        from jaxserve.sampling import SamplingParams
        from jaxserve.sequence import Sequence

        new = seq.all_token_ids
        d = self._state.get(seq.request_id)
        if d is None:
            d = Sequence(seq.request_id, new, SamplingParams(temperature=0, max_tokens=1), 0)
            d.base = 0
            self._state[seq.request_id] = d
        else:
            old, c = d.all_token_ids, d.num_computed_tokens
            m = d.base  # tokens before the previous sync's end are the request's own: equal
            while m < min(c, len(new)) and old[m] == new[m]:
                m += 1
            d.prompt_token_ids, d.output_token_ids = new, []
            d.num_computed_tokens = min(m, len(new) - 1)
        d.base = len(new)
        return d

    def prepare(self, running: list, num_speculative_tokens: int) -> None:
        """Proposals of up to ``num_speculative_tokens`` for every running sequence that decodes next."""
        from jaxserve.scheduler import ScheduledSeq, SchedulerOutput

        live = {s.request_id for s in running}
        for rid in [r for r in self._state if r not in live]:
            self._drop(rid)
        self._drafts = {}
        if self.cfg.off_for_batch(len(running)):
            return
        want = {}
        for s in running:
            k = min(num_speculative_tokens, s.params.max_tokens - len(s.output_token_ids) - 1)
            if k >= 1 and s.num_tokens - s.num_computed_tokens == 1 and eligible(s):
                want[s.request_id] = (self._sync(s), k)
        ecfg, alloc, runner = self.engine.config, self.engine.allocator, self.engine.runner
        pending = [d for d, _ in want.values()]
        while pending:  # catch up: every draft sequence computes its tokens, the last chunk samples d_1
            budget, decodes, prefills, later = ecfg.max_num_batched_tokens, [], [], []
            for d in pending:
                rem = d.num_tokens - d.num_computed_tokens
                n = min(rem, budget)
                group = decodes if rem == 1 else prefills
                if n < 1 or (group is prefills and len(prefills) >= runner.prefill_slots):
                    later.append(d)
                elif not alloc.grow(d.page_ids, d.num_computed_tokens + n):
                    self._drop(d.request_id)
                    del want[d.request_id]
                else:
                    group.append(ScheduledSeq(d, n))
                    budget -= n
            if not decodes and not prefills:
                break
            later += self._run(SchedulerOutput(decodes, prefills))
            pending = later
        for _ in range(num_speculative_tokens - 1):  # k - 1 decode steps of the draft
            decodes = []
            for rid, (d, k) in want.items():
                if rid in self._drafts and len(self._drafts[rid]) < k:
                    if alloc.grow(d.page_ids, d.num_tokens):
                        decodes.append(ScheduledSeq(d, 1))
            if not decodes:
                break
            self._run(SchedulerOutput(decodes, []))

    def _run(self, out) -> list:
        """One draft step; appends each sampled token to its draft sequence and proposals; returns the
        sequences whose chunk did not reach their end (still catching up)."""
        result = self.engine.runner.execute(out)
        self.draft_steps += 1
        entries = [(i, sch) for i, sch in enumerate(out.decodes)]
        entries += [(result.host.decode_slots + j, sch) for j, sch in enumerate(out.prefills)]
        unfinished = []
        for slot, sch in entries:
            d, samples = sch.seq, sch.samples
            d.num_computed_tokens += sch.num_tokens
            if samples:
                token = int(result.tokens[slot])
                d.output_token_ids.append(token)
                self._drafts.setdefault(d.request_id, []).append(token)
            else:
                unfinished.append(d)
        return unfinished


def make_proposer(cfg: SpeculativeConfig, target):
    return DraftProposer(cfg, target) if cfg.method == "draft" else NgramProposer(cfg)


def eligible(seq) -> bool:
    """Whether a request may be speculated: it did not opt out, and nothing per-token (penalty
    counts, logprobs, a grammar) depends on the tokens being sampled one step at a time."""
    p = seq.params
    return (p.speculative and not p.penalized and p.logprobs is None and seq.matcher is None
            and not getattr(seq, "spec_disabled", False))


# -- on device --------------------------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SpecInputs:
    """The verified rows of one step, a fixed number ``R`` per bucket (padding: ``slot`` = -1)."""

    rows: jax.Array  # int32 [R]: the token row (index into the step's rows)
    slot: jax.Array  # int32 [R]: its sequence slot (-1: padding)
    offset: jax.Array  # int32 [R]: its index j in the chunk (the token it emits is the sequence's step + j)
    next_token: jax.Array  # int32 [R]: the proposal that follows the row (-1: the chunk's last row)
    any: jax.Array  # bool []: some row is verified this step


def residual_logits(z: jax.Array, draft: jax.Array) -> jax.Array:
    """Logits of the residual max(0, p - q) for q a point mass on ``draft``: p without the draft."""
    v = z.shape[-1]
    return jnp.where(jnp.arange(v)[None, :] == draft[:, None], -jnp.inf, z)


def filtered_logits(logits: jax.Array, p: SamplingArrays) -> jax.Array:
    """Logits of the distribution ``sampling.sample`` draws from: scaled by the temperature, with the
    tokens top-k / top-p / min-p remove (``sampling.keep_sorted``) at -inf (in token order)."""
    temp = jnp.where(p.temperature > 0, p.temperature, 1.0)
    z = logits / temp[:, None]
    needs_sort = jnp.any((p.top_k > 0) | (p.top_p < 1) | (p.min_p > 0))

    def filtered():
        order = jnp.argsort(-z, axis=-1)
        keep = keep_sorted(jnp.take_along_axis(z, order, axis=-1), p)
        keep_tok = jnp.take_along_axis(keep, jnp.argsort(order, axis=-1), axis=-1)
        return jnp.where(keep_tok, z, -jnp.inf)

    return jax.lax.cond(needs_sort, filtered, lambda: z)


def verify_rows(logits: jax.Array, next_token: jax.Array, offset: jax.Array, p: SamplingArrays
                ) -> tuple[jax.Array, jax.Array]:
    """Per verified row (``p`` already gathered per row): (token to emit if the chain stops here,
    whether the following proposal is accepted).  See the module docstring for the rule."""
    v = logits.shape[-1]
    greedy_tok = argmax_rows(logits).astype(jnp.int32)
    is_greedy = (p.temperature <= 0) | (p.top_k == 1)
    has_next = next_token >= 0
    draft = jnp.clip(next_token, 0, v - 1)
    greedy_accept = has_next & (greedy_tok == next_token)

    def random_rows():
        z = filtered_logits(logits, p)
        keys = jax.vmap(_row_key)(p.seed, p.step + offset)
        gumbel = jax.vmap(lambda k: jax.random.gumbel(k, (v,), jnp.float32))(keys)
        u = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, UNIFORM_SALT)))(keys)
        prob_draft = jnp.take_along_axis(jax.nn.softmax(z, axis=-1), draft[:, None], axis=-1)[:, 0]
        accept = has_next & (u < prob_draft)
        zr = jnp.where(has_next[:, None], residual_logits(z, draft), z)
        return argmax_rows(zr + gumbel).astype(jnp.int32), accept

    tok, accept = jax.lax.cond(jnp.all(is_greedy), lambda: (greedy_tok, greedy_accept), random_rows)
    return jnp.where(is_greedy, greedy_tok, tok), jnp.where(is_greedy, greedy_accept, accept)


def verify(logits_fn, hidden: jax.Array, logits_indices: jax.Array, spec: SpecInputs, sampling: SamplingArrays
           ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """The step's LM head and verification: ``logits_fn`` (hidden rows -> float32 logits) runs once, on
    the sampled rows (``logits_indices``) and, when some row is verified, on the verified rows too (one
    matmul reads the head's weights once); then ``verify_rows``.  Returns (the sampled rows' logits,
    (token, accepted) per verified row: zeros when none is)."""
    r, s = spec.rows.shape[0], logits_indices.shape[0]

    def with_spec():
        logits = logits_fn(hidden[jnp.concatenate([logits_indices, spec.rows])])
        slot = jnp.clip(spec.slot, 0, sampling.temperature.shape[0] - 1)
        p = jax.tree_util.tree_map(lambda x: x[slot], sampling)
        return logits[:s], verify_rows(logits[s:], spec.next_token, spec.offset, p)

    def without():
        return logits_fn(hidden[logits_indices]), (jnp.zeros((r,), jnp.int32), jnp.zeros((r,), bool))

    return jax.lax.cond(spec.any, with_spec, without)


def accepted_prefix(accept: np.ndarray, first: int, num_draft: int) -> int:
    """Proposals accepted in a chunk: the leading run of accepted rows ``first .. first + num_draft - 1``."""
    a = 0
    while a < num_draft and accept[first + a]:
        a += 1
    return a
