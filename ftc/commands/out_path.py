"""--out paths checked before any work: a command whose last step writes --out (a completions file,
an eval report, an export) would otherwise load a model and generate for minutes, then fail at
that write with the name of a hidden temporary file. Checked first, the message names --out."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def _cannot_write_in(directory: Path) -> str | None:
    """Why no new file can be made in `directory`, or None. A real probe, not os.access: root
    passes os.access on a read-only mount, an immutable directory or /proc."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".ftc-write-probe-", dir=directory)
    except OSError as e:
        return f"cannot write in {directory} ({e.strerror or e})"
    os.close(fd)
    os.unlink(probe)
    return None


def unwritable_file_problem(path: str | os.PathLike) -> str | None:
    """Why a file cannot be written at `path` (its directory missing or not writable), or None."""
    parent = Path(os.path.abspath(path)).parent
    if not parent.exists():
        return f"the directory {parent} does not exist"
    if not parent.is_dir():
        return f"{parent} is not a directory"
    return _cannot_write_in(parent)


def unwritable_dir_problem(path: str | os.PathLike) -> str | None:
    """Why a directory cannot be written at `path`, or None. Missing parents are made when it is
    written, so the nearest one that exists must take a new entry."""
    out = Path(os.path.abspath(path))
    if out.exists() and not out.is_dir():
        return f"{out} exists and is not a directory"
    ancestor = out.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        return f"{ancestor} is not a directory"
    return _cannot_write_in(ancestor)
