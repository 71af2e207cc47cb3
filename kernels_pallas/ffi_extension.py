"""Loading a CPU kernel's compiled extension (``csrc/*/``, built by ``pip install -e .``): import it, and register
its XLA FFI handlers (the ``registrations()`` dict, ``csrc/ffi_module.h``) for the CPU platform."""

from __future__ import annotations

import importlib
from typing import Any, Callable

import jax


def load_extension(name: str, unusable: Callable[[Any], str | None] | None = None) -> tuple[Any | None, str | None]:
    """(the module ``kernels_pallas.<name>``, None) once its handlers are registered with XLA, or (None, why
    not): not built, or ``unusable(module)`` says why this CPU cannot run it."""
    try:
        module = importlib.import_module(f"kernels_pallas.{name}")
    except ImportError as e:
        return None, f"the extension kernels_pallas.{name} is not built ({e}); `pip install -e .` builds it"
    why = unusable(module) if unusable is not None else None
    if why is not None:
        return None, why
    for target, capsule in module.registrations().items():
        jax.ffi.register_ffi_target(target, capsule, platform="cpu")
    return module, None
