"""Run-directory files written whole or not at all: a reader (a resumed run, a report, a second
process) never sees half a file, even when the writer is killed midway; and which directories
`ftc run` may write a run into at all (`run_dir_problem`); temporary directories that a killed
writer's successor can find and remove (`temp_dir`)."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """`text` into `path` through a temporary file beside it, renamed into place."""
    tmp = f"{os.fspath(path)}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:  # a full disk, a directory at `path`, a kill: no stray .tmp beside it
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """`data` as indented JSON (and a final newline) into `path`, atomically."""
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


# What makes a directory a run directory of `ftc run` (the lock is written before anything else).
RESOLVED, CHECKPOINTS, LOCK = "spec.resolved.json", "checkpoints", "ftc.lock"
RUN_MARKERS = (RESOLVED, CHECKPOINTS, LOCK)


def run_dir_problem(run_dir: str | os.PathLike) -> str | None:
    """Why `ftc run` must not write into `run_dir`, or None: a file is where it or a directory
    above it should be, or it already holds files of something else than an ftc run (a run writes
    its files there and replaces its export/, which would lose what was there). An empty
    directory, one with only hidden files (.gitkeep), or any earlier run (to resume) is fine."""
    path = Path(os.path.abspath(run_dir))
    for where in (path, *path.parents):
        if where.exists() or where.is_symlink():
            if not where.is_dir():
                what = "the run directory <output_dir>/<name>" if where == path else "a directory above the run's"
                return f"{where} is a file, not a directory (it is {what}); choose another name or output_dir"
            break
    if not path.is_dir():
        return None
    entries = sorted(name for name in os.listdir(path) if not name.startswith("."))
    for name, kind in ((CHECKPOINTS, "directory"), (LOCK, "file"), (RESOLVED, "file")):
        if name in entries and (path / name).is_dir() != (kind == "directory"):  # before: found at the first save
            other = "file" if kind == "directory" else "directory"
            return f"{path / name} is a {other}, where a run keeps its {name} {kind}; move it away"
    if not entries or any(marker in entries for marker in RUN_MARKERS):
        return None
    shown = ", ".join(entries[:3]) + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")
    return (
        f"{path} already holds files that are not an ftc run ({shown}); a run writes its files there and "
        "replaces its export/: choose another name or output_dir, or move those files away"
    )


def temp_dir(parent: str | os.PathLike, prefix: str) -> Path:
    """A fresh private directory `<parent>/<prefix><host>-<pid>-<random>` that `remove_abandoned`
    can tell apart once its writer is gone. Those a killed writer left (SIGKILL, power loss: no
    clean-up ran) are removed first: an export's or conversion's partial copy is as big as a model."""
    remove_abandoned(parent, prefix)
    return Path(tempfile.mkdtemp(prefix=f"{prefix}{socket.gethostname()}-{os.getpid()}-", dir=parent))


def remove_abandoned(parent: str | os.PathLike, prefix: str) -> None:
    """Delete `<parent>/<prefix>...-<host>-<pid>-<random>` directories of this host whose process no
    longer runs. A live pid keeps its directory, even a reused one (it is removed a later time)."""
    host = socket.gethostname()
    pattern = re.compile(re.escape(prefix) + r"(?:.+-)?" + re.escape(host) + r"-(\d+)-[A-Za-z0-9_]+")
    for path in Path(parent).glob(glob.escape(prefix) + "*"):
        m = pattern.fullmatch(path.name)
        if not m or not path.is_dir() or path.is_symlink():
            continue
        try:
            os.kill(int(m.group(1)), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except (PermissionError, OverflowError):
            pass  # alive, another user's; or no such pid at all: not ours to judge
