"""Serving from several processes (``serve --distributed``): every process runs the same engine loop.

Process 0 (the leader) runs the HTTP front end and the ``EngineLoop``; the others (followers) run
``follow``.  The scheduler is replicated (README, Multi-host): given the same requests in the same order
at the same step, every process packs the same step.  So the only thing delivered is the request stream:

* The engine records every request it admits (token ids and final sampling parameters, its seed drawn)
  and every abort in ``engine.op_log`` (``record_ops``).
* Before each step the leader puts the ops since the last step into jax.distributed's key-value store
  under ``jaxserve/step/N`` (``Leader.before_step``); each follower waits for key N, replays the ops
  (``Engine.add_request`` / ``Engine.abort``) and runs its step N.  The last message says stop.
* With ``check`` (``JAXSERVE_SYNC_CHECK=1``; the tests set it) message N carries the leader's hash of the
  scheduler's decisions after step N-1 (``decision_hash``), and a follower whose own hash differs stops
  with an error.
* A step that fails on the leader (e.g. a collective whose peer died) fails its requests and ends every
  process with exit status 1: the processes can no longer be trusted to agree.
* Liveness: every process writes a heartbeat key each second.  A leader that sees a follower's heartbeat
  stall for ``peer_timeout_s`` fails its in-flight requests (503) and exits 1: collectives with a dead
  process would block forever.  A follower exits 1 when the leader (whose process hosts the key-value
  store) is gone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import pickle
import threading
import time
from typing import Any, Callable

logger = logging.getLogger(__name__)

PREFIX = "jaxserve"
CHECK_ENV = "JAXSERVE_SYNC_CHECK"
HEARTBEAT_S = 1.0
KEEP_STEPS = 1000  # step messages older than this are deleted from the store


def _client():
    from jax._src import distributed

    client = distributed.global_state.client
    if client is None:
        raise RuntimeError("serve --distributed: jax.distributed is not initialized")
    return client


def check_enabled() -> bool:
    return os.environ.get(CHECK_ENV, "") not in ("", "0")


def decision_hash(engine: Any) -> str:
    """A hash of the scheduler's state after a step: each running sequence's progress, output and pages,
    the waiting queue, the free page count."""
    s = engine.scheduler
    h = hashlib.blake2b(digest_size=8)
    for seq in s.running:
        h.update(repr((seq.request_id, seq.num_computed_tokens, seq.output_token_ids[-1:],
                       len(seq.output_token_ids), list(seq.page_ids))).encode())
    h.update(repr(([seq.request_id for seq in s.waiting], engine.num_free_pages)).encode())
    return h.hexdigest()


def record_ops(engine: Any) -> None:
    """Make ``engine`` log its admissions and aborts to ``engine.op_log`` (drained by ``Leader``)."""
    engine.op_log = []


def replay(engine: Any, ops: list[tuple]) -> None:
    for op in ops:
        if op[0] == "add":
            _, rid, token_ids, params = op
            engine.add_request(token_ids, params, request_id=rid)
        else:
            engine.abort(op[1])


@dataclasses.dataclass
class StepStats:
    steps: int = 0
    publish_s: float = 0.0  # leader: putting the messages into the store
    receive_s: float = 0.0  # follower: waiting for and reading them (includes waiting for the leader)
    checked: int = 0  # decision hashes compared


class _Heartbeat:
    def __init__(self, client, rank: int):
        self.client, self.rank, self.beats = client, rank, 0
        self.stop = threading.Event()
        threading.Thread(target=self._run, name="jaxserve-heartbeat", daemon=True).start()

    def _run(self) -> None:
        while not self.stop.is_set():
            self.beats += 1
            try:
                self.client.key_value_set(f"{PREFIX}/alive/{self.rank}", str(self.beats), allow_overwrite=True)
            except Exception as e:  # noqa: BLE001 - the store (process 0) is gone
                if self.stop.is_set():
                    return
                logger.error("process %d: the coordinator is gone (%s); exiting", self.rank, e)
                os._exit(1)
            self.stop.wait(HEARTBEAT_S)


class Leader:
    """Process 0's side: publishes each step's ops, watches the followers' heartbeats."""

    def __init__(self, num_processes: int, peer_timeout_s: float = 15.0, check: bool | None = None):
        self.client = _client()
        self.num_processes = num_processes
        self.check = check_enabled() if check is None else check
        self.peer_timeout_s = peer_timeout_s
        self.stats = StepStats()
        self._digest: str | None = None
        self._heartbeat = _Heartbeat(self.client, 0)
        self.on_peer_failure: Callable[[str], None] | None = None
        self._stopped = threading.Event()
        threading.Thread(target=self._watch, name="jaxserve-watchdog", daemon=True).start()

    def before_step(self, engine: Any, stop: bool = False, error: str | None = None) -> None:
        ops, engine.op_log = engine.op_log, []
        n = self.stats.steps
        t0 = time.perf_counter()
        msg = pickle.dumps({"ops": ops, "stop": stop, "error": error, "digest": self._digest, "check": self.check})
        self.client.key_value_set_bytes(f"{PREFIX}/step/{n}", msg)
        if n >= KEEP_STEPS:
            self.client.key_value_delete(f"{PREFIX}/step/{n - KEEP_STEPS}")
        self.stats.publish_s += time.perf_counter() - t0
        self.stats.steps += 1

    def after_step(self, engine: Any) -> None:
        if self.check:
            self._digest = decision_hash(engine)

    def stop(self, engine: Any, error: str | None = None) -> None:
        """The last message: the followers replay what is left, check the last hash and exit."""
        if self._stopped.is_set():
            return
        try:
            self.before_step(engine, stop=True, error=error)
        except Exception:  # noqa: BLE001 - the store is unreachable: the followers fail on their own
            logger.exception("could not tell the other processes to stop")
        self._stopped.set()
        self._heartbeat.stop.set()
        logger.info("leader: %d step messages, %.2f ms each to publish", self.stats.steps,
                    1e3 * self.stats.publish_s / max(1, self.stats.steps))
        if error is not None:  # the group cannot go on (a peer died mid-step, or the processes may differ)
            logger.error("process 0 exits: %s", error)
            time.sleep(1.0)  # the requests' error events reach their clients
            os._exit(1)

    def _watch(self) -> None:
        last: dict[int, tuple[str | None, float]] = {}
        while not self._stopped.wait(HEARTBEAT_S):
            now = time.monotonic()
            for rank in range(1, self.num_processes):
                try:
                    beat = self.client.key_value_try_get(f"{PREFIX}/alive/{rank}")
                except Exception:  # noqa: BLE001 - not written yet
                    beat = None
                prev = last.get(rank)
                if prev is None or prev[0] != beat:
                    last[rank] = (beat, now)
                elif beat is not None and now - prev[1] > self.peer_timeout_s:
                    reason = f"process {rank} stopped responding (no heartbeat for {now - prev[1]:.0f}s)"
                    logger.error("%s: failing the requests in flight and exiting", reason)
                    if self.on_peer_failure is not None:
                        self.on_peer_failure(reason)
                    os._exit(1)


