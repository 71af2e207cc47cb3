"""KV-cache pages: all returned after generate, returned at once on abort."""

from __future__ import annotations

from conftest import assert_clean, drain, greedy, random_prompts


def _seq(engine, rid):
    for s in list(engine.scheduler.running) + list(engine.scheduler.waiting):
        if s.request_id == rid:
            return s
    return None


def test_all_pages_free_after_generate(engine):
    assert engine.num_free_pages == engine.num_pages
    prompts = random_prompts([3, 150, 64, 8, 1, 40], seed=31)
    max_tokens = [20, 30, 1, 9, 16, 64]
    outs = engine.generate(prompts, [greedy(n) for n in max_tokens])
    assert [len(o.token_ids) for o in outs] == max_tokens
    assert engine.num_free_pages == engine.num_pages


def test_pages_in_use_match_sequences(engine):
    """While requests run, the pages held are exactly those the sequences' page tables list,
    each page is owned by one sequence only, and a sequence holds just enough pages."""
    ps = engine.config.page_size
    for p in random_prompts([10, 30, 17], seed=4):
        engine.add_request(p, greedy(12))
    while engine.has_unfinished():
        engine.step()
        running = engine.scheduler.running
        owned = [pid for s in running for pid in s.page_ids]
        assert len(owned) == len(set(owned))
        assert engine.num_free_pages == engine.num_pages - len(owned)
        for s in running:
            assert len(s.page_ids) == -(-s.num_computed_tokens // ps)
    assert_clean(engine)


def test_abort_frees_pages_at_once(engine, reference_outputs):
    pa, pb = random_prompts([37, 20], seed=8)
    a = engine.add_request(pa, greedy(30))
    b = engine.add_request(pb, greedy(25))
    tokens_a = []
    in_flight = int(engine.async_scheduling)  # async: the 4th token lands while the next step runs
    for _ in range(4 + in_flight):
        for o in engine.step():
            if o.request_id == a:
                tokens_a = o.token_ids
    assert len(tokens_a) == 4
    computed = 37 + 3 + in_flight  # 40 tokens with K/V in the cache (and the step in flight's)
    assert _seq(engine, a).num_computed_tokens == computed
    held_by_a = len(_seq(engine, a).page_ids)
    assert held_by_a == -(-computed // 8)
    free_before = engine.num_free_pages
    assert engine.abort(a) is True
    # Freed now, not at the next step.
    assert engine.num_free_pages == free_before + held_by_a
    assert _seq(engine, a) is None
    assert engine.abort(a) is False  # already aborted
    assert engine.abort("no-such-request") is False
    outs = engine.step()
    final_a = [o for o in outs if o.request_id == a]
    assert len(final_a) == 1
    assert final_a[0].finished and final_a[0].finish_reason == "abort"
    assert final_a[0].token_ids == tokens_a
    final = drain(engine)
    assert a not in final
    assert final[b].finish_reason == "length"
    assert final[b].token_ids == reference_outputs([pb], [25])[0]
    assert_clean(engine)


def test_abort_waiting_request(engine, reference_outputs):
    """Aborting a request that never ran: no page moves, the others are unaffected."""
    prompts = random_prompts([12, 9, 14, 11, 6], seed=12)
    ids = [engine.add_request(p, greedy(6)) for p in prompts]
    engine.step()  # four slots: the fifth request waits
    last = _seq(engine, ids[-1])
    assert last in engine.scheduler.waiting and not last.page_ids
    free = engine.num_free_pages
    assert engine.abort(ids[-1])
    assert engine.num_free_pages == free
    final = drain(engine)
    assert final[ids[-1]].finish_reason == "abort" and final[ids[-1]].token_ids == []
    ref = reference_outputs(prompts[:4], [6] * 4)
    assert [final[i].token_ids for i in ids[:4]] == ref
    assert_clean(engine)


def test_finished_request_cannot_be_aborted(engine):
    out = engine.generate([4, 5, 6], greedy(2))[0]
    assert engine.abort(out.request_id) is False
    assert_clean(engine)


def test_abandoned_stream_frees_pages(engine):
    """Closing a stream early aborts its request (and frees its pages)."""
    gen = engine.stream(random_prompts([30], seed=2)[0], greedy(50))
    first = next(gen)
    second = next(gen)
    assert not second.finished and len(first.token_ids) == 1 and len(second.token_ids) == 2
    assert engine.num_free_pages < engine.num_pages
    gen.close()
    assert engine.num_free_pages == engine.num_pages
    (out,) = engine.step()  # the abort's final output
    assert out.finish_reason == "abort"
    assert_clean(engine)


def test_allocator_keeps_each_sequence_contiguous():
    """Sequences growing in turn each get adjacent pages: the first one from the start of the free pages,
    the next from the middle of the largest free run; a sequence whose next page is another's continues
    from the largest free run, and released pages are handed out again (never twice)."""
    from jaxserve.kv_cache import PageAllocator
    alloc = PageAllocator(64, page_size=4)
    a, b, c = [], [], []
    assert alloc.grow(a, 8) and a == [0, 1]
    assert alloc.grow(b, 4) and b == [33]  # the middle of the free run [2, 64)
    for n in range(3, 9):  # interleaved growth, one page each in turn
        assert alloc.grow(a, 4 * n) and alloc.grow(b, 4 * (n - 1))
    assert a == list(range(0, 8)) and b == list(range(33, 40))
    assert alloc.grow(a, 4 * 33) and a == list(range(0, 33))  # up to b's first page
    # a's next page (33) is b's: a continues in the middle of the largest free run, [40, 64)
    assert alloc.grow(a, 4 * 34) and a[-1] == 52
    assert alloc.grow(c, 4) and c == [46]  # the middle of [40, 52), the largest run left
    assert alloc.num_free == 64 - 34 - 7 - 1
    alloc.release(a)
    assert a == [] and alloc.num_free == 64 - 7 - 1
    e = []
    assert alloc.grow(e, 4 * 8) and e == list(range(0, 8))  # a's pages again, in order
    # every page handed out once, then none left
    rest = []
    assert alloc.grow(rest, 4 * alloc.num_free)
    taken = e + b + c + rest
    assert sorted(taken) == list(range(64)) and alloc.num_free == 0 and not alloc.grow(rest, 4 * 64)
