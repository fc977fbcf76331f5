"""Session-wide test settings.

jax reads XLA_FLAGS once, at its first import, so the 8 fake CPU devices that sharding tests
need must be requested here, before any test module imports jax. The flags reach the `ftc`
processes tests start too.

The tests compile thousands of tiny programs that then run for milliseconds, so LLVM's optimiser
is most of their cost: `--xla_backend_optimization_level=0` leaves XLA's own (HLO) passes as they
are and cut the time of the run, export and generation tests by about an eighth (2-core CPU).
`ftc` itself keeps XLA's default, which is what the benchmarks in `bench/` measure.

Importing ftc's JAX backend here, before any test makes jax's CPU client, gives the 8 devices
XLA:CPU's pool of 32 threads (backends/jax/host_devices.py): with XLA's 8, a step's collectives
could fill the pool and hang the worker for 40 s before XLA aborted it. Once the client is made
the setting (PJRT_NPROC) leaves the environment again, so an `ftc` process a test starts sizes its
own pool from its own XLA_FLAGS, as a user's would.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
_USERS_POOL = "PJRT_NPROC" in os.environ

import jax  # noqa: E402

import ftc.backends.jax  # noqa: E402,F401  (sets PJRT_NPROC from the flags above)

jax.devices()  # XLA makes its CPU client now, with that pool
if not _USERS_POOL:
    os.environ.pop("PJRT_NPROC", None)
