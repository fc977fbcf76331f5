"""The device's measured matmul peak (FLOP/s), the denominator of MFU: a large square matmul in the
benchmark's compute dtype, jitted, timed over repeats after a warm-up. Measured rather than taken
from a data sheet, so MFU says how much of what this chip actually delivers the training step uses.

    python -m bench.peak [float32|bfloat16] [n]        # prints JSON
"""

from __future__ import annotations

import json
import statistics
import sys
import time


def measure(dtype: str = "bfloat16", n: int | None = None, repeats: int = 10) -> dict:
    import jax
    import jax.numpy as jnp

    device = jax.devices()[0]
    if n is None:
        n = 8192 if device.platform == "gpu" else 2048
    key_a, key_b = jax.random.split(jax.random.key(0))
    a = jax.random.normal(key_a, (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(key_b, (n, n), jnp.float32).astype(dtype)
    # A chain of matmuls in one program keeps dispatch and host sync out of the figure.
    chain = 8 if device.platform == "gpu" else 1

    @jax.jit
    def f(a, b):
        x = a
        for _ in range(chain):
            x = (x @ b) * jnp.asarray(1.0 / n**0.5, a.dtype)
        return x

    jax.block_until_ready(f(a, b))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(f(a, b))
        times.append(time.perf_counter() - t0)
    best = min(times)
    flops = 2.0 * n**3 * chain
    return {
        "dtype": dtype,
        "n": n,
        "chain": chain,
        "flops_per_s": flops / best,
        "median_flops_per_s": flops / statistics.median(times),
        "device": getattr(device, "device_kind", str(device)),
        "platform": device.platform,
    }


if __name__ == "__main__":
    args = sys.argv[1:]
    out = measure(args[0] if args else "bfloat16", int(args[1]) if len(args) > 1 else None)
    print(json.dumps(out))
