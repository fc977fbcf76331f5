"""Threads enough for the collectives of several CPU devices in one process.

Fake CPU devices (`XLA_FLAGS=--xla_force_host_platform_device_count=N` or `JAX_NUM_CPU_DEVICES=N`:
how ftc's tests and a laptop rehearsal of a pod's mesh run) share XLA:CPU's one intra-op thread
pool, which XLA sizes max(N, cores). An in-process collective blocks the pool thread it runs on
until every device's part has arrived, and one device can have several collectives in flight at
once (one at the top level of the step, one inside the scanned layer loop). So the pool can fill
with waiting parts while the parts they wait for sit queued behind them, and XLA aborts the
process after 40 s ("Termination timeout for all reduce ... only 1 of them arrived"). Seen on
jax 0.10.2, 2 cores, 8 devices, a DPO step on an (fsdp 4, tensor 2) mesh: a gdb dump of the stuck
process had all 8 pool threads and 2 launch threads in AllReduce, 6 devices' launches waiting on
queued work. Of three pairs of such processes run side by side, each pair hung (4 of the 6
processes, after 2-17 runs each, with the compile-ahead thread or without); with 4 threads per
device, 140 runs (80 of them without the compile-ahead thread) and no hang (2026-12-01;
`python -m bench.fake_devices_hang [--pool 8] [--no-ahead]`).

XLA reads the pool's size from PJRT_NPROC when it creates the CPU client, so `reserve` sets it
before that: at the import of ftc's JAX backend (backends/jax/__init__.py). A PJRT_NPROC or NPROC
the user set stays as set; one real device (or none asked for) changes nothing.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, MutableMapping

THREADS_PER_DEVICE = 4
_FLAG = re.compile(r"--xla_force_host_platform_device_count=(\d+)")


def fake_cpu_devices(environ: Mapping[str, str]) -> int:
    """How many CPU devices the environment asks XLA to fake (1 when it asks for none)."""
    counts = [int(n) for n in _FLAG.findall(environ.get("XLA_FLAGS", ""))]
    if counts:
        return counts[-1]  # XLA's flag parser keeps the last
    try:
        return int(environ.get("JAX_NUM_CPU_DEVICES", "1"))
    except ValueError:
        return 1  # jax itself reports a malformed value


def pool_threads(environ: Mapping[str, str], cores: int | None = None) -> int | None:
    """The PJRT_NPROC to set, or None where nothing should change."""
    if "PJRT_NPROC" in environ or "NPROC" in environ:
        return None
    devices = fake_cpu_devices(environ)
    if devices <= 1:
        return None
    return max(cores or os.cpu_count() or 1, THREADS_PER_DEVICE * devices)


def reserve(environ: MutableMapping[str, str] = os.environ) -> None:
    """Size XLA:CPU's pool for fake devices' collectives (a no-op once the client exists)."""
    threads = pool_threads(environ)
    if threads is not None:
        environ["PJRT_NPROC"] = str(threads)
