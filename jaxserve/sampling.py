"""Sampling parameters (vLLM's names) and the on-device sampler.

Every request carries its own parameters inside one batch: the step receives
per-row arrays (temperature, top-k, top-p, min-p, seed, number of tokens
generated so far) and samples all rows at once.  A row's random key is
``fold_in(key(seed), n_generated)``, so a seeded request gives the same tokens
whatever else shares its batch.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import jax.numpy as jnp

MAX_LOGPROBS = 20  # top-n logprobs a request may ask for (vLLM's default max_logprobs)


@dataclasses.dataclass
class SamplingParams:
    """Per-request generation parameters (field names as in vLLM)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = -1  # -1 or 0: all tokens
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    stop: str | Sequence[str] | None = None
    stop_token_ids: Sequence[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None  # number of top logprobs to return per token
    detokenize: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def is_int(x):
            return isinstance(x, int) and not isinstance(x, bool)

        def is_num(x):
            return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

        if not is_int(self.max_tokens) or self.max_tokens < 1:
            raise ValueError(f"max_tokens: must be an integer >= 1, got {self.max_tokens!r}")
        if not is_num(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature: must be a finite number >= 0, got {self.temperature!r}")
        if not is_int(self.top_k) or self.top_k < -1:
            raise ValueError(f"top_k: must be an integer >= -1 (-1 or 0 disables it), got {self.top_k!r}")
        if not is_num(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p: must be in (0, 1], got {self.top_p!r}")
        if not is_num(self.min_p) or not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p: must be in [0, 1], got {self.min_p!r}")
        if self.seed is not None and (not is_int(self.seed) or not 0 <= self.seed < 2**63):
            raise ValueError(f"seed: must be an integer in [0, 2**63), got {self.seed!r}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        if not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop: must be a string or a list of non-empty strings, got {self.stop!r}")
        self.stop_token_ids = list(self.stop_token_ids or [])
        if not all(is_int(t) and t >= 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids: must be a list of non-negative integers, "
                             f"got {self.stop_token_ids!r}")
        if self.logprobs is not None and (not is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise ValueError(f"logprobs: must be an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SamplingArrays:
    """Per-row sampling parameters as device arrays [S]."""

    temperature: jax.Array  # float32; 0 = greedy
    top_k: jax.Array  # int32; <= 0 = off
    top_p: jax.Array  # float32
    min_p: jax.Array  # float32
    seed: jax.Array  # uint32 [S, 2]: the 64-bit seed as two words
    step: jax.Array  # int32: tokens generated so far (folded into the key)


def _row_key(seed: jax.Array, step: jax.Array) -> jax.Array:
    key = jax.random.PRNGKey(seed[0])
    key = jax.random.fold_in(key, seed[1])
    return jax.random.fold_in(key, step)


def _sample_filtered(logits: jax.Array, p: SamplingArrays, keys: jax.Array) -> jax.Array:
    """Temperature, then top-k / top-p / min-p over the sorted vocabulary, then a Gumbel-max draw."""
    v = logits.shape[-1]
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    rank = jnp.arange(v)[None, :]
    keep = jnp.where(p.top_k[:, None] > 0, rank < p.top_k[:, None], True)
    # top-p: keep the smallest prefix whose mass reaches top_p (the first token always stays).
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep &= (mass_before < p.top_p[:, None]) | (p.top_p[:, None] >= 1)
    keep &= probs >= p.min_p[:, None] * probs[:, :1]
    masked = jnp.where(keep, sorted_logits, -jnp.inf)
    # The noise is drawn in token-id order, as in the unfiltered path, so a row's draw does not
    # depend on which path its batch took.
    gumbel = jax.vmap(lambda k: jax.random.gumbel(k, (v,), jnp.float32))(keys)
    choice = jnp.argmax(masked + jnp.take_along_axis(gumbel, order, axis=-1), axis=-1)
    return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0]


def sample(logits: jax.Array, p: SamplingArrays) -> jax.Array:
    """Sample one token per row; rows with temperature 0 take the argmax."""
    greedy_tokens = jnp.argmax(logits, axis=-1)
    is_greedy = (p.temperature <= 0) | (p.top_k == 1)

    def random_tokens():
        temp = jnp.where(is_greedy, 1.0, p.temperature)
        scaled = logits / temp[:, None]
        keys = jax.vmap(_row_key)(p.seed, p.step)
        needs_sort = jnp.any(~is_greedy & ((p.top_k > 0) | (p.top_p < 1) | (p.min_p > 0)))

        def plain():
            gumbel = jax.vmap(lambda k: jax.random.gumbel(k, (logits.shape[-1],), jnp.float32))(keys)
            return jnp.argmax(scaled + gumbel, axis=-1)

        return jax.lax.cond(needs_sort, lambda: _sample_filtered(scaled, p, keys), plain)

    sampled = jax.lax.cond(jnp.all(is_greedy), lambda: greedy_tokens, random_tokens)
    return jnp.where(is_greedy, greedy_tokens, sampled).astype(jnp.int32)


def compute_logprobs(logits: jax.Array, tokens: jax.Array, want: jax.Array):
    """Log-probabilities of the sampled tokens and the top MAX_LOGPROBS per row (raw model distribution).

    Computed only when some row asked for logprobs (``want``); zeros otherwise.
    """
    s = logits.shape[0]

    def compute():
        lp = jax.nn.log_softmax(logits, axis=-1)
        top_lp, top_ids = jax.lax.top_k(lp, MAX_LOGPROBS)
        return jnp.take_along_axis(lp, tokens[:, None], axis=-1)[:, 0], top_ids.astype(jnp.int32), top_lp

    def skip():
        return (jnp.zeros((s,), jnp.float32), jnp.zeros((s, MAX_LOGPROBS), jnp.int32),
                jnp.zeros((s, MAX_LOGPROBS), jnp.float32))

    return jax.lax.cond(want, compute, skip)
