"""JAX's persistent compilation cache, on by default, in a per-user directory.

``EngineConfig.compile_cache_dir``:

* ``"auto"`` (the default): ``$JAXSERVE_COMPILE_CACHE`` if set (``off``/``0``/``none`` or an empty
  value turn the cache off), else ``$XDG_CACHE_HOME/jaxserve/xla`` or ``~/.cache/jaxserve/xla``;
* a path: that directory;
* ``None``: no persistent cache.

Every step program is cached (``jax_persistent_cache_min_compile_time_secs=0``, no minimum entry
size), so a second start of the same model with the same settings loads its programs instead of
compiling them.  Whether a program came from the cache is counted from JAX's monitoring event
``/jax/compilation_cache/cache_hits`` (emitted in the thread that compiles; counted per thread).

The cache is trusted code: a directory others can write to lets them run code in this process, so
it lives under the user's own cache home.
"""

from __future__ import annotations

import logging
import os
import threading

import jax

logger = logging.getLogger(__name__)

AUTO = "auto"
ENV = "JAXSERVE_COMPILE_CACHE"
_OFF = ("", "0", "off", "none", "false", "no")
HIT_EVENT = "/jax/compilation_cache/cache_hits"

_counts = threading.local()
_listener_lock = threading.Lock()
_listening = False


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "jaxserve", "xla")


def resolve_cache_dir(value: str | None = AUTO) -> str | None:
    """The directory ``value`` means (see the module doc), or None for no cache."""
    if value is None:
        return None
    if value == AUTO:
        env = os.environ.get(ENV)
        if env is not None:
            return None if env.strip().lower() in _OFF else os.path.abspath(os.path.expanduser(env))
        return default_cache_dir()
    return os.path.abspath(os.path.expanduser(value))


def _on_event(event: str, **_kwargs) -> None:
    if event == HIT_EVENT:
        _counts.hits = getattr(_counts, "hits", 0) + 1


def thread_cache_hits() -> int:
    """Cache hits of compiles run by this thread so far (take a difference around a compile)."""
    return getattr(_counts, "hits", 0)


def _listen() -> None:
    global _listening
    with _listener_lock:
        if not _listening:
            jax.monitoring.register_event_listener(_on_event)
            _listening = True


def configure(value: str | None = AUTO) -> str | None:
    """Point JAX's persistent compilation cache at the directory ``value`` means (or turn it off);
    returns the directory in use, or None.  Process-wide: the last engine configured wins."""
    from jax._src import compilation_cache as cc

    path = resolve_cache_dir(value)
    _listen()
    current = jax.config.jax_compilation_cache_dir
    if path is not None:
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as e:
            logger.warning("compile cache: cannot create %s (%s); compiling without a persistent cache", path, e)
            path = None
    if path is None:
        if current is not None:
            jax.config.update("jax_compilation_cache_dir", None)
            cc.reset_cache()
        return None
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    jax.config.update("jax_enable_compilation_cache", True)
    if current != path:
        jax.config.update("jax_compilation_cache_dir", path)
        cc.reset_cache()
    return path
