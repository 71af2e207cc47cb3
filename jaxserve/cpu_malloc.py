"""glibc malloc settings for serving on the CPU, applied when jaxserve is imported (before JAX starts the
threads of its CPU client, after which glibc no longer takes them).

XLA CPU allocates a step's temporary buffers afresh on every execution (51 MB at 32 decode rows of the
56m model, about 100 MB at 64).  glibc serves allocations that large with ``mmap`` and returns them with
``munmap``, or, from a thread's arena, trims them back to the kernel: every step then page-faults its
buffers in again (about 5,000 faults, 20 MB, per 64-row decode step; ``exc_page_fault``, ``clear_page``
and the memory cgroup's accounting were several percent of a ``perf record`` of a benchmark).  With one
arena, no ``mmap`` for large blocks and no trimming, freed blocks stay in the heap and the next step reuses
them.  ``python bench/step_profile.py --model /work/models/56m --batches 32,64 --contexts 128
--no-attention-off --steps 20``, with ``JAXSERVE_CPU_MALLOC=off`` then without, twice (2026-12-03, 2-core
Xeon): a decode step of 32 rows 21.8 / 21.1 -> 18.9 / 18.4 ms, of 64 rows 36.9 / 37.8 -> 31.8 / 32.6 ms;
the page faults of a 64-row step went from ~5,000 to ~1.  The cost: a process never returns freed heap memory to the kernel (its RSS stays at its peak),
and all threads share one arena.

``JAXSERVE_CPU_MALLOC``: ``auto`` (the default: on Linux with glibc, when the host has no GPU or TPU
device file, i.e. the engine will run on the CPU), ``on`` or ``off``.
"""

from __future__ import annotations

import ctypes
import glob
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8  # glibc's mallopt parameters (malloc.h)
SETTINGS = {"arena_max": (M_ARENA_MAX, 1), "mmap_max": (M_MMAP_MAX, 0), "trim_threshold": (M_TRIM_THRESHOLD, 2**31 - 1)}
MODES = ("auto", "on", "off")

applied: dict[str, int] | None = None  # what ``tune`` set in this process (None: nothing)


def accelerator_device_files() -> list[str]:
    """The host's GPU / TPU device files (NVIDIA, TPU v4+ accel, TPU VFIO)."""
    return sorted(glob.glob("/dev/nvidia[0-9]*") + glob.glob("/dev/accel[0-9]*") + glob.glob("/dev/vfio/[0-9]*"))


def should_tune(mode: str, platform: str = sys.platform) -> bool:
    if mode not in MODES:
        raise ValueError(f"JAXSERVE_CPU_MALLOC: one of {', '.join(MODES)}, got {mode!r}")
    if mode == "off" or not platform.startswith("linux"):
        return False
    return mode == "on" or not accelerator_device_files()


def tune(mode: str | None = None) -> dict[str, int] | None:
    """Apply ``SETTINGS`` with ``mallopt`` when ``should_tune`` says so (``mode``: default the environment's
    ``JAXSERVE_CPU_MALLOC``); returns what was set, or None."""
    global applied
    if not should_tune(mode or os.environ.get("JAXSERVE_CPU_MALLOC", "auto")):
        return None
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return None
    applied = {name: value for name, (param, value) in SETTINGS.items() if mallopt(param, value) == 1}
    return applied
