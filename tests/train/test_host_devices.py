"""backends/jax/host_devices.py: fake CPU devices get an XLA:CPU pool of 4 threads per device, so
their collectives cannot fill it with waiting parts (a 40 s hang, then an abort); what the user set
stays, and one device changes nothing."""

from __future__ import annotations

import os
import subprocess
import sys

from ftc.backends.jax import host_devices


def test_fake_devices_get_four_pool_threads_each_or_the_cores_when_more():
    env = {"XLA_FLAGS": "--xla_backend_optimization_level=0 --xla_force_host_platform_device_count=8"}
    assert host_devices.pool_threads(env, cores=2) == 32
    assert host_devices.pool_threads(env, cores=64) == 64
    assert host_devices.pool_threads({"JAX_NUM_CPU_DEVICES": "4"}, cores=2) == 16
    # XLA keeps the last of a repeated flag
    repeated = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_force_host_platform_device_count=2"}
    assert host_devices.pool_threads(repeated, cores=1) == 8


def test_one_device_a_users_own_setting_or_a_malformed_count_change_nothing():
    assert host_devices.pool_threads({}, cores=2) is None
    assert host_devices.pool_threads({"XLA_FLAGS": "--xla_force_host_platform_device_count=1"}, cores=2) is None
    flags = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    assert host_devices.pool_threads({**flags, "PJRT_NPROC": "3"}, cores=2) is None
    assert host_devices.pool_threads({**flags, "NPROC": "3"}, cores=2) is None
    assert host_devices.pool_threads({"JAX_NUM_CPU_DEVICES": "many"}, cores=2) is None
    env = dict(flags, PJRT_NPROC="3")
    host_devices.reserve(env)
    assert env["PJRT_NPROC"] == "3"


def _pool_threads_in_a_fresh_process(env: dict) -> int:
    """Import ftc's JAX backend, make jax's CPU client, count XLA's intra-op pool threads."""
    code = (
        "import os, ftc.backends.jax, jax\n"
        "jax.devices()\n"
        "names = [open(f'/proc/self/task/{t}/comm').read().strip() for t in os.listdir('/proc/self/task')]\n"
        "print(names.count('tf_XLAEigen'))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return int(out.stdout.split()[-1])


def test_importing_ftcs_jax_backend_sizes_xlas_pool_before_the_client_exists():
    base = {k: v for k, v in os.environ.items() if k not in ("PJRT_NPROC", "NPROC", "XLA_FLAGS")}
    eight = dict(base, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    # XLA's own size would be max(8, cores): 8 on the 2-core machine where the pool filled up
    assert _pool_threads_in_a_fresh_process(eight) == max(32, os.cpu_count() or 1)


def test_this_test_process_has_the_sized_pool_and_left_no_setting_for_its_children():
    names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
    assert names.count("tf_XLAEigen") == max(32, os.cpu_count() or 1)  # tests/conftest.py, 8 devices
    assert "PJRT_NPROC" not in os.environ  # (unless you ran the tests with a PJRT_NPROC of your own)
