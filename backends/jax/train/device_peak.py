"""The peak FLOP/s of one device, the denominator of the MFU a run reports.

In order: the spec's `logging.peak_tflops`; the data sheet for known GPUs and TPUs in a 16-bit
compute dtype (`compiler/flops.py`); else a square matmul in the compute dtype, jitted and timed
at start-up (CPUs, float32 compute, unlisted devices), so MFU then reads as a share of what this
device delivers on one large matmul.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from ftc.compiler import flops as flops_lib


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


def peak_flops(compute_dtype: str, peak_tflops: float | None = None) -> tuple[float, str]:
    """(peak FLOP/s of one device, where the figure comes from)."""
    if peak_tflops:
        return peak_tflops * 1e12, "logging.peak_tflops"
    kind = jax.local_devices()[0].device_kind
    sheet = flops_lib.datasheet_peak_flops(kind, compute_dtype)
    if sheet:
        return sheet, f"{kind} data sheet, {compute_dtype}"
    return measure_matmul_flops(compute_dtype), f"measured: {compute_dtype} matmul on {kind}"
