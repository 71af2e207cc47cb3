"""Several JAX processes (``jax.distributed``): start-up, and the launcher of local process groups.

``initialize()`` is what ``--distributed`` calls.  With the variables ``jaxserve launch`` sets
(``JAXSERVE_COORDINATOR``, ``JAXSERVE_NUM_PROCESSES``, ``JAXSERVE_PROCESS_ID``) it joins that group;
without them it calls ``jax.distributed.initialize()`` with no arguments, which finds the coordinator
by itself on a TPU VM, under SLURM or Open MPI.  On the CPU the collectives between processes go
through gloo.

``launch(n, argv)`` (``jaxserve launch --num-processes N [--devices-per-process D] -- SUBCOMMAND ...``)
starts N local processes of ``jaxserve SUBCOMMAND ... --distributed`` (or of ``python SCRIPT.py ...
--distributed``) around a coordinator on 127.0.0.1, each with D virtual CPU devices when D is given:
for tests on one machine, and for one host with several GPUs.  SIGTERM and SIGINT go to process 0
(a server drains and stops the others); the launcher exits with the first non-zero exit status of a
process, after giving the others ``grace_s`` to end by themselves.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time

logger = logging.getLogger(__name__)

ENV_COORDINATOR = "JAXSERVE_COORDINATOR"
ENV_NUM_PROCESSES = "JAXSERVE_NUM_PROCESSES"
ENV_PROCESS_ID = "JAXSERVE_PROCESS_ID"


def initialize() -> None:
    """``jax.distributed.initialize`` from ``jaxserve launch``'s variables, else auto-detected."""
    import jax

    if jax.distributed.is_initialized():
        return
    coordinator = os.environ.get(ENV_COORDINATOR)
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if coordinator is None:
        if platforms == "cpu":
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize()
    else:
        try:
            num_processes = int(os.environ[ENV_NUM_PROCESSES])
            process_id = int(os.environ[ENV_PROCESS_ID])
        except (KeyError, ValueError) as e:
            raise ValueError(f"{ENV_NUM_PROCESSES} and {ENV_PROCESS_ID}: must be integers when {ENV_COORDINATOR} "
                             f"is set ({e})") from None
        if platforms in ("", "cpu"):
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id)
    logger.info("jax.distributed: process %d of %d, %d local of %d devices", jax.process_index(),
                jax.process_count(), jax.local_device_count(), jax.device_count())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_command(argv: list[str]) -> list[str]:
    """The command line of one process: ``jaxserve ARGV --distributed`` or ``python SCRIPT.py ARGS
    --distributed`` (the flag is added when missing)."""
    if not argv:
        raise ValueError("command: give the jaxserve subcommand (or a python script) after '--'")
    cmd = list(argv)
    if "--distributed" not in cmd:
        cmd.append("--distributed")
    if cmd[0].endswith(".py"):
        return [sys.executable, *cmd]
    return [sys.executable, "-m", "jaxserve.cli", *cmd]


def process_env(rank: int, num_processes: int, coordinator: str, devices_per_process: int | None,
                base: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    env.update({ENV_COORDINATOR: coordinator, ENV_NUM_PROCESSES: str(num_processes), ENV_PROCESS_ID: str(rank)})
    if devices_per_process is not None:  # virtual CPU devices
        flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
        env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices_per_process}"])
        env.setdefault("JAX_PLATFORMS", "cpu")
    return env


def launch(num_processes: int, argv: list[str], devices_per_process: int | None = None, port: int | None = None,
           grace_s: float = 90.0) -> int:
    """Run ``argv`` as ``num_processes`` local processes of one ``jax.distributed`` group; returns
    0 if all exit 0, else the first non-zero exit status."""
    if num_processes < 1:
        raise ValueError(f"--num-processes: must be >= 1, got {num_processes}")
    if devices_per_process is not None and devices_per_process < 1:
        raise ValueError(f"--devices-per-process: must be >= 1, got {devices_per_process}")
    cmd = process_command(argv)
    coordinator = f"127.0.0.1:{port or free_port()}"
    procs = [subprocess.Popen(cmd, env=process_env(rank, num_processes, coordinator, devices_per_process))
             for rank in range(num_processes)]
    logger.info("launched %d processes (pids %s), coordinator %s: %s", num_processes,
                [p.pid for p in procs], coordinator, " ".join(cmd))

    def forward(signum, _frame):  # process 0 stops the others (serve) or all end on their own (generate)
        if procs[0].poll() is None:
            procs[0].send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    status = 0
    failed_at = None
    reported: set[int] = set()
    try:
        while len(reported) < len(procs):
            for rank, p in enumerate(procs):
                rc = p.poll()
                if rc is None or rank in reported:
                    continue
                reported.add(rank)
                print(f"jaxserve launch: process {rank} exited with status {rc}", file=sys.stderr, flush=True)
                if rc != 0 and status == 0:
                    status = rc if rc > 0 else 128 - rc
                    failed_at = time.monotonic()
            if failed_at is not None and time.monotonic() - failed_at > grace_s:
                for p in procs:
                    if p.poll() is None:
                        p.kill()
            time.sleep(0.2)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    return status
