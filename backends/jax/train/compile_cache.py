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
    the cache is off (`FTC_COMPILATION_CACHE=0`)."""
    if not jax.config.jax_compilation_cache_dir:
        if os.environ.get(OFF_ENV, "").strip().lower() in ("0", "off", "false", "no"):
            return None
        if several_cpu_devices():
            return None
        from ftc.backends.jax.io.gguf_import import default_cache_root

        jax.config.update("jax_compilation_cache_dir", str(default_cache_root() / "jax"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return jax.config.jax_compilation_cache_dir


def several_cpu_devices() -> bool:
    """Several CPU devices in this process (faked with --xla_force_host_platform_device_count, or
    jax_num_cpu_devices). jax 0.10's XLA:CPU deadlocked there on executables loaded from the cache:
    two executions of one cached program met at the same collective rendezvous (same RunId, op ids 3
    and 107) and XLA aborted after 40 s (tests/objectives/test_dpo.py after the MoE tests, every
    time; not seen with the cache off then). The same abort at the same op ids came later with the
    cache off too: the devices' collectives had filled XLA:CPU's thread pool (host_devices.py now
    sizes it), so the cache may never have been the cause; untested since. ftc leaves the cache off
    on such meshes all the same: they are tests and rehearsals of a pod's mesh, where start-up
    matters least."""
    return jax.default_backend() == "cpu" and jax.device_count() > 1
