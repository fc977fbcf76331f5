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

Many tests compile the same programs again (the tiny model's train step in every run test, a
resumed run's step, a family's decode): one persistent compilation cache for the session, shared
by its workers and the `ftc` processes tests start, compiles each once. It is made here, in the
process that starts the workers (they inherit the environment), and removed when that process's
session ends; a JAX_COMPILATION_CACHE_DIR of the user's own is used as it is and kept. Tests that
count compiles turn it off for themselves (`tests/support/compile_counts.py`).
"""

import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    made = tempfile.mkdtemp(prefix="ftc-tests-jax-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ["FTC_TESTS_JAX_CACHE"] = made
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"  # as `ftc run` keeps them: every program
_USERS_POOL = "PJRT_NPROC" in os.environ

import jax  # noqa: E402

import ftc.backends.jax  # noqa: E402,F401  (sets PJRT_NPROC from the flags above)

jax.devices()  # XLA makes its CPU client now, with that pool
if not _USERS_POOL:
    os.environ.pop("PJRT_NPROC", None)


def pytest_sessionfinish(session):
    made = os.environ.get("FTC_TESTS_JAX_CACHE")
    if made and "PYTEST_XDIST_WORKER" not in os.environ:  # the process that made it, after its workers
        shutil.rmtree(made, ignore_errors=True)
