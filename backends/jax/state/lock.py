"""One `ftc run` at a time per run directory: a lock file, `RUN_DIR/ftc.lock`, held by process 0.

    with RunLock(run_dir):   # raises LockedError naming the holder (pid, host, command, since)
        ...train...

The lock is an exclusive `flock` on the file, which the kernel drops when its holder exits, however
it exits (SIGKILL included), so a crashed run leaves no stale lock. The file also records the
holder (pid, host, start time, command) for the refusal's message. Where a file system has no
working flock (some network and FUSE mounts answer ENOLCK or EOPNOTSUPP), the record itself is the
lock: a record of a process on this host that is gone (pid not alive, or alive with another start
time) is stale and taken over; one of another host is stale once its heartbeat (the file's mtime,
touched every HEARTBEAT_S by the holder) is older than STALE_S.

The file is emptied on release and deleted only by `discard`, for a run that wrote nothing else
(a refused start), while it is still locked; `acquire` checks after its flock that the path is still
the file it locked, and retries if not, so two processes never hold two different files.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

import numpy as np

from ftc.backends.jax.state.files import run_dir_problem

LOCK_FILE = "ftc.lock"
HEARTBEAT_S = 30.0
STALE_S = 300.0
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class LockedError(RuntimeError):
    """Another `ftc run` holds the run directory."""


class RunDirError(ValueError):
    """The run directory cannot be a run's: a file is in the way, or it holds something else."""


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return start is None or _start_time(pid) in (None, start)


def _same_file(fd: int, path: Path) -> bool:
    try:
        here, there = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def holder_record() -> dict:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "start_time": _start_time(os.getpid()),
        "since": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "command": " ".join(sys.argv)[:500],
    }


def describe(record: dict) -> str:
    return f"pid {record.get('pid')} on host {record.get('host')}, since {record.get('since')}" + (
        f" ({record['command']})" if record.get("command") else ""
    )


class RunLock:
    """The lock of `run_dir` (created if missing). `held`: whether this process holds it."""

    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / LOCK_FILE
        self.held = False
        self._fd: int | None = None
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None
        self._flock = False
        self._made: list[Path] = []  # what acquire created: the lock file, then directories, deepest first

    def acquire(self) -> RunLock:
        for _ in range(10):  # another run may remove a lock file it made between our open and flock
            if self._try_acquire():
                return self
        raise LockedError(f"{self.path}: removed and made again while this run tried to lock it; run again")

    def _try_acquire(self) -> bool:
        missing = [d for d in (self.path.parent, *self.path.parent.parents) if not d.exists()]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd, made = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644), True
        except FileExistsError:
            fd, made = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644), False
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                flock = True
            except BlockingIOError:
                raise LockedError(self._refusal(self._read(fd))) from None
            except OSError as e:
                if e.errno not in _NO_FLOCK:
                    raise
                flock = False
                self._check_record(self._read(fd))
            if flock and not _same_file(fd, self.path):  # locked a file `discard` had removed
                os.close(fd)
                return False
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(holder_record()) + "\n").encode(), 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd, self.held, self._flock = fd, True, flock
        self._made = ([self.path] if made else []) + [d for d in missing if d.exists()]
        if not flock:
            self._heartbeat = threading.Thread(target=self._beat, name="ftc-lock-heartbeat", daemon=True)
            self._heartbeat.start()
        return True

    def discard(self) -> None:
        """Release, and remove what `acquire` made when the run wrote nothing else (it failed or
        was stopped before its first file): a refused start leaves no run directory behind. Only
        with flock: the file is removed while locked, and `acquire` retries a file so removed."""
        if not (self.held and self._flock and self._made and self._made[0] == self.path):
            return self.release()
        run_dir = self.path.parent
        checkpoints = run_dir / "checkpoints"
        entries = set(os.listdir(run_dir)) - {LOCK_FILE}
        if entries - {"checkpoints"} or (entries and (not checkpoints.is_dir() or any(checkpoints.iterdir()))):
            return self.release()
        self.path.unlink()
        with contextlib.suppress(OSError):
            checkpoints.rmdir()
        self.release()
        for directory in self._made[1:]:  # only while empty: another process may write there now
            with contextlib.suppress(OSError):
                directory.rmdir()

    def release(self) -> None:
        if not self.held:
            return
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
        try:
            os.ftruncate(self._fd, 0)  # an empty record: nobody holds it
        finally:
            os.close(self._fd)  # drops the flock
            self._fd, self.held = None, False

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> bool:
        self.release()
        return False

    # ---- without flock: the record is the lock

    def _check_record(self, record: dict | None) -> None:
        if not record:
            return
        if record.get("host") == socket.gethostname():
            if isinstance(record.get("pid"), int) and _alive(record["pid"], record.get("start_time")):
                raise LockedError(self._refusal(record))
            return
        age = time.time() - self.path.stat().st_mtime
        if age < STALE_S:
            raise LockedError(
                self._refusal(record)
                + f"; its heartbeat is {age:.0f} s old (stale after {STALE_S:.0f} s, on a file system without flock)"
            )

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                pass

    # ----

    @staticmethod
    def _read(fd: int) -> dict | None:
        raw = os.pread(fd, 65536, 0)
        try:
            record = json.loads(raw)
        except ValueError:
            return None
        return record if isinstance(record, dict) else None

    def _refusal(self, record: dict | None) -> str:
        who = describe(record) if record else "another process (no holder recorded)"
        return (
            f"{self.path.parent} is in use by another `ftc run`: {who}. Wait for it to finish or stop it "
            f"(SIGTERM saves a checkpoint); the lock is {self.path}"
        )


@contextlib.contextmanager
def run_lock(run_dir: str | os.PathLike):
    """Hold `run_dir`'s lock for the block on process 0; every process of a multi-process run
    learns whether process 0 got it and raises a LockedError if not. A directory that cannot be a
    run's (`files.run_dir_problem`) is refused first, with a RunDirError, and left as it was."""
    import jax

    lock, refusal = RunLock(run_dir), None
    if jax.process_index() == 0:
        problem = run_dir_problem(run_dir)  # before the lock file makes it look like a run
        try:
            if problem:
                raise RunDirError(problem)
            lock.acquire()
        except (LockedError, RunDirError) as e:
            refusal = e
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        got = multihost_utils.broadcast_one_to_all(np.int32(refusal is None))
        if not got and refusal is None:
            refusal = LockedError(f"process 0 could not lock {lock.path} (its message says why)")
    if refusal is not None:
        raise refusal
    try:
        yield lock
    finally:
        lock.release()
