"""Shared fixtures: tiny random checkpoints (written once per session) and shared engines.

Engines are expensive on CPU mainly because every step shape (bucket) is compiled
once; an engine is therefore shared by every test that can use it.  The
``engine`` fixture hands out the shared Llama engine and, after each test,
checks that the test left it clean (nothing queued, every page free) and
restores that state if it did not, so that one failing test cannot break the
following ones.  Under the README's ``-n 2 --dist loadfile`` each pytest-xdist worker builds its own
session fixtures, and a file's tests all run in one worker.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# The suite runs on the CPU: the engine tests on XLA CPU, the kernels in Pallas interpret mode, and the
# TPU/GPU compile checks on compile-only devices, which exist only when jax starts with JAX_PLATFORMS=cpu
# (with the CUDA plugin installed, jax would otherwise try to open a GPU).  bench/device_check.sh runs
# the kernels natively on a lent accelerator with JAX_PLATFORMS set to its platform.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
# No persistent compile cache unless a test asks for one (tests/test_startup.py): the suite compiles what
# it tests, and writes nothing to the user's cache home.
os.environ.setdefault("JAXSERVE_COMPILE_CACHE", "off")

# tests/multidevice needs 8 (virtual) devices, which XLA only creates if XLA_FLAGS says so before jax
# starts; this process may already have started jax with one device.  tests/test_multidevice.py
# therefore runs each of those modules in a subprocess with MULTIDEVICE_ENV set; elsewhere they are
# not collected.  To run them directly: JAXSERVE_MULTIDEVICE=1 python3 -m pytest -q tests/multidevice
MULTIDEVICE_ENV = {"JAXSERVE_MULTIDEVICE": "1", "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
if os.environ.get("JAXSERVE_MULTIDEVICE") == "1":
    if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + MULTIDEVICE_ENV["XLA_FLAGS"]).strip()
else:
    collect_ignore = ["multidevice"]

from jaxserve import Engine, SamplingParams  # noqa: E402
from jaxserve.make_model import make_model  # noqa: E402

# The configuration shared by most tests: page boundaries are crossed every 8
# tokens, prompts longer than 64 tokens are chunked, and a batch of more than
# four requests has to wait for free slots.  min_prefill_bucket=64 leaves a single prefill
# bucket: at most three step programs to compile per engine (compiling dominates on CPU).
ENGINE_KW = dict(max_num_seqs=4, page_size=8, max_model_len=256, max_num_batched_tokens=64,
                 min_prefill_bucket=64)
VOCAB = 1024  # vocabulary of the "tiny" size


# A test that hangs must not hold CI until its hard limit: after HANG_SECONDS in one test (the slowest takes
# about 170 s here), every thread's traceback goes to the terminal's stderr and the run exits (faulthandler's
# watchdog, armed per test; pytest's own ``faulthandler_timeout`` only prints and lets the hang go on).
HANG_SECONDS = float(os.environ.get("JAXSERVE_TEST_HANG_SECONDS", "1200"))
_watchdog_file = None


def pytest_configure(config):
    global _watchdog_file
    # Output capture is suspended here, so fd 2 is the terminal; during a test it is a capture file, lost at exit.
    _watchdog_file = os.fdopen(os.dup(2), "w")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    import faulthandler

    if _watchdog_file is not None and HANG_SECONDS > 0:
        faulthandler.dump_traceback_later(HANG_SECONDS, exit=True, file=_watchdog_file)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Free each module's compiled programs when it ends.  Every XLA CPU executable holds memory mappings
    (an engine's step programs: about 5,000; tests/test_spec_decode.py alone ends at 14,498), and one
    process may hold at most vm.max_map_count (65,530 here) of them.  Past that limit, mmap fails inside
    XLA's compiler and the C++ unwinder: the suite aborted, or hung, about 650 tests in, on CI and here."""
    yield
    import gc

    import jax

    gc.collect()
    jax.clear_caches()
    gc.collect()


def pytest_collection_finish(session):
    # Collecting tests/test_structured.py imported xgrammar, which loads apache-tvm-ffi, whose SIGSEGV handler
    # can hang the process instead of crashing it (jaxserve/structured.py import_xgrammar): put back the
    # default action, under faulthandler (Python tracebacks of every thread, then the crash).
    import faulthandler

    from jaxserve.structured import restore_default_segv

    faulthandler.disable()  # (enable() on an enabled faulthandler reinstalls nothing)
    restore_default_segv()
    if _watchdog_file is not None:
        faulthandler.enable(file=_watchdog_file, all_threads=True)


def pytest_collection_modifyitems(config, items):
    if os.environ.get("JAXSERVE_MULTIDEVICE") == "1":
        import jax

        if jax.device_count() < 8:
            raise pytest.UsageError(f"tests/multidevice needs 8 devices, jax sees {jax.device_count()} "
                                    "(XLA_FLAGS was set after jax started?)")


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **kw)


