"""Large host allocations on transparent huge pages (glibc's malloc, Linux), for the commands
that run JAX programs on the host.

XLA:CPU allocates each execution's temporaries (activations, gradients: 366 MiB a step for
bench/'s cpu config, GiBs for a real model) as one `posix_memalign` from a worker thread. glibc
serves a request that large from a fresh `mmap` and unmaps it on free, so every train step maps
every page of it anew: 94k page faults and ~190 ms of system CPU a step on bench/'s cpu config
(2026-12-01). With glibc's `glibc.malloc.hugetlb=1` tunable the same mappings are advised onto
2 MiB transparent huge pages: 93,850 faults a step become 356, and the step is 11-17% faster (bench/README.md,
"Changes for issue #14"; `minor_faults_per_step` in bench.train_speed's JSON). Two other ways were
measured and not taken: keeping freed memory in one arena (`mallopt`: no faults at all, but one
arena for every thread made XLA's compile 1.6 s slower), and no `mmap` alone (thread arenas still
`mmap` past 64 MiB).

glibc reads tunables when a process starts, so `ftc` re-executes itself once with the tunable
added to GLIBC_TUNABLES (same PID, same arguments) for the commands in JAX_COMMANDS. Left alone
where glibc.malloc tunables are set already, with FTC_HOST_ALLOCATOR=default, off Linux/glibc,
and where the kernel has transparent huge pages off.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping, Sequence

JAX_COMMANDS = frozenset({"run", "generate", "chat", "eval"})
TUNABLE = "glibc.malloc.hugetlb=1"
_THP = "/sys/kernel/mm/transparent_hugepage/enabled"


def tuned_environ(environ: Mapping[str, str], thp_setting: str | None = None) -> dict | None:
    """The environment to restart with, or None where nothing should change. `thp_setting`: the
    kernel's transparent-huge-page mode line (default: read from /sys)."""
    if environ.get("FTC_HOST_ALLOCATOR", "").lower() in ("default", "restarted"):
        return None  # asked for glibc's defaults, or restarted once already (whatever glibc kept)
    tunables = environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc." in tunables:  # the user's (or our own, after the restart)
        return None
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    if thp_setting is None:
        try:
            with open(_THP) as f:
                thp_setting = f.read()
        except OSError:
            return None
    if "[never]" in thp_setting:
        return None
    tuned = f"{tunables}:{TUNABLE}" if tunables else TUNABLE
    # A setuid interpreter drops GLIBC_TUNABLES on exec: the marker still stops a second restart.
    return {**environ, "GLIBC_TUNABLES": tuned, "FTC_HOST_ALLOCATOR": "restarted"}


def command_of(args: Sequence[str]) -> str | None:
    """The subcommand in `ftc`'s arguments (the first one that is not an option)."""
    for a in args:
        if not a.startswith("-"):
            return a
    return None


def restart_tuned(args: Sequence[str] | None = None) -> None:
    """Re-execute this Python process with the tuned environment when `ftc`'s subcommand runs
    JAX programs; returns without doing anything otherwise (and after the restart)."""
    args = sys.argv[1:] if args is None else args
    if command_of(args) not in JAX_COMMANDS:
        return
    env = tuned_environ(os.environ)
    if env is None:
        return
    # orig_argv keeps the interpreter's own flags and how ftc was started (script, -m, -c).
    argv = [sys.executable, *sys.orig_argv[1:]]
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, argv, env)
    except OSError:
        return  # cannot restart (e.g. a sandbox): run with glibc's defaults
