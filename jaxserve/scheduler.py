"""The host scheduler: who runs this step, and how many tokens each (plain Python, no JAX).

Continuous batching: every step, running sequences go first (decodes, then
unfinished prefills), and any free slot is refilled from the FIFO waiting queue
at once, within the token budget ``max_num_batched_tokens``.  Long prompts are
prefilled in chunks that fill what the budget leaves.  When the cache runs out
of pages, the newest running sequence is preempted: its pages are freed and it
goes back to the front of the queue, to be recomputed (its generated tokens are
kept, so its output does not change).

Static batching (``scheduling="static"``, for comparison): a batch of up to
``max_num_seqs`` is admitted together only when nothing runs, and the step keeps
that batch's shape (finished members' slots stay idle) until its last member
finishes.  The step computes that whole shape, idle slots included, as a
fixed-shape batch does (``CausalLM.fixed_shape``); a continuous step skips a
bucket's padding slots on the CPU path (``model.real_rows``, ``sampled_slots``).

Data-parallel attention (a mesh with ``data`` D > 1): each sequence belongs to one of D data groups,
chosen at admission (the group with the fewest running sequences, then the most free pages), and takes
all its pages from that group's range (``PageAllocator(num_groups=D)``).  Every group has its own
token budget (``max_num_batched_tokens / D``), sequence slots (``max_num_seqs / D``) and prefill slots,
and a group short of pages preempts only its own sequences.  With D = 1 this is the plain scheduler.
"""

from __future__ import annotations

import collections
import dataclasses
import logging

from jaxserve.config import EngineConfig
from jaxserve.kv_cache import PageAllocator
from jaxserve.sequence import Sequence, Status

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class ScheduledSeq:
    seq: Sequence
    num_tokens: int  # new tokens computed for it this step (its last token + the proposals, if any)
    draft: list[int] = dataclasses.field(default_factory=list)  # proposed tokens to verify (spec_decode.py)

    @property
    def samples(self) -> bool:
        """Whether this chunk reaches the end of the sequence's known tokens (so a token is sampled)."""
        return self.seq.num_computed_tokens + self.num_tokens - len(self.draft) == self.seq.num_tokens


@dataclasses.dataclass
class SchedulerOutput:
    decodes: list[ScheduledSeq]  # one token each; first in the batch
    prefills: list[ScheduledSeq]  # prompt chunks
    min_decode_slots: int = 0  # static batching: the batch keeps this many decode slots

    @property
    def empty(self) -> bool:
        return not self.decodes and not self.prefills

    @property
    def num_tokens(self) -> int:
        return len(self.decodes) + sum(s.num_tokens for s in self.prefills)


