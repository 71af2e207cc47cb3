"""Run an ``Engine`` in one background thread and hand its outputs to asyncio code.

The engine is not thread-safe, so exactly one thread (the engine thread) ever
touches it.  Other threads talk to it through a command list guarded by a
condition variable:

* ``submit`` queues a batch of prompts (one HTTP request: several prompts and/or
  ``n`` choices) and returns an asyncio future resolved once the engine thread
  has tokenized and admitted them all (or rejected them with ``ValueError``),
* ``abort`` queues the abort of request ids.

The engine thread drains the commands before every step, so an abort frees its
request's pages before the next step runs.  Every ``RequestOutput`` of a
submitted request is posted to the submitter's ``asyncio.Queue`` with
``loop.call_soon_threadsafe``; the event loop never waits on a device step.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from typing import Any

from jaxserve.engine import Engine
from jaxserve.metrics import ServerMetrics
from jaxserve.sampling import SamplingParams
from jaxserve.sequence import RequestOutput

logger = logging.getLogger(__name__)


class EngineFailure(RuntimeError):
    """The engine raised while stepping; the requests it was running were dropped."""

    status = 500


class PeerFailure(EngineFailure):
    """Another process of a ``serve --distributed`` group stopped; this one stops too."""

    status = 503


@dataclasses.dataclass
class PromptSpec:
    """One engine request: a prompt (text or token ids) and its sampling parameters.

    ``max_tokens_auto``: ignore ``params.max_tokens`` and generate up to the end of the
    context (what the chat API does when the client sets no limit).
    """

    prompt: str | list[int]
    params: SamplingParams
    add_special_tokens: bool = True
    max_tokens_auto: bool = False


@dataclasses.dataclass
class _Submit:
    request_ids: list[str]
    specs: list[PromptSpec]
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    admitted: asyncio.Future


@dataclasses.dataclass
class _Sink:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    index: int


def _post(loop: asyncio.AbstractEventLoop, callback, *args: Any) -> None:
    """``loop.call_soon_threadsafe`` that tolerates a loop already closed (at shutdown)."""
    try:
        loop.call_soon_threadsafe(callback, *args)
    except RuntimeError:
        logger.debug("event loop closed; dropped a message for it")


def _resolve(future: asyncio.Future, result: Any = None, error: BaseException | None = None) -> None:
    if future.done():  # the waiter was cancelled (client gone)
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class Submission:
    """The requests of one HTTP request, as seen from the event loop."""

    def __init__(self, engine_loop: "EngineLoop", request_ids: list[str], queue: asyncio.Queue):
        self.engine_loop = engine_loop
        self.request_ids = request_ids
        self.queue = queue
        self.finished: dict[int, RequestOutput] = {}
        self.closed = False
        self.released = False  # the server gave back its admission slots

    async def outputs(self):
        """Yield ``(choice_index, RequestOutput)`` until every request has finished (or ``close``)."""
        while len(self.finished) < len(self.request_ids) and not self.closed:
            item = await self.queue.get()
            if item is None:  # close() was called
                return
            if isinstance(item, BaseException):
                raise item
            index, out = item
            if out.finished:
                self.finished[index] = out
            yield index, out

    def close(self) -> None:
        """Abort whatever has not finished (a no-op for finished requests); ends ``outputs``."""
        if self.closed:
            return
        self.closed = True
        unfinished = [rid for i, rid in enumerate(self.request_ids) if i not in self.finished]
        if unfinished:
            self.engine_loop.abort(unfinished)
        self.queue.put_nowait(None)


class EngineLoop:
    """Owns the engine thread.  ``start`` / ``submit`` / ``abort`` / ``stop`` are thread-safe."""

    def __init__(self, engine: Engine, metrics: ServerMetrics | None = None, idle_poll_s: float = 1.0,
                 warmup: Any = None, replica: Any = None):
        """``warmup(loop)``: run first in the engine thread (the step programs compiled or loaded ahead
        of time); ``ready`` turns True once it returned.  Requests submitted meanwhile wait.
        ``replica``: a ``replica.Leader`` (serve --distributed), told before and after every step."""
        self.engine = engine
        self.replica = replica
        if replica is not None:
            from jaxserve.replica import record_ops

            record_ops(engine)
            replica.on_peer_failure = lambda reason: self._fail_all_from_watchdog(PeerFailure(reason))
        self._warmup = warmup
        self.ready = warmup is None
        self.warmup_progress = (0, engine.num_buckets)  # (programs done, programs) while warming up
        self.metrics = metrics or ServerMetrics()
        self._cond = threading.Condition()
        self._commands: list[Any] = []
        self._stop = False
        self._paused = False
        self._thread: threading.Thread | None = None
        self._sinks: dict[str, _Sink] = {}  # engine thread only
        self._idle_poll_s = idle_poll_s
        self.num_steps = 0
        # Text of token ids that appeared in logprobs, filled by the engine thread before it posts the
        # output (the tokenizer is used from that thread only); readers only look ids up.
        self.token_strings: dict[int, str] = {}
        self._publish()

    # -- public, any thread ----------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("engine loop already started")
        self._thread = threading.Thread(target=self._run, name="jaxserve-engine", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    async def submit(self, request_ids: list[str], specs: list[PromptSpec]) -> Submission:
        """Admit the prompts (all or none); raises ValueError naming the field on bad input."""
        if not self.alive:
            raise EngineFailure("the engine loop is not running")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        admitted = loop.create_future()
        self._push(_Submit(request_ids, specs, loop, queue, admitted))
        submission = Submission(self, request_ids, queue)
        try:
            await admitted
        except asyncio.CancelledError:
            submission.close()  # the engine thread may admit them after all: abort by id
            raise
        return submission

    def abort(self, request_ids: list[str]) -> None:
        self._push(("abort", list(request_ids)))

    def pause(self) -> None:
        """Stop stepping (commands are still applied: requests are admitted and wait, aborts free
        pages) until ``resume``; for maintenance and for tests that need requests to stay in flight."""
        with self._cond:
            self._paused = True

    def resume(self) -> None:
        with self._cond:
            self._paused = False
            self._cond.notify()

    def stop(self, timeout: float | None = 10.0) -> None:
        """Abort everything still running and end the thread."""
        with self._cond:
            self._stop = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                logger.error("engine thread did not stop within %.1fs", timeout)

    # -- engine thread -------------------------------------------------------------------------------

    def _push(self, command: Any) -> None:
        with self._cond:
            self._commands.append(command)
            self._cond.notify()

    def _run(self) -> None:
        logger.info("engine loop started")
        engine = self.engine
        if self._warmup is not None:
            try:
                self._warmup(self)
            except Exception as e:  # noqa: BLE001 - reported; the loop ends and /health says so
                logger.exception("warm-up failed; the engine loop stops")
                if self.replica is not None:
                    self.replica.stop(engine, error=f"warm-up failed on process 0: {e}")
                return
            self.ready = True
        while True:
            with self._cond:
                while not self._commands and not self._stop and (self._paused or not engine.has_unfinished()):
                    self._cond.wait(self._idle_poll_s)
                commands, self._commands = self._commands, []
                stopping = self._stop
                paused = self._paused and not stopping
            try:
                for command in commands:
                    self._apply(command)
                if stopping:
                    self._abort_all("the server is shutting down")
                if engine.has_unfinished() and not paused:
                    if self.replica is not None:
                        self.replica.before_step(engine)
                    self._dispatch(engine.step())
                    if self.replica is not None:
                        self.replica.after_step(engine)
                    self.num_steps += 1
            except Exception as e:  # noqa: BLE001 - the loop must survive anything the engine raises
                logger.exception("engine step failed; failing the %d requests in flight", len(self._sinks))
                self._fail_all(EngineFailure(f"engine step failed: {type(e).__name__}: {e}"))
                if self.replica is not None:  # the processes may have diverged: stop them all
                    self.replica.stop(engine, error=f"engine step failed on process 0: {e}")
                    break
            self._publish()
            if stopping and not engine.has_unfinished():
                if self.replica is not None:
                    self.replica.stop(engine)
                break
        logger.info("engine loop stopped after %d steps", self.num_steps)

    def _apply(self, command: Any) -> None:
        if isinstance(command, _Submit):
            self._admit(command)
        else:
            _, request_ids = command
            for rid in request_ids:
                self._sinks.pop(rid, None)
                if self.engine.abort(rid):
                    logger.info("aborted %s", rid)

    def _prompt_ids(self, spec: PromptSpec) -> list[int] | str:
        tokenizer = self.engine.tokenizer
        if isinstance(spec.prompt, str) and tokenizer is not None:
            return list(tokenizer.encode(spec.prompt, add_special_tokens=spec.add_special_tokens))
        return spec.prompt  # the engine rejects text without a tokenizer, with its own message

    def _admit(self, cmd: _Submit) -> None:
        engine = self.engine
        added: list[str] = []
        prompt_tokens = 0
        try:
            for rid, spec in zip(cmd.request_ids, cmd.specs):
                try:
                    prompt = self._prompt_ids(spec)
                except (UnicodeError, TypeError) as e:
                    raise ValueError(f"prompt: could not be tokenized ({e})") from e
                params = spec.params
                if spec.max_tokens_auto and isinstance(prompt, list):
                    room = min(engine.max_model_len, engine.num_pages * engine.config.page_size) - len(prompt)
                    if room < 1:
                        raise ValueError(f"messages: the prompt ({len(prompt)} tokens) leaves no room to "
                                         f"generate within max_model_len ({engine.max_model_len})")
                    params = dataclasses.replace(params, max_tokens=room)
                engine.add_request(prompt, params, request_id=rid)
                added.append(rid)
                prompt_tokens += len(prompt) if isinstance(prompt, list) else 0
        except Exception as e:  # noqa: BLE001 - bad input: reject the whole batch
            for rid in added:
                engine.abort(rid)
            if not isinstance(e, ValueError):
                logger.warning("rejected a request: %s: %s", type(e).__name__, e)
                e = ValueError(f"prompt: could not be processed ({type(e).__name__}: {e})")
            _post(cmd.loop, _resolve, cmd.admitted, None, e)
            return
        for index, rid in enumerate(cmd.request_ids):
            self._sinks[rid] = _Sink(cmd.loop, cmd.queue, index)
        self.metrics.on_admitted(len(added), prompt_tokens)
        _post(cmd.loop, _resolve, cmd.admitted, True)

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            self.metrics.on_output(out)
            sink = self._sinks.get(out.request_id)
            if sink is None:  # aborted by its client: nobody listens
                continue
            if out.logprobs or (out.finished and out.prompt_logprobs):
                self._learn_token_strings(out)
            if out.finished:
                del self._sinks[out.request_id]
            _post(sink.loop, sink.queue.put_nowait, (sink.index, out))

    def _learn_token_strings(self, out: RequestOutput) -> None:
        tokenizer = self.engine.tokenizer
        entries = out.logprobs[-max(1, len(out.new_token_ids)):] if out.logprobs else []
        if out.finished and out.prompt_logprobs:
            entries = entries + [lp for lp in out.prompt_logprobs if lp is not None]
        for lp in entries:
            for token_id in (lp.token_id, *lp.top):
                if token_id not in self.token_strings:
                    self.token_strings[token_id] = (tokenizer.decode([token_id]) if tokenizer is not None
                                                    else f"token_id:{token_id}")

    def _abort_all(self, reason: str) -> None:
        if self._sinks:
            logger.warning("aborting %d requests: %s", len(self._sinks), reason)
        for rid in list(self._sinks):
            self.engine.abort(rid)  # the final 'abort' output reaches the client at the next step

    def _fail_all(self, error: EngineFailure) -> None:
        sinks, self._sinks = self._sinks, {}
        for rid, sink in sinks.items():
            _post(sink.loop, sink.queue.put_nowait, error)
        # Drop whatever the engine still holds so that it starts clean (the final 'abort' outputs
        # come with the next step and have no reader).
        for seq in list(self.engine.scheduler.running) + list(self.engine.scheduler.waiting):
            try:
                self.engine.abort(seq.request_id)
            except Exception:  # noqa: BLE001
                logger.exception("could not abort %s", seq.request_id)

    def _fail_all_from_watchdog(self, error: EngineFailure) -> None:
        """A peer process died (``replica.Leader``'s watchdog thread; the engine thread may be blocked in a
        collective for good): send ``error`` to every request in flight, give the event loop a moment."""
        for sink in list(self._sinks.values()):
            _post(sink.loop, sink.queue.put_nowait, error)
        time.sleep(1.0)

    def _publish(self) -> None:
        engine = self.engine
        self.metrics.set_engine_state(
            running=len(engine.scheduler.running), waiting=len(engine.scheduler.waiting),
            pages_used=engine.num_pages - engine.num_free_pages, pages_total=engine.num_pages,
            steps=self.num_steps, at=time.monotonic(), spec=engine.spec_metrics())
