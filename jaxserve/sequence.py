"""A request's state on the host (``Sequence``) and what users get back (``RequestOutput``)."""

from __future__ import annotations

import dataclasses
import enum
import time

from jaxserve.sampling import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclasses.dataclass
class Logprob:
    """Log-probability of the chosen token and the top-n alternatives {token_id: logprob}."""

    token_id: int
    logprob: float
    top: dict[int, float]
    rank: int | None = None  # 1 + the number of tokens more likely (prompt logprobs)


@dataclasses.dataclass
class RequestOutput:
    """A request's output so far (``finished`` says whether it is complete)."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str | None
    finished: bool
    finish_reason: str | None  # "length" | "stop" | "abort" once finished
    logprobs: list[Logprob] | None
    arrival_time: float
    first_token_time: float | None
    finish_time: float | None
    new_token_ids: list[int] = dataclasses.field(default_factory=list)  # since the previous output
    text_delta: str = ""  # since the previous output
    prompt: str | None = None
    # With SamplingParams.prompt_logprobs: per prompt token, None for the first (as vLLM), else its Logprob
    # (None too for tokens not computed yet).
    prompt_logprobs: list[Logprob | None] | None = None
    # Speculative decoding: verification steps, proposed and accepted tokens of this request.
    spec_steps: int = 0
    spec_proposed_tokens: int = 0
    spec_accepted_tokens: int = 0

    @property
    def spec_acceptance_rate(self) -> float | None:
        return self.spec_accepted_tokens / self.spec_proposed_tokens if self.spec_proposed_tokens else None

    @property
    def spec_mean_accepted_length(self) -> float | None:
        """Tokens emitted per verification step (accepted proposals + the target's own token)."""
        return (self.spec_accepted_tokens + self.spec_steps) / self.spec_steps if self.spec_steps else None


class Sequence:
    """One request: its tokens, its pages in the KV cache, and its progress."""

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 seed: int, prompt: str | None = None):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.output_token_ids: list[int] = []
        self.params = params
        self.seed = seed
        self.status = Status.WAITING
        self.penalty_row: int | None = None  # its row of the runner's PenaltyState, if it has one
        self.bad_word_ids: list[list[int]] = []  # params.bad_words as token sequences
        self.matcher = None  # xgrammar GrammarMatcher of params.structured_outputs (jaxserve/structured.py)
        self.page_ids: list[int] = []
        self.data_group = 0  # data-parallel attention: the data group whose pages it holds (scheduler.py)
        self.page_keys: list = []  # prefix-cache keys of its full pages (PageAllocator.register_full_pages)
        self.counted_prefix = False  # its prefix-cache lookup is in the scheduler's statistics
        self.spec_steps = 0  # speculative decoding: verification steps, proposed / accepted tokens
        self.spec_proposed = 0
        self.spec_accepted = 0
        self.spec_disabled = False  # its acceptance fell below speculative_config.min_acceptance_rate
        self.num_computed_tokens = 0  # tokens whose K/V are in the cache
        # Async scheduling (Engine.step): tokens a step in flight is sampling for it, not yet known on the
        # host; counted in num_tokens (the next step computes them), not in output_token_ids.
        self.num_pending = 0
        self.finish_reason: str | None = None
        self.logprobs: list[Logprob] | None = [] if params.logprobs is not None else None
        self.prompt_logprobs: dict[int, Logprob] | None = {} if params.prompt_logprobs is not None else None
        self.arrival_time = time.monotonic()
        self.first_token_time: float | None = None
        self.finish_time: float | None = None
        # Incremental detokenization state (see Detokenizer).
        self.text = ""
        self.prefix_offset = max(0, len(prompt_token_ids) - 6)
        self.read_offset = len(prompt_token_ids)
        # What the last emitted RequestOutput already reported.
        self.reported_tokens = 0
        self.reported_text = 0

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids) + self.num_pending

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_ids(self, start: int, end: int) -> list[int]:
        """Tokens ``start:end`` of prompt + output, without concatenating the whole lists (the known ones:
        a pending token is left out)."""
        n = len(self.prompt_token_ids)
        if start >= n:
            return self.output_token_ids[start - n:end - n]
        return self.prompt_token_ids[start:end] + self.output_token_ids[:max(0, end - n)]

    @property
    def is_finished(self) -> bool:
        return self.status == Status.FINISHED

    def max_total_tokens(self) -> int:
        return len(self.prompt_token_ids) + self.params.max_tokens

    def to_output(self, with_text: bool) -> RequestOutput:
        new_ids = self.output_token_ids[self.reported_tokens:]
        delta = self.text[self.reported_text:]
        self.reported_tokens = len(self.output_token_ids)
        self.reported_text = len(self.text)
        return RequestOutput(
            request_id=self.request_id,
            prompt_token_ids=self.prompt_token_ids,
            token_ids=list(self.output_token_ids),
            text=self.text if with_text else None,
            finished=self.is_finished,
            finish_reason=self.finish_reason,
            logprobs=list(self.logprobs) if self.logprobs is not None else None,
            arrival_time=self.arrival_time,
            first_token_time=self.first_token_time,
            finish_time=self.finish_time,
            new_token_ids=new_ids,
            text_delta=delta if with_text else "",
            prompt=self.prompt,
            prompt_logprobs=(None if self.prompt_logprobs is None else
                             [None] + [self.prompt_logprobs.get(p) for p in range(1, len(self.prompt_token_ids))]),
            spec_steps=self.spec_steps,
            spec_proposed_tokens=self.spec_proposed,
            spec_accepted_tokens=self.spec_accepted,
        )
