"""One `ftc run` per run directory: a second is refused naming the holder; a lock left by a run
that died is taken over; the lock is released however the run ends."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from ftc.backends.jax.state import lock as lock_lib
from ftc.cli import main

# Trains the spec, holding its lock, and stops after step 1 until the file named second appears.
DRIVER = """
import os, sys, time
from ftc.spec import load_spec
from ftc.backends.jax.pipeline import run

def hold(step):
    if step == 1:
        print("holding", flush=True)
        while not os.path.exists(sys.argv[2]):
            time.sleep(0.05)

run(load_spec(sys.argv[1]), echo=lambda s: None, after_step=hold)
print("done", flush=True)
"""


def test_a_second_ftc_run_on_the_same_run_directory_is_refused_naming_the_holder(tiny, tmp_path):
    spec = tiny.spec(tmp_path)
    go = tmp_path / "go"
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    first = subprocess.Popen(
        [sys.executable, str(driver), str(spec), str(go)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert first.stdout.readline().strip() == "holding", first.stderr.read()[-3000:]
        result = CliRunner().invoke(main, ["run", str(spec)])
        assert result.exit_code == 1, result.output  # before: Orbax tracebacks in one run or both
        run_dir = tmp_path / "runs" / "tiny"
        assert f"{run_dir} is in use by another `ftc run`: pid {first.pid} on host {socket.gethostname()}" in (
            result.output
        )
        assert "Traceback" not in result.output
        go.touch()
        out, err = first.communicate(timeout=300)
    finally:
        first.kill()
    assert first.returncode == 0 and out.strip().endswith("done"), err[-3000:]
    assert (run_dir / lock_lib.LOCK_FILE).read_text() == ""  # released
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["2", "4"]


def test_the_lock_is_refused_while_held_and_free_once_released(tmp_path):
    with lock_lib.RunLock(tmp_path):
        record = json.loads((tmp_path / lock_lib.LOCK_FILE).read_text())
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
        with pytest.raises(lock_lib.LockedError, match=f"pid {os.getpid()} on host"):
            lock_lib.RunLock(tmp_path).acquire()  # another open file: flock refuses it, even in this process
    with lock_lib.RunLock(tmp_path) as again:
        assert again.held


def test_a_lock_left_by_a_dead_run_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    record = dict(lock_lib.holder_record(), pid=dead.pid, start_time="1")
    (tmp_path / lock_lib.LOCK_FILE).write_text(json.dumps(record))  # as a SIGKILLed run leaves it
    with lock_lib.RunLock(tmp_path) as lock:
        assert lock.held and json.loads(lock.path.read_text())["pid"] == os.getpid()


def test_without_flock_the_holders_pid_and_host_decide(tmp_path, monkeypatch):
    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    path = tmp_path / lock_lib.LOCK_FILE
    alive = lock_lib.holder_record() | {"pid": os.getppid(), "start_time": lock_lib._start_time(os.getppid())}
    path.write_text(json.dumps(alive))
    with pytest.raises(lock_lib.LockedError, match=f"pid {os.getppid()}"):
        lock_lib.RunLock(tmp_path).acquire()
    path.write_text(json.dumps(alive | {"start_time": "1"}))  # the pid was reused by another process
    lock_lib.RunLock(tmp_path).acquire().release()
    elsewhere = alive | {"host": "another-host"}
    path.write_text(json.dumps(elsewhere))
    with pytest.raises(lock_lib.LockedError, match="heartbeat is 0 s old"):
        lock_lib.RunLock(tmp_path).acquire()
    old = time.time() - lock_lib.STALE_S - 1
    os.utime(path, (old, old))
    lock = lock_lib.RunLock(tmp_path).acquire()
    assert lock.held
    lock.release()


def test_a_refused_start_removes_only_what_its_lock_made(tmp_path):
    made = tmp_path / "runs" / "new"
    lock = lock_lib.RunLock(made).acquire()
    (made / "checkpoints").mkdir()  # Orbax's directory, still empty
    lock.discard()
    assert not (tmp_path / "runs").exists()  # the run directory and the output_dir it made
    kept = tmp_path / "kept"
    kept.mkdir()
    lock_lib.RunLock(kept).acquire().discard()
    assert kept.is_dir() and list(kept.iterdir()) == []  # the user's directory stays, without ftc.lock
    lock = lock_lib.RunLock(kept).acquire()
    (kept / "spec.resolved.json").write_text("{}")  # the run wrote something: nothing goes
    lock.discard()
    assert sorted(p.name for p in kept.iterdir()) == ["ftc.lock", "spec.resolved.json"]
    lock_lib.RunLock(kept).acquire().discard()  # a lock file it did not make is only released
    assert (kept / "ftc.lock").read_text() == ""


def test_a_lock_taken_on_a_removed_lock_file_is_taken_again_on_the_new_one(tmp_path):
    first = lock_lib.RunLock(tmp_path / "run").acquire()
    late = os.open(first.path, os.O_RDWR)  # a second run opened the file before the first removed it
    first.discard()
    fcntl.flock(late, fcntl.LOCK_EX | fcntl.LOCK_NB)  # it locks the removed file...
    assert not lock_lib._same_file(late, first.path)  # ...which acquire notices, and retries
    with lock_lib.RunLock(tmp_path / "run") as second:
        assert lock_lib._same_file(second._fd, second.path)
        with pytest.raises(lock_lib.LockedError):
            lock_lib.RunLock(tmp_path / "run").acquire()
    os.close(late)
