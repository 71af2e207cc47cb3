"""Several real processes (``jaxserve launch``: jax.distributed on 127.0.0.1, gloo CPU collectives, virtual
CPU devices per process) give the tokens of one process on one device."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import ENGINE_KW, ROOT
from jaxserve import Engine, SamplingParams

PROMPT, MAX_TOKENS = "Hello world, the", 12
ENGINE_FLAGS = ["--max-num-seqs", str(ENGINE_KW["max_num_seqs"]), "--page-size", str(ENGINE_KW["page_size"]),
                "--max-model-len", str(ENGINE_KW["max_model_len"]),
                "--max-num-batched-tokens", str(ENGINE_KW["max_num_batched_tokens"]),
                "--min-prefill-bucket", str(ENGINE_KW["min_prefill_bucket"])]
COMPILE_CACHE: list[str] = []  # one persistent compile cache for this module's launches (same programs)


@pytest.fixture(scope="module", autouse=True)
def shared_compile_cache(tmp_path_factory):
    COMPILE_CACHE.append(str(tmp_path_factory.mktemp("xla-cache")))
    yield
    COMPILE_CACHE.clear()


def launch_env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu")
    env.pop("JAXSERVE_MULTIDEVICE", None)
    env["JAXSERVE_COMPILE_CACHE"] = COMPILE_CACHE[0] if COMPILE_CACHE else "off"
    return env


def run_launch(args: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
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


def own_stdout(proc: subprocess.CompletedProcess, text: str) -> str:
    """stdout less gloo's connection messages, which its C++ code writes on every process in pieces
    ("[Gloo] Rank ", the rank, " is connected to ", ...), so two processes' (and threads') messages can
    interleave mid-message.  They are written when the processes connect, at the first collective, before
    any output: remove the fixed pieces, and what is left before ``text`` at the end is their numbers."""
    out = proc.stdout
    for piece in ("[Gloo] Rank ", " is connected to ", " peer ranks. ", "Expected number of connected peer ranks is : "):
        out = out.replace(piece, "")
    if out.endswith(text) and re.fullmatch(r"[\d\s]*", out[:len(out) - len(text)]):
        return text
    return out


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
    assert own_stdout(proc, ref.text + "\n") == ref.text + "\n"  # once: process 1 writes nothing


def test_bad_flags_are_named(capsys):
    """--distributed without a mesh, and a launch of no process, fail with an error naming the flag."""
    from jaxserve.cli import main

    assert main(["generate", "--distributed", "--model", "unused"]) == 2
    assert main(["launch", "--num-processes", "0", "--", "generate"]) == 2
    assert main(["launch", "--num-processes", "2"]) == 2
    err = capsys.readouterr().err
    assert "--distributed: give --mesh-data" in err and "--num-processes: must be >= 1" in err
    assert "command: give the jaxserve subcommand" in err


def test_launch_exits_nonzero_when_a_process_fails(tmp_path):
    """A process that fails (bad flag value, before any collective) makes the launcher exit non-zero."""
    proc = run_launch(["generate", "--model", str(tmp_path / "missing")], timeout=120)
    assert proc.returncode != 0
    assert re.search(r"process \d exited with status [1-9]", proc.stderr), proc.stderr[-4000:]


# -- serve --distributed --------------------------------------------------------------------------------

class LaunchedServer:
    """``jaxserve launch --num-processes 2 --devices-per-process 4 -- serve ...`` on a free port, in its own
    session (killed whole on failure); the decision-hash check on (JAXSERVE_SYNC_CHECK=1)."""

    def __init__(self, model_dir: str, tmp_path, peer_timeout: float = 15.0, grace: float = 10.0,
                 mesh: tuple[int, int] = (1, 8)):
        from jaxserve.distributed import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.err_path = tmp_path / "serve.err"
        cmd = [sys.executable, "-m", "jaxserve.cli", "launch", "--num-processes", "2", "--devices-per-process", "4",
               "--grace", str(grace), "--", "serve", "--model", model_dir, "--port", str(self.port),
               "--mesh-data", str(mesh[0]), "--mesh-model", str(mesh[1]),
               "--served-model-name", "m", "--no-progress", "--peer-timeout", str(peer_timeout), *ENGINE_FLAGS]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(launch_env(), JAXSERVE_SYNC_CHECK="1"),
                                     stdout=subprocess.DEVNULL, stderr=open(self.err_path, "w"),
                                     start_new_session=True)

    def stderr(self) -> str:
        return "".join(line for line in self.err_path.read_text().splitlines(keepends=True) if "[Gloo]" not in line)

    def wait_ready(self, timeout: float = 400) -> None:
        import urllib.request

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"launch exited {self.proc.returncode}:\n{self.stderr()[-4000:]}"
            try:
                urllib.request.urlopen(self.url + "/health", timeout=2).read()
                return
            except Exception:  # noqa: BLE001 - not up yet
                time.sleep(0.5)
        pytest.fail(f"not ready after {timeout}s:\n{self.stderr()[-4000:]}")

    def rank_pid(self, rank: int) -> int:
        children = open(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read().split()
        for pid in children:
            env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
            if f"JAXSERVE_PROCESS_ID={rank}".encode() in env:
                return int(pid)
        raise AssertionError(f"no process {rank} among {children}")

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"launch did not exit within {timeout}s:\n{self.stderr()[-4000:]}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


# data 2 x model 4: data-parallel attention (each data group its own sequences and KV pages) across processes.
SERVE_MESHES = [pytest.param(2, 4, id="2x4"), pytest.param(1, 8, id="1x8", marks=pytest.mark.slow)]


@pytest.mark.parametrize("data,model", SERVE_MESHES)
def test_serve_two_processes(gqa_dir, tmp_path, data, model):
    """2 processes x 4 devices serving: 32 concurrent streams from the openai client to process 0 give
    Engine.generate's text on one device; a client disconnect aborts on both processes; the scheduler's
    decisions hash the same on both every step; pages are all free on both; SIGTERM stops both with 0."""
    import concurrent.futures

    import openai

    prompts = [f"Request {i} says" for i in range(32)]
    max_tokens = [6 + i % 7 for i in range(32)]
    ref = Engine.from_pretrained(gqa_dir, **ENGINE_KW).generate(
        prompts, [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in max_tokens])
    server = LaunchedServer(gqa_dir, tmp_path, mesh=(data, model))
    try:
        server.wait_ready()
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)

        def stream(i: int) -> str:
            chunks = client.completions.create(model="m", prompt=prompts[i], max_tokens=max_tokens[i],
                                               temperature=0, stream=True, extra_body={"ignore_eos": True})
            return "".join(c.choices[0].text for c in chunks if c.choices)

        def disconnect() -> int:  # reads two chunks of a long request, then hangs up
            chunks = client.completions.create(model="m", prompt="A long one", max_tokens=200, temperature=0,
                                               stream=True, extra_body={"ignore_eos": True})
            got = [next(iter(chunks)) for _ in range(2)]
            chunks.response.close()
            return len(got)

        with concurrent.futures.ThreadPoolExecutor(33) as pool:
            aborted = pool.submit(disconnect)
            texts = list(pool.map(stream, range(32)))
            assert aborted.result() == 2
        assert texts == [o.text for o in ref]
        time.sleep(2)  # the abort's step
        import urllib.request

        text = urllib.request.urlopen(server.url + "/metrics", timeout=10).read().decode()
        assert "jaxserve_cache_pages_used 0" in text.replace(".0", ""), text
        os.killpg(server.proc.pid, 0)  # still alive
        server.proc.send_signal(signal.SIGTERM)  # the launcher forwards it to process 0
        assert server.wait(120) == 0, server.stderr()[-4000:]
        err = server.stderr()
        m = re.search(r"follower 1: (\d+) steps, (\d+) decision hashes checked, (\d+)/(\d+) pages free", err)
        assert m, err[-4000:]
        steps, checked, free, total = map(int, m.groups())
        assert steps > 20 and checked >= steps - 1 and free == total
    finally:
        server.kill()


def test_serve_follower_killed(gqa_dir, tmp_path):
    """Killing process 1 mid-stream ends process 0's in-flight requests with an error, and process 0 (so
    the launcher) exits non-zero within 60 s."""
    import concurrent.futures

    import openai

    server = LaunchedServer(gqa_dir, tmp_path, peer_timeout=5.0, grace=300)  # process 0 must end by itself
    try:
        server.wait_ready()
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        started = concurrent.futures.Future()

        def stream(i: int) -> str:
            try:
                for n, _ in enumerate(client.completions.create(model="m", prompt=f"Long {i}", max_tokens=240,
                                                                 temperature=0, stream=True,
                                                                 extra_body={"ignore_eos": True})):
                    if n == 2 and not started.done():
                        started.set_result(True)
            except (openai.APIError, Exception) as e:  # noqa: BLE001 - the error event, or the connection
                return f"error: {type(e).__name__}: {e}"
            return "completed"

        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            results = [pool.submit(stream, i) for i in range(3)]
            started.result(timeout=120)
            t0 = time.monotonic()
            os.kill(server.rank_pid(1), signal.SIGKILL)
            outcomes = [r.result(timeout=90) for r in results]
        assert all(o.startswith("error") for o in outcomes), outcomes
        assert server.wait(90) != 0
        assert time.monotonic() - t0 < 60, "process 0 took too long"
        assert re.search(r"process 0 exited with status [1-9]", server.stderr()), server.stderr()[-4000:]
    finally:
        server.kill()