def follow(engine: Any, warmup: bool = True, progress: bool = False) -> int:
    """A follower's engine loop: replay each step's ops, step, until the leader says stop.  Returns the
    exit status (0 after the leader's stop; 1 after its error or a diverged scheduler)."""
    import jax

    client = _client()
    rank = jax.process_index()
    heartbeat = _Heartbeat(client, rank)
    stats = StepStats()
    if warmup:  # the leader compiles every bucket before it serves; so does each follower
        engine.warmup(progress=progress)
    digest = None
    status = 0
    try:
        while True:
            t0 = time.perf_counter()
            key = f"{PREFIX}/step/{stats.steps}"
            while True:
                try:
                    raw = client.blocking_key_value_get_bytes(key, 1000)
                    break
                except Exception as e:  # noqa: BLE001
                    if "DEADLINE_EXCEEDED" not in str(e) and "timed out" not in str(e).lower():
                        raise
            msg = pickle.loads(raw)
            stats.receive_s += time.perf_counter() - t0
            if msg["digest"] is not None:
                if msg["digest"] != digest:
                    logger.error("process %d: the scheduler diverged from process 0 before step %d (%s != %s)",
                                 rank, stats.steps, digest, msg["digest"])
                    return 1
                stats.checked += 1
            replay(engine, msg["ops"])
            stats.steps += 1
            if msg["stop"]:
                if msg["error"]:
                    logger.error("process 0 stopped: %s", msg["error"])
                    status = 1
                break
            engine.step()
            if msg["check"]:
                digest = decision_hash(engine)
    finally:
        heartbeat.stop.set()
    print(f"follower {rank}: {stats.steps} steps, {stats.checked} decision hashes checked, "
          f"{engine.num_free_pages}/{engine.num_pages} pages free, "
          f"{1e3 * stats.receive_s / max(1, stats.steps):.2f} ms per step receiving (waits included)",
          file=__import__("sys").stderr, flush=True)
    return status
