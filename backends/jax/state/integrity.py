"""Damaged checkpoints: found before use, set aside (never deleted), the newest good one used.

Every checkpoint ftc writes gets a digest once Orbax has committed it: `<step>/ftc_digest.json`
lists each file of the step directory with its size and sha256 (written atomically, by process 0,
in a background thread so training does not wait for it). Checking a step re-reads its files
against the digest: a file truncated, corrupted, missing or added is named. A step without a
digest (written by an older ftc, or killed between Orbax's commit and the digest) is checked
structurally: its JSON files (Orbax's metadata, ftc's meta and data items) must parse.

On resume, `set_aside_damaged` checks the steps newest first and moves each damaged one to
`<run_dir>/checkpoints_damaged/<step>/` (with REASON.txt saying why) until it finds a good one,
so the run resumes from the newest good checkpoint and can save that step again later.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

from ftc.backends.jax.state.files import write_json_atomic

DIGEST_FILE = "ftc_digest.json"
DAMAGED_DIR = "checkpoints_damaged"
# Files of a step that are JSON (Orbax's step and item metadata, ftc's meta and data items).
_JSON_FILES = ("_CHECKPOINT_METADATA", "meta/metadata", "data/metadata", "state/_METADATA")
_CHUNK = 1 << 22


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _files(step_dir: Path) -> list[str]:
    out = []
    for here, _, names in os.walk(step_dir):
        for name in names:
            rel = os.path.relpath(os.path.join(here, name), step_dir)
            if rel != DIGEST_FILE and not rel.startswith(DIGEST_FILE):  # itself and its temporary file
                out.append(rel)
    return sorted(out)


def write_digest(step_dir: str | os.PathLike) -> None:
    """`step_dir/ftc_digest.json`: every file's size and sha256 (the step must be committed)."""
    step_dir = Path(step_dir)
    files = {rel: [(step_dir / rel).stat().st_size, _sha256(step_dir / rel)] for rel in _files(step_dir)}
    write_json_atomic(step_dir / DIGEST_FILE, {"version": 1, "files": files, "sha256": _own_hash(files)})


def _own_hash(files: dict) -> str:
    """The digest's hash of itself, so that damage to the digest is told from damage it finds."""
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def problem(step_dir: str | os.PathLike) -> str | None:
    """Why the checkpoint in `step_dir` cannot be used (naming the file), or None."""
    step_dir = Path(step_dir)
    digest_path = step_dir / DIGEST_FILE
    if not digest_path.exists():
        return _structural_problem(step_dir)
    try:
        digest = json.loads(digest_path.read_bytes())
        recorded = {rel: (int(size), str(sha)) for rel, (size, sha) in digest["files"].items()}
        intact = digest["sha256"] == _own_hash(digest["files"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return f"{DIGEST_FILE} is damaged ({type(e).__name__}: {str(e)[:120]})"
    if not intact:
        return f"{DIGEST_FILE} does not match its own sha256 (corrupted)"
    present = set(_files(step_dir))
    for rel, (size, sha) in recorded.items():
        path = step_dir / rel
        if rel not in present:
            return f"{rel} is missing"
        actual = path.stat().st_size
        if actual != size:
            return f"{rel} is {actual} bytes, {size} when written ({'truncated' if actual < size else 'grown'})"
        if _sha256(path) != sha:
            return f"{rel} does not match its sha256 when written (corrupted)"
    extra = sorted(present - set(recorded))
    if extra:
        return f"{extra[0]} was not there when the checkpoint was written"
    return None


def _structural_problem(step_dir: Path) -> str | None:
    for rel in _JSON_FILES:
        path = step_dir / rel
        if not path.is_file():
            return f"{rel} is missing"
        try:
            json.loads(path.read_bytes())
        except (OSError, ValueError) as e:
            return f"{rel} is not valid JSON ({str(e)[:120]}): truncated or corrupted"
    return None


def steps_on_disk(directory: str | os.PathLike) -> list[int]:
    """Committed step directories (named by their step) under a checkpoints/ directory."""
    if not os.path.isdir(directory):
        return []
    return sorted(int(p.name) for p in Path(directory).iterdir() if p.name.isdigit() and p.is_dir())


def newest_good(directory: str | os.PathLike) -> tuple[int | None, list[tuple[int, str]]]:
    """(newest step without a problem, [(step, problem) of each newer damaged one])."""
    damaged = []
    for step in reversed(steps_on_disk(directory)):
        why = problem(Path(directory) / str(step))
        if why is None:
            return step, damaged
        damaged.append((step, why))
    return None, damaged


def set_aside(directory: str | os.PathLike, step: int, why: str) -> Path:
    """Move `directory/<step>` to `../checkpoints_damaged/<step>[.N]/`, with REASON.txt."""
    source = Path(directory) / str(step)
    aside = Path(directory).parent / DAMAGED_DIR
    aside.mkdir(exist_ok=True)
    target, n = aside / str(step), 1
    while target.exists():
        n += 1
        target = aside / f"{step}.{n}"
    os.rename(source, target)
    (target / "REASON.txt").write_text(f"set aside by ftc run on {time.strftime('%Y-%m-%d %H:%M:%S %z')}: {why}\n")
    return target


def set_aside_damaged(directory: str | os.PathLike, warn: Callable[[str], None]) -> int | None:
    """Check the steps under `directory` newest first, moving each damaged one aside (and warning
    with its step, file and what is wrong) until a good one; returns that step, or None."""
    good, damaged = newest_good(directory)
    for step, why in damaged:
        target = set_aside(directory, step, why)
        warn(
            f"warning: checkpoint {Path(directory) / str(step)} is damaged: {why}; moved it to {target} "
            f"and resuming from {'step ' + str(good) if good is not None else 'the start'}"
        )
    return good
