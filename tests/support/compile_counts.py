"""Counting XLA compiles: a test that asserts how often something compiles turns the session's
persistent compilation cache (tests/conftest.py) off for itself, so that a program compiled again
is seen as a compile, not hidden by a cache hit."""

from __future__ import annotations

import contextlib

import jax
from jax.experimental.compilation_cache import compilation_cache

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@contextlib.contextmanager
def persistent_cache_off():
    was = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()  # jax decides once per process whether the cache is used
    try:
        yield
    finally:
        jax.config.update("jax_enable_compilation_cache", was)
        compilation_cache.reset_cache()


@contextlib.contextmanager
def compiles_seen():
    """The list of (function name, thread name) of every XLA compile inside the block, jitted
    functions and eager ops alike, with the persistent cache off."""
    import threading

    seen = []

    def listen(event, _seconds, **kw):
        if event == COMPILE_EVENT:
            seen.append((kw.get("fun_name", "?"), threading.current_thread().name))

    with persistent_cache_off():
        jax.monitoring.register_event_duration_secs_listener(listen)
        try:
            yield seen
        finally:
            jax.monitoring.unregister_event_duration_listener(listen)
