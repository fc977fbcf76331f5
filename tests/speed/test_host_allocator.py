"""ftc/host_allocator.py: the `ftc` commands that run JAX programs restart once with glibc's
huge-page tunable; everything else, and a user's own malloc tuning, is left alone."""

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from ftc import host_allocator

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
MADVISE = "always [madvise] never\n"


@pytest.mark.skipif(not GLIBC, reason="glibc's tunables only exist on Linux with glibc")
def test_tuned_environ_adds_the_huge_page_tunable_and_keeps_the_rest():
    env = host_allocator.tuned_environ({"PATH": "/bin"}, MADVISE)
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1", "FTC_HOST_ALLOCATOR": "restarted"}
    other = host_allocator.tuned_environ({"GLIBC_TUNABLES": "glibc.rtld.nns=8"}, MADVISE)
    assert other["GLIBC_TUNABLES"] == "glibc.rtld.nns=8:glibc.malloc.hugetlb=1"


@pytest.mark.parametrize(
    "environ, thp",
    [
        ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, MADVISE),  # the user's malloc tuning wins
        ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}, MADVISE),  # already restarted: no loop
        ({"FTC_HOST_ALLOCATOR": "default"}, MADVISE),  # asked for glibc's defaults
        ({"FTC_HOST_ALLOCATOR": "restarted"}, MADVISE),  # restarted once, even if glibc dropped the tunable
        ({}, "always madvise [never]\n"),  # the kernel has huge pages off
    ],
)
def test_tuned_environ_leaves_alone(environ, thp):
    assert host_allocator.tuned_environ(environ, thp) is None


def test_command_of_skips_options():
    assert host_allocator.command_of(["--debug", "run", "spec.toml"]) == "run"
    assert host_allocator.command_of(["--version"]) is None


def _probe(tmp_path: Path, *args: str) -> str:
    script = tmp_path / "probe.py"
    script.write_text(
        "import os, sys\n"
        "from ftc import host_allocator\n"
        "host_allocator.restart_tuned(sys.argv[1:])\n"
        "print('tunables', os.environ.get('GLIBC_TUNABLES'), flush=True)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "FTC_HOST_ALLOCATOR")}
    out = subprocess.run([sys.executable, str(script), *args], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.mark.skipif(
    host_allocator.tuned_environ({}) is None, reason="no glibc or transparent huge pages off: nothing to restart with"
)
def test_a_jax_command_restarts_once_with_the_tunable_and_its_arguments(tmp_path):
    assert _probe(tmp_path, "run", "spec.toml").splitlines() == ["tunables glibc.malloc.hugetlb=1"]
    assert _probe(tmp_path, "lint", "spec.toml").splitlines() == ["tunables None"]


def test_the_ftc_script_still_reports_a_bad_argument_cleanly_after_the_restart(tmp_path):
    ftc = Path(sys.executable).parent / "ftc"
    if not ftc.exists():
        pytest.skip("the ftc console script is not installed next to this interpreter")
    out = subprocess.run([str(ftc), "run", str(tmp_path / "missing.toml")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "does not exist" in out.stderr and "Traceback" not in out.stderr


def test_bench_gives_ftc_workers_the_commands_environment_and_pytorch_its_defaults():
    from bench import common

    cache = ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS")  # the bench's own choice
    base = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "FTC_HOST_ALLOCATOR", *cache)}
    assert common.stack_env("pytorch", base) == base
    for stack in ("pytorch", "ftc"):
        assert not set(cache) & set(common.stack_env(stack, {**base, cache[0]: "/tmp/users-cache", cache[1]: "0"}))
    ftc = common.stack_env("ftc", base)
    if host_allocator.tuned_environ(base) is None:  # no glibc or huge pages here: both run with defaults
        assert ftc == base
    else:
        assert ftc["GLIBC_TUNABLES"] == host_allocator.TUNABLE and ftc.items() >= base.items()
    no_tuning = {**base, "FTC_HOST_ALLOCATOR": "default"}
    assert common.stack_env("ftc", no_tuning) == no_tuning  # how bench/README.md measures glibc's defaults
