"""Data-parallel attention on the host (no device work): the page allocator's data groups and the
scheduler's balancing of sequences, budgets and preemption over them (jaxserve/scheduler.py)."""

from __future__ import annotations

import pytest

from conftest import greedy
from jaxserve.config import EngineConfig
from jaxserve.kv_cache import PageAllocator
from jaxserve.scheduler import Scheduler
from jaxserve.sequence import Sequence


def test_allocator_groups_own_disjoint_page_ranges():
    alloc = PageAllocator(8, page_size=4, enable_prefix_caching=True, num_groups=2)
    a, b = [], []
    assert alloc.grow(a, 9, group=1) and a == [4, 5, 6]  # group 1 owns pages 4..7
    assert alloc.grow(b, 4, group=0) and b == [0]
    assert alloc.free_in(0) == 3 and alloc.free_in(1) == 1 and alloc.num_free == 4
    assert not alloc.grow(a, 17, group=1)  # 5 pages: group 1 has 1 left, group 0's are not its to take
    assert a == [4, 5, 6]
    # A prefix cached in group 1 is found from group 1 only.
    tokens = list(range(9))
    alloc.register_full_pages(a, keys := [], lambda i, j: tokens[i:j], 8)
    assert alloc.match_prefix(tokens, group=0) == ([], [])
    pages, _ = alloc.match_prefix(tokens, group=1)
    assert pages == [4, 5]
    alloc.release(pages)
    alloc.release(a)
    alloc.release(b)
    assert alloc.free_in(0) == alloc.free_in(1) == 4
    with pytest.raises(ValueError, match="num_pages: 7 pages do not split into 2 equal data groups"):
        PageAllocator(7, 4, num_groups=2)


def make_scheduler(num_pages=32, **kw):
    cfg = EngineConfig(**dict(dict(max_num_seqs=4, max_num_batched_tokens=16, page_size=4, num_pages=num_pages,
                                   mesh_shape={"data": 2, "model": 1}), **kw))
    cfg.validate()
    return Scheduler(cfg, PageAllocator(num_pages, 4, num_groups=2))


def seqs(lengths, max_tokens=4):
    return [Sequence(f"r{i}", list(range(1, n + 1)), greedy(max_tokens), seed=0) for i, n in enumerate(lengths)]


def test_scheduler_balances_groups_and_budgets():
    sched = make_scheduler()
    for s in seqs([5, 5, 5, 5, 5]):
        sched.add(s)
    out = sched.schedule()
    # Two slots and 8 tokens per group: r0, r1 fill group 0 and 1 alternately, r2 and r3 take the rest.
    assert [(s.seq.request_id, s.seq.data_group, s.num_tokens) for s in out.prefills] == \
        [("r0", 0, 5), ("r1", 1, 5), ("r2", 0, 3), ("r3", 1, 3)]
    assert len(sched.waiting) == 1  # every group's slots are taken
    for s in sched.running:
        assert all(p // 16 == s.data_group for p in s.page_ids)


def test_preemption_stays_in_the_group():
    sched = make_scheduler(num_pages=8, max_num_batched_tokens=32)  # 4 pages (16 tokens), 16 tokens a step per group
    a, b, c = seqs([7, 9, 2], max_tokens=12)
    for s in (a, b, c):
        sched.add(s)
    sched.schedule()
    assert (a.data_group, b.data_group, c.data_group) == (0, 1, 0)
    for s in (a, b, c):  # as if every chunk ran and sampled 8 tokens: a and b outgrow their group's free pages
        s.num_computed_tokens = s.num_tokens
        s.output_token_ids += [1] * 8
    sched.schedule()
    # Group 0's newest sequence (c) made room for a; group 1's b (17 tokens > 16) preempted itself, then was
    # readmitted to group 1 with a 16-token chunk; c waits for group 0's pages.
    assert sched.num_preemptions == 2
    assert list(sched.waiting) == [c] and [s.request_id for s in sched.running] == ["r0", "r1"]
    assert b.data_group == 1 and b.num_computed_tokens == 0 and len(b.page_ids) == 4
    assert all(p >= 4 for p in b.page_ids) and all(p < 4 for p in a.page_ids)


def test_data_axis_config_errors():
    for kw, msg in [(dict(max_num_seqs=3), "max_num_seqs: must be a multiple of the 'data' axis \\(2\\)"),
                    (dict(num_pages=9), "num_pages: must be a multiple"),
                    (dict(scheduling="static"), "scheduling: 'static' is not supported"),
                    (dict(speculative_config={"method": "ngram", "num_speculative_tokens": 2}),
                     "speculative_config: speculative decoding is not supported")]:
        with pytest.raises(ValueError, match=msg):
            make_scheduler(**kw)