def hf_greedy_cached(model, prompt: list[int], n: int) -> list[int]:
    """Hugging Face's own incremental greedy decode (its KV cache, sliding-window layers included): argmax
    of the last logits, n times.  Much faster than recomputing the whole prefix per token."""
    import inspect

    import torch

    # transformers 5.x renames past_key_values to cache.
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out_ids = []
    with torch.no_grad():
        out = model(torch.tensor([prompt]), use_cache=True)
        for i in range(n):
            token = int(out.logits[0, -1].argmax())
            out_ids.append(token)
            if i + 1 < n:
                cache = out.cache if hasattr(out, "cache") else out.past_key_values
                out = model(torch.tensor([[token]]), use_cache=True, **{cache_arg: cache})
    return out_ids


def random_prompts(lengths, seed: int = 0, vocab: int = VOCAB) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, size=n).tolist() for n in lengths]


def drain(engine: Engine, max_steps: int = 10_000) -> dict[str, object]:
    """Step until nothing is left; return the final output of every request that finished."""
    final = {}
    for _ in range(max_steps):
        if not engine.has_unfinished():
            return final
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out
    raise AssertionError("engine did not finish its requests")


def assert_clean(engine: Engine) -> None:
    assert not engine.has_unfinished()
    assert not engine.scheduler.running and not engine.scheduler.waiting
    assert engine.num_free_pages == engine.num_pages


def greedy_tokens(engine: Engine, prompts, max_tokens) -> list[list[int]]:
    """Greedy token ids of ``prompts`` (``max_tokens[i]`` each), checking the engine is clean afterwards."""
    outs = engine.generate(prompts, [greedy(n) for n in max_tokens])
    assert_clean(engine)
    return [o.token_ids for o in outs]


def reset(engine: Engine) -> None:
    """Abort whatever a (failed) test left behind and run the engine dry."""
    for seq in list(engine.scheduler.running) + list(engine.scheduler.waiting):
        engine.abort(seq.request_id)
    drain(engine)


@pytest.fixture(scope="session")
def model_factory(tmp_path_factory):
    """``model_factory(name, arch='llama', **make_model_kwargs)``: a checkpoint dir, written once."""
    cache: dict[str, str] = {}

    def get(name: str, arch: str = "llama", **kw) -> str:
        if name not in cache:
            cache[name] = make_model(str(tmp_path_factory.mktemp(name)), arch, "tiny", **kw)
        return cache[name]

    return get


@pytest.fixture(scope="session")
def mha_dir(model_factory) -> str:
    """Tiny Llama with 8 query and 8 KV heads: splits over a 'model' axis of 1, 2, 4 or 8."""
    return model_factory("llama_h8_kv8", num_attention_heads=8, num_key_value_heads=8)


@pytest.fixture(scope="session")
def gqa_dir(model_factory) -> str:
    """Tiny Llama with 8 query and 2 KV heads: a 'model' axis of 4 or 8 replicates the KV heads."""
    return model_factory("llama_h8_kv2", num_attention_heads=8, num_key_value_heads=2)


@pytest.fixture(scope="session")
def llama_dir(model_factory) -> str:
    """Tiny random Llama with a trained BPE tokenizer."""
    return model_factory("llama")


@pytest.fixture(scope="session")
def notok_dir(model_factory) -> str:
    """Tiny random Llama without a tokenizer."""
    return model_factory("llama_notok", tokenizer=False)


@pytest.fixture(scope="session")
def shared_engine(llama_dir) -> Engine:
    return Engine.from_pretrained(llama_dir, **ENGINE_KW)


@pytest.fixture
def engine(shared_engine):
    """The shared engine; the test must leave it clean (checked afterwards)."""
    assert_clean(shared_engine)
    yield shared_engine
    try:
        assert_clean(shared_engine)
    finally:
        reset(shared_engine)


@pytest.fixture(scope="session")
def reference_outputs(shared_engine):
    """``reference_outputs(prompts, max_tokens_list)``: greedy tokens from the shared engine, memoised."""
    memo: dict[tuple, list[int]] = {}

    def get(prompts, max_tokens):
        missing = [(tuple(p), n) for p, n in zip(prompts, max_tokens) if (tuple(p), n) not in memo]
        if missing:
            assert_clean(shared_engine)
            outs = shared_engine.generate([list(p) for p, _ in missing], [greedy(n) for _, n in missing])
            for key, o in zip(missing, outs):
                memo[key] = o.token_ids
            assert_clean(shared_engine)
        return [memo[(tuple(p), n)] for p, n in zip(prompts, max_tokens)]

    return get
