"""The peak FLOP/s of one device, the denominator of the MFU a run reports.

In order: the spec's `logging.peak_tflops`; the data sheet for known GPUs and TPUs in a 16-bit
compute dtype (`compiler/flops.py`); else a square matmul in the compute dtype, jitted and timed
(CPUs, float32 compute, unlisted devices), so MFU then reads as a share of what this device
delivers on one large matmul. That measurement is made once per machine and kept in
`$FTC_CACHE/device_peak.json` (keyed by device, CPU model, core count, dtype and jax version):
a peak re-measured at every start swings with the machine's load, and MFU would not compare
between runs. Delete the file to measure again.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import time

import jax
import jax.numpy as jnp

from ftc.backends.jax.state.files import write_json_atomic
from ftc.compiler import flops as flops_lib

CACHE_FILE = "device_peak.json"


def measure_matmul_flops(dtype: str, *, n: int | None = None, repeats: int = 5, chain: int | None = None) -> float:
    """Best FLOP/s of `chain` chained [n, n] matmuls in `dtype` on the first local device."""
    device = jax.local_devices()[0]
    accelerator = device.platform != "cpu"
    n = n or (8192 if accelerator else 1024)
    chain = chain or (8 if accelerator else 1)
    a = jax.device_put(jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype), device)
    b = jax.device_put(jax.random.normal(jax.random.key(1), (n, n), jnp.float32).astype(dtype), device)

    @jax.jit
    def chained(a, b):
        x = a
        for _ in range(chain):  # one program: dispatch and host sync stay out of the figure
            x = (x @ b) * jnp.asarray(1.0 / n**0.5, a.dtype)
        return x

    jax.block_until_ready(chained(a, b))
    best = float("inf")
    for _ in range(repeats):
        began = time.perf_counter()
        jax.block_until_ready(chained(a, b))
        best = min(best, time.perf_counter() - began)
    return 2.0 * n**3 * chain / best


def peak_flops(compute_dtype: str, peak_tflops: float | None = None, cache_dir=None) -> tuple[float, str]:
    """(peak FLOP/s of one device, where the figure comes from). `cache_dir`: where the measured
    figure is kept (default: ftc's cache root)."""
    if peak_tflops:
        return peak_tflops * 1e12, "logging.peak_tflops"
    kind = jax.local_devices()[0].device_kind
    sheet = flops_lib.datasheet_peak_flops(kind, compute_dtype)
    if sheet:
        return sheet, f"{kind} data sheet, {compute_dtype}"
    return measured_peak(compute_dtype, cache_dir)


def machine_key(compute_dtype: str) -> str:
    """What a measured peak depends on: the device, the host CPU and its cores, dtype, jax."""
    device = jax.local_devices()[0]
    return "|".join(
        [device.platform, device.device_kind, _cpu_model(), f"{len(os.sched_getaffinity(0))} cores", compute_dtype]
        + [f"jax {jax.__version__}"]
    )


def measured_peak(compute_dtype: str, cache_dir=None) -> tuple[float, str]:
    """The matmul peak measured once on this machine (then read from the cache file)."""
    if cache_dir is None:
        from ftc.backends.jax.io.gguf_import import default_cache_root

        cache_dir = default_cache_root()
    path = os.path.join(os.fspath(cache_dir), CACHE_FILE)
    key = machine_key(compute_dtype)
    try:
        with open(path, encoding="utf-8") as f:
            known = json.load(f)
    except (OSError, json.JSONDecodeError):
        known = {}
    entry = known.get(key) if isinstance(known, dict) else None
    if not (isinstance(entry, dict) and isinstance(entry.get("flops"), (int, float)) and entry["flops"] > 0):
        entry = {
            "flops": measure_matmul_flops(compute_dtype, repeats=20),
            "measured": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        }
        known = {**(known if isinstance(known, dict) else {}), key: entry}
        if jax.process_index() == 0:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            write_json_atomic(path, known)
    return float(entry["flops"]), f"{compute_dtype} matmul measured on this machine {entry['measured']} ({path})"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