class Scheduler:
    def __init__(self, config: EngineConfig, allocator: PageAllocator):
        self.config = config
        self.allocator = allocator
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.num_prefill_tokens = 0  # prompt (and recomputed) tokens computed
        self.num_decode_tokens = 0
        self.prefix_cache_query_tokens = 0  # tokens of admitted sequences looked up in the prefix cache
        self.prefix_cache_hit_tokens = 0  # ... of which were found cached (not computed)
        self._static_batch = 0
        # Speculative decoding (jaxserve/spec_decode.py), set by the engine: the proposer, k, and counters.
        self.proposer = None
        self.num_speculative_tokens = 0
        self.spec_verifications = 0  # chunks verified
        self.spec_proposed_tokens = 0
        self.spec_accepted_tokens = 0  # (counted by the engine, which sees the step's result)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        cfg = self.config
        groups = range(cfg.data_groups)
        budget = [cfg.group_max_num_batched_tokens for _ in groups]  # per data group (one without a data axis)
        num_prefills = [0 for _ in groups]
        max_prefills = cfg.group_max_num_prefill_seqs
        decodes: list[ScheduledSeq] = []
        prefills: list[ScheduledSeq] = []
        # Running sequences, oldest first; one with a single token left to compute is a decode.
        for seq in sorted(self.running, key=lambda s: s.num_tokens - s.num_computed_tokens > 1):
            g = seq.data_group
            if seq.status != Status.RUNNING or budget[g] == 0:
                continue
            if seq.num_pending and len(seq.output_token_ids) + seq.num_pending >= seq.params.max_tokens:
                continue  # its last token is in flight (async scheduling): it finishes when that lands
            if seq.num_computed_tokens == 0 and not seq.page_ids:
                self._match_prefix(seq)  # admitted by static batching, not yet started
            remaining = seq.num_tokens - seq.num_computed_tokens
            if remaining > 1 and num_prefills[g] >= max_prefills:
                continue
            if remaining > budget[g] and not cfg.enable_chunked_prefill:
                continue
            draft = self._propose(seq, budget[g]) if remaining == 1 and num_prefills[g] < max_prefills else []
            n = min(remaining, budget[g]) + len(draft)
            if not self._grow_or_preempt(seq, seq.num_computed_tokens + n, decodes + prefills):
                continue
            is_decode = n == 1 and remaining == 1
            self._schedule(ScheduledSeq(seq, n, draft), decodes if is_decode else prefills)
            num_prefills[g] += not is_decode
            budget[g] -= n
        # Admission from the waiting queue.
        if cfg.scheduling == "static":
            if not self.running:
                self._static_batch = min(len(self.waiting), cfg.max_num_seqs)
                for _ in range(self._static_batch):
                    seq = self.waiting.popleft()
                    seq.status = Status.RUNNING
                    self.running.append(seq)
                if self._static_batch:
                    return self.schedule()  # schedule the new batch's first chunks
        else:
            running = [0 for _ in groups]
            for seq in self.running:
                running[seq.data_group] += 1
            while self.waiting:
                # The least loaded group with a free slot, budget left and a free prefill slot.
                open_groups = [g for g in groups if running[g] < cfg.group_max_num_seqs and budget[g] > 0
                               and num_prefills[g] < max_prefills]
                if not open_groups:
                    break
                g = min(open_groups, key=lambda g: (running[g], -self.allocator.free_in(g), g))
                seq = self.waiting[0]
                if seq.num_pending:  # preempted while a step in flight samples for it: back once that lands
                    break
                seq.data_group = g
                self._match_prefix(seq)
                remaining = seq.num_tokens - seq.num_computed_tokens
                draft = self._propose(seq, budget[g]) if remaining == 1 else []  # the rest of it was cached
                n = min(remaining, budget[g]) + len(draft)
                if (remaining > budget[g] and not cfg.enable_chunked_prefill) or \
                        not self.allocator.grow(seq.page_ids, seq.num_computed_tokens + n, g):
                    self._release(seq)  # a waiting sequence holds no pages
                    break
                self.waiting.popleft()
                seq.status = Status.RUNNING
                self.running.append(seq)
                self._schedule(ScheduledSeq(seq, n, draft), prefills)
                running[g] += 1
                num_prefills[g] += 1
                budget[g] -= n
        min_slots = self._static_batch if cfg.scheduling == "static" else 0
        return SchedulerOutput(decodes, prefills, min_slots)

    def _propose(self, seq: Sequence, budget: int) -> list[int]:
        """Up to k proposed tokens for a decode (none that would run past max_tokens or the budget);
        [] when the sequence is not speculated or its pages for them are not free (no preemption
        for proposals)."""
        if self.proposer is None or self.proposer.cfg.off_for_batch(len(self.running)):
            return []
        k = min(self.num_speculative_tokens, budget - 1, seq.params.max_tokens - len(seq.output_token_ids) - 1)
        if k < 1:
            return []
        draft = self.proposer.propose(seq, k)[:k]
        if draft and not self.allocator.grow(seq.page_ids, seq.num_computed_tokens + 1 + len(draft), seq.data_group):
            return []
        return draft

    def _match_prefix(self, seq: Sequence) -> None:
        """Start a sequence on the cached pages of its longest cached prefix (prefix caching)."""
        if seq.params.prompt_logprobs is not None:  # every prompt position is computed, for its logprobs
            return
        pages, keys = self.allocator.match_prefix(seq.all_token_ids, seq.data_group)
        seq.page_ids, seq.page_keys = pages, keys
        seq.num_computed_tokens = len(pages) * self.allocator.page_size

    def _schedule(self, sch: ScheduledSeq, group: list[ScheduledSeq]) -> None:
        group.append(sch)
        seq = sch.seq
        if sch.draft:
            self.num_decode_tokens += 1
            self.spec_verifications += 1
            self.spec_proposed_tokens += len(sch.draft)
        elif sch.num_tokens > 1 or seq.num_computed_tokens < len(seq.prompt_token_ids):
            self.num_prefill_tokens += sch.num_tokens
        else:
            self.num_decode_tokens += 1
        if not seq.counted_prefix:  # first chunk since admission: count the prefix-cache lookup
            seq.counted_prefix = True
            self.prefix_cache_query_tokens += seq.num_tokens
            self.prefix_cache_hit_tokens += seq.num_computed_tokens

    def _release(self, seq: Sequence) -> None:
        self.allocator.release(seq.page_ids)
        if hasattr(self.proposer, "release"):  # a draft model's pages of this sequence
            self.proposer.release(seq)
        seq.page_keys = []
        seq.num_computed_tokens = 0
        seq.counted_prefix = False

    def _grow_or_preempt(self, seq: Sequence, num_tokens: int, scheduled: list[ScheduledSeq]) -> bool:
        """Make room for ``seq`` to hold ``num_tokens``, preempting the newest running sequences that
        are not already scheduled in this step (``seq`` itself last: then it waits in the queue), of its
        own data group (whose pages it needs)."""
        while not self.allocator.grow(seq.page_ids, num_tokens, seq.data_group):
            busy = {id(s.seq) for s in scheduled}
            victims = [s for s in reversed(self.running) if id(s) not in busy and s.data_group == seq.data_group]
            if not victims:
                return False  # everyone else is in this step; they free pages as they finish
            self.preempt(victims[0])
            if victims[0] is seq:
                return False
        return True

    def preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
        logger.debug("preempted %s (%d tokens)", seq.request_id, seq.num_tokens)

    def finish(self, seq: Sequence) -> None:
        """Remove a finished or aborted sequence and return its pages."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._release(seq)
        seq.status = Status.FINISHED
        if not self.running:
            self._static_batch = 0
