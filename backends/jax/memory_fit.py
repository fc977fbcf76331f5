"""Whether a plan's memory estimate fits the machine `ftc run` is on, checked before any weight
is loaded or batch built.

A spec that asks for far more memory than there is (a max_seq_len of a billion tokens, a batch
of thousands) used to run until the kernel's OOM killer ended the process with SIGKILL: no message,
and on a shared machine other processes could go with it. The plan's per-device estimate
(compiler/memory.py) is within about 15% of the measured buffers (bench/README.md: 1.11x on the
cpu config since the norms and activations are recomputed, 0.92x before), so a run is refused only
when the estimate is over MARGIN times the memory there is: a spec that would fit is never refused
for the estimate's error, and one that asks for far more still is. Devices: an accelerator's `bytes_limit`; the
CPU "devices" of one host share its memory (the smaller of MemTotal and the cgroup's limit).
FTC_MEMORY_CHECK=0 skips the check (an estimate is an estimate).
"""

from __future__ import annotations

import os
from pathlib import Path

from ftc.compiler.report import human_bytes

ENV = "FTC_MEMORY_CHECK"
MARGIN = 1.25


def host_memory_bytes() -> tuple[int | None, str]:
    """(bytes this process may use on this host, where that figure comes from)."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        total = None
    source = "the host's memory"
    try:  # a container's limit (cgroup v2), lower than the host's memory when set
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit.isdigit() and (total is None or int(limit) < total):
            total, source = int(limit), "the cgroup's memory.max"
    except OSError:
        pass
    return total, source


def device_memory_bytes(device) -> tuple[int | None, str]:
    """(bytes one accelerator's allocator may hand out, where that figure comes from)."""
    try:
        stats = device.memory_stats() or {}
    except Exception:  # noqa: BLE001 - a backend without memory stats: nothing to check against
        return None, ""
    limit = stats.get("bytes_limit")
    return (int(limit), f"{device.platform} bytes_limit") if limit else (None, "")


def memory_problem(per_device: int, devices: list) -> str | None:
    """Why `per_device` bytes on each of `devices` (this process's) cannot fit, or None."""
    if os.environ.get(ENV, "1") == "0" or not devices:
        return None
    if devices[0].platform == "cpu":
        need, (have, source) = per_device * len(devices), host_memory_bytes()
        what = f"{human_bytes(per_device)} per device x {len(devices)} CPU device(s) = {human_bytes(need)}"
    else:
        need, (have, source) = per_device, device_memory_bytes(devices[0])
        what = f"{human_bytes(per_device)} per device"
    if not have or need <= MARGIN * have:
        return None
    return (
        f"the plan's memory estimate is {what}, more than this machine has ({human_bytes(have)}, {source}); "
        "lower training.micro_batch_size or model.max_seq_len, set training.remat, train fewer weights "
        f'(method.kind = "lora"), or use more devices. `ftc plan` shows the estimate; {ENV}=0 runs it anyway'
    )
