"""A fresh clone in a fresh virtual environment: the tracked files of this repository (as a clone
has them) copied to a directory, and a venv to pip install them into, as a new user would."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def clone(dest: Path) -> Path:
    """The files git tracks (and untracked ones it does not ignore), copied to `dest`."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, (n.decode() for n in listed)):
        source = REPO / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    return dest


def venv(dest: Path) -> Path:
    """A new virtual environment at `dest`; returns its bin/ directory."""
    subprocess.run([sys.executable, "-m", "venv", str(dest)], check=True, capture_output=True)
    return dest / "bin"


def run(command, cwd, timeout: int, env: dict | None = None) -> subprocess.CompletedProcess:
    """`command` through bash in `cwd`, output captured; the environment a user has, without this
    venv's and without the test session's (XLA_FLAGS: tests/conftest.py's 8 fake devices)."""
    environ = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "XLA_FLAGS")}
    environ["PATH"] = os.pathsep.join(p for p in environ["PATH"].split(os.pathsep) if not p.startswith(sys.prefix))
    return subprocess.run(
        ["bash", "-c", command],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**environ, **(env or {})},
    )


def site_packages_bytes(env_dir: Path) -> int:
    return sum(f.stat().st_size for f in env_dir.glob("lib/python*/site-packages/**/*") if f.is_file())
