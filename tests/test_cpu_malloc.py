"""jaxserve/cpu_malloc.py: glibc's malloc is tuned at import on a host without accelerators (so that XLA
CPU's per-step buffers are reused instead of page-faulted in again), never when asked not to, and a bad
``JAXSERVE_CPU_MALLOC`` names the variable."""

from __future__ import annotations

import subprocess
import sys

import pytest

from jaxserve import cpu_malloc


def test_should_tune(monkeypatch):
    monkeypatch.setattr(cpu_malloc, "accelerator_device_files", lambda: [])
    assert cpu_malloc.should_tune("auto", "linux") and cpu_malloc.should_tune("on", "linux")
    assert not cpu_malloc.should_tune("off", "linux")
    assert not cpu_malloc.should_tune("auto", "darwin") and not cpu_malloc.should_tune("on", "win32")
    monkeypatch.setattr(cpu_malloc, "accelerator_device_files", lambda: ["/dev/accel0"])  # a TPU VM
    assert not cpu_malloc.should_tune("auto", "linux")
    assert cpu_malloc.should_tune("on", "linux")
    with pytest.raises(ValueError, match="JAXSERVE_CPU_MALLOC"):
        cpu_malloc.should_tune("yes", "linux")


@pytest.mark.parametrize("mode", ["on", "off"])
def test_import_applies_the_settings_unless_off(mode):
    code = "import jaxserve; from jaxserve import cpu_malloc; print(cpu_malloc.applied)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"JAXSERVE_CPU_MALLOC": mode, "JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})
    if mode == "off" or not sys.platform.startswith("linux"):
        assert out.stdout.strip() == "None"
    else:  # glibc accepted every setting
        assert out.stdout.strip() == repr({name: value for name, (_, value) in cpu_malloc.SETTINGS.items()})
