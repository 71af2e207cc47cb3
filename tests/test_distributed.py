"""Several real processes (``jaxserve launch``: jax.distributed on 127.0.0.1, gloo CPU collectives, virtual
CPU devices per process) give the tokens of one process on one device."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import ENGINE_KW, ROOT
from jaxserve import Engine, SamplingParams

PROMPT, MAX_TOKENS = "Hello world, the", 12
ENGINE_FLAGS = ["--max-num-seqs", str(ENGINE_KW["max_num_seqs"]), "--page-size", str(ENGINE_KW["page_size"]),
                "--max-model-len", str(ENGINE_KW["max_model_len"]),
                "--max-num-batched-tokens", str(ENGINE_KW["max_num_batched_tokens"]),
                "--min-prefill-bucket", str(ENGINE_KW["min_prefill_bucket"]), "--no-compile-cache"]


def launch_env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu")
    env.pop("JAXSERVE_MULTIDEVICE", None)
    return env


def run_launch(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "jaxserve.cli", "launch", "--num-processes", "2", "--devices-per-process", "4",
           "--grace", "10", "--", *args]
    # start_new_session: on a timeout the whole group (launcher and its processes) is killed.
    proc = subprocess.Popen(cmd, cwd=ROOT, env=launch_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        out, err = proc.communicate()
        pytest.fail(f"launch timed out after {timeout}s:\n{err[-4000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def own_stdout(proc: subprocess.CompletedProcess) -> str:
    """stdout less gloo's connection lines (written by its C++ code, on every process)."""
    return "".join(line for line in proc.stdout.splitlines(keepends=True) if not line.startswith("[Gloo]"))


MESHES = [pytest.param(1, 8, id="1x8"), pytest.param(2, 4, id="2x4", marks=pytest.mark.slow)]


@pytest.mark.parametrize("data,model", MESHES)
def test_generate_two_processes_equals_one_device(gqa_dir, data, model):
    """2 processes x 4 devices, mesh data x model: generate's text equals one process on one device, and only
    process 0 writes it."""
    ref = Engine.from_pretrained(gqa_dir, **ENGINE_KW).generate(
        PROMPT, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True))[0]
    proc = run_launch(["generate", "--model", gqa_dir, "--prompt", PROMPT, "--max-tokens", str(MAX_TOKENS),
                       "--ignore-eos", "--mesh-data", str(data), "--mesh-model", str(model), *ENGINE_FLAGS])
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert own_stdout(proc) == ref.text + "\n"  # once: process 1 writes nothing


def test_launch_exits_nonzero_when_a_process_fails(tmp_path):
    """A process that fails (bad flag value, before any collective) makes the launcher exit non-zero."""
    proc = run_launch(["generate", "--model", str(tmp_path / "missing")], timeout=120)
    assert proc.returncode != 0
    assert "exited with status" in proc.stderr
