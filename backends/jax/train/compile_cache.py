"""JAX's persistent compilation cache for ftc's commands: a second start of the same step (a
resumed or repeated run, `ftc generate` on the same model) loads the executable instead of
compiling it again. Light to import, so benchmarks time the same start-up `ftc run` has."""

from __future__ import annotations

import os

import jax

# FTC_COMPILATION_CACHE=0 (or off/false/no) leaves jax's cache off, unless the user set their own.
OFF_ENV = "FTC_COMPILATION_CACHE"


def use_compilation_cache() -> str | None:
    """Keep compiled programs in JAX's persistent cache: `$FTC_CACHE/jax` (default
    `~/.cache/ftc/jax`), or the user's own `JAX_COMPILATION_CACHE_DIR`, which stays as set.
    Every program is kept however fast it compiled (jax keeps only those over 1 s by default; on
    CPU the many sub-second ones add up at start-up). Returns the directory in use, or None when
    the cache is off (`FTC_COMPILATION_CACHE=0`). Used on fake CPU device meshes too: ftc once left the
    cache off there after an XLA abort at a collective, which was XLA:CPU's thread pool filling up
    (host_devices.py sizes it now); the whole test suite, on 8 fake devices, runs with a cache on."""
    if not jax.config.jax_compilation_cache_dir:
        if os.environ.get(OFF_ENV, "").strip().lower() in ("0", "off", "false", "no"):
            return None
        from ftc.backends.jax.io.gguf_import import default_cache_root

        jax.config.update("jax_compilation_cache_dir", str(default_cache_root() / "jax"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return jax.config.jax_compilation_cache_dir
