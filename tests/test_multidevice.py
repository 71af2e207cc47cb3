"""Runs each module of tests/multidevice in its own process with 8 virtual CPU devices.

XLA creates virtual host devices only if ``XLA_FLAGS`` asks before jax initialises, and this
process has already initialised jax with one device, hence the subprocess per module.
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys

import pytest

from conftest import MULTIDEVICE_ENV, ROOT

pytestmark = pytest.mark.skipif(os.environ.get("JAXSERVE_MULTIDEVICE") == "1",
                                reason="already in a multi-device process (no nested runs)")
MODULES = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "tests", "multidevice", "test_*.py")))


@pytest.mark.parametrize("module", MODULES, ids=[os.path.basename(m) for m in MODULES])
def test_multidevice_module(module):
    env = dict(os.environ, **MULTIDEVICE_ENV, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {MULTIDEVICE_ENV['XLA_FLAGS']}".strip()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", module],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{module} failed on 8 virtual devices:\n{output[-6000:]}"
    assert " passed" in output and " skipped" not in output, output[-2000:]
