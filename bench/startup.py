"""Time jaxserve's start-up, cold (empty compile cache) and then warm, as a new user meets it.

Two commands, each run in a fresh process:

- ``generate``: the README's first command (``jaxserve generate --chat --prompt ...``), wall time until
  the process exits with the answer printed;
- ``serve``: ``jaxserve serve`` at default settings, wall time until ``/health`` answers 200 (polled
  every 0.2 s), then the server is stopped.

The first run uses a fresh compile-cache directory (cold); the following ``--warm-runs`` reuse it.
Each run prints one JSON line; the ``ready``/answer lines of jaxserve's own output are kept in it.

    python3 bench/startup.py generate --model smollm2
    python3 bench/startup.py serve --model /path/to/56m --warm-runs 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def time_generate(model: str, prompt: str, env: dict, extra: list[str]) -> dict:
    cmd = ["jaxserve", "generate", "--chat", "--prompt", prompt, "--model", model, *extra]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode:
        raise SystemExit(f"generate failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return {"seconds": round(wall, 2), "answer": p.stdout.strip()[-200:]}


def health(port: int) -> int | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return None


def time_serve(model: str, env: dict, extra: list[str], timeout: float) -> dict:
    port = free_port()
    cmd = ["jaxserve", "serve", "--model", model, "--port", str(port), "--no-progress", *extra]
    log = tempfile.TemporaryFile(mode="w+")
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    first_503 = None
    try:
        while True:
            if p.poll() is not None:
                log.seek(0)
                raise SystemExit(f"serve exited ({p.returncode}):\n{log.read()[-3000:]}")
            code = health(port)
            now = time.perf_counter() - t0
            if code == 503 and first_503 is None:
                first_503 = now
            if code == 200:
                break
            if now > timeout:
                raise SystemExit(f"serve not ready after {timeout} s")
            time.sleep(0.2)
    finally:
        p.terminate()
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
    log.seek(0)
    ready = [ln.strip() for ln in log if "ready on" in ln]
    return {"seconds": round(now, 2), "health_503_after": first_503 and round(first_503, 2),
            "ready_line": ready[0] if ready else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["generate", "serve"])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--prompt", default="What is the capital of France?")
    ap.add_argument("--warm-runs", type=int, default=2)
    ap.add_argument("--cache-dir", help="compile cache to use (default: a fresh temporary directory)")
    ap.add_argument("--timeout", type=float, default=900.0)
    ap.add_argument("extra", nargs="*", help="more jaxserve arguments (after --)")
    a = ap.parse_args()
    cache = a.cache_dir or tempfile.mkdtemp(prefix="jaxserve-startup-")
    env = dict(os.environ, JAXSERVE_COMPILE_CACHE=cache)
    try:
        for i in range(1 + a.warm_runs):
            kind = "cold" if i == 0 and not a.cache_dir else "warm"
            if a.what == "generate":
                r = time_generate(a.model, a.prompt, env, a.extra)
            else:
                r = time_serve(a.model, env, a.extra, a.timeout)
            print(json.dumps({"command": a.what, "model": a.model, "run": kind, **r}), flush=True)
    finally:
        if not a.cache_dir:
            shutil.rmtree(cache, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
