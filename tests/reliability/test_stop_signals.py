"""SIGINT / SIGTERM stop a run within one step wherever they land: while the host could run ahead
of the device, after the last step was dispatched, on a checkpoint step, during an evaluation.
The stop always saves a checkpoint (or says why there is nothing to save) and exits non-zero."""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import jax
import loop_testlib as lt
import pytest

from ftc.backends.jax.state import checkpoint as ckpt_lib
from ftc.backends.jax.train import run_log
from ftc.backends.jax.train.loop import Interrupted, LoopConfig, StopSignals, train_loop

DRIVER = Path(lt.__file__)


def drive(tmp_path, steps: int, signum: int, at_dispatched: int) -> tuple[list[dict], float]:
    """Run the driver, send `signum` once it has dispatched `at_dispatched` steps; (its lines, when sent)."""
    proc = subprocess.Popen(
        [sys.executable, str(DRIVER), str(tmp_path / "ckpt"), str(steps)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines, sent = [], None
    try:
        for raw in proc.stdout:
            lines.append(json.loads(raw))
            if sent is None and lines[-1].get("dispatched") == at_dispatched:
                sent = time.time()
                proc.send_signal(signum)
        proc.wait(timeout=120)
    finally:
        proc.kill()
    assert sent is not None and lines, proc.stderr.read()[-3000:]
    return lines, sent


def test_sigint_while_the_host_could_run_ahead_stops_within_one_step(tmp_path):
    steps = 30
    lines, sent = drive(tmp_path, steps, signal.SIGINT, at_dispatched=4)
    end = lines[-1]
    assert "interrupted" in end, end  # before: the host had queued all 30 steps and finished them
    assert end["interrupted"].startswith(f"SIGINT: saved a checkpoint at step {end['saved']};")
    dispatched = [line["t"] for line in lines if "dispatched" in line]
    step_time = statistics.median(b - a for a, b in zip(dispatched[1:], dispatched[2:]))
    # The step running when the signal came and the one queued behind it finish, then the save.
    assert end["saved"] <= 4 + 2, (end, len(dispatched))
    assert end["t"] - sent < 3 * step_time + 2.0, (end["t"] - sent, step_time)


def test_a_signal_after_the_last_step_was_dispatched_still_stops_nonzero(tmp_path):
    lines, _ = drive(tmp_path, 4, signal.SIGTERM, at_dispatched=4)
    end = lines[-1]
    assert "interrupted" in end, end  # before: exit 0, the signal dropped
    assert end["interrupted"].startswith("SIGTERM: saved a checkpoint at step 4 (the last")
    assert end["saved"] == 4


def run_toy(tmp_path, *, total, every=0, kill_at=None, eval_batches=None, eval_every=0, state=None, **config):
    checkpointer = ckpt_lib.Checkpointer(str(tmp_path / "ckpt"), keep=100, async_save=True)
    logger = run_log.RunLogger(str(tmp_path), tensorboard=False, resume_step=checkpointer.latest_step())
    hook = (lambda step: os.kill(os.getpid(), signal.SIGTERM) if step == kill_at else None) if kill_at else None
    loop_config = LoopConfig(
        total_steps=total, log_every=1, checkpoint_every=every, eval_every=eval_every, progress=False, **config
    )
    try:
        with StopSignals() as stop:
            return train_loop(
                lt.STEPS,
                state or lt.initial_state(),
                lt.Batches(int(jax.device_get((state or lt.initial_state())["step"]))),
                loop_config,
                checkpointer=checkpointer,
                metadata={"what": "toy"},
                logger=logger,
                eval_batches=eval_batches,
                stop=stop,
                after_step=hook,
            )
    finally:
        logger.close()
        checkpointer.close()


def test_sigterm_on_a_checkpoint_step_saves_once_and_says_so(tmp_path):
    with pytest.raises(Interrupted, match=r"^SIGTERM: saved a checkpoint at step 2; run again to resume$") as e:
        run_toy(tmp_path, total=6, every=2, kill_at=2)  # before: "Checkpoint for step 2 already exists"
    assert e.value.code
    assert ckpt_lib.Checkpointer(str(tmp_path / "ckpt"), read_only=True).all_steps() == [2]


def test_a_signal_during_evaluation_stops_it_and_the_next_run_redoes_it(tmp_path):
    def batches():
        yield {"x": jax.numpy.ones((2,))}
        os.kill(os.getpid(), signal.SIGINT)  # lands in the middle of the evaluation at step 2
        for _ in range(50):
            yield {"x": jax.numpy.ones((2,))}

    with pytest.raises(Interrupted, match="SIGINT: saved a checkpoint at step 2"):
        run_toy(tmp_path, total=4, eval_every=2, eval_batches=batches, eval_at_start=False)
    reader = ckpt_lib.Checkpointer(str(tmp_path / "ckpt"), read_only=True)
    assert reader.latest_step() == 2 and reader.metadata()["eval_pending"] is True
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["split"]) for r in rows] == [(1, "train"), (2, "train")]  # no partial validation

    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), lt.initial_state())
    state, _, _ = reader.restore(abstract)
    whole = lambda: iter([{"x": jax.numpy.ones((2,))}] * 3)
    run_toy(tmp_path, total=4, eval_every=2, eval_batches=whole, eval_first=True, state=state)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["split"]) for r in rows] == [
        (1, "train"),
        (2, "train"),
        (2, "validation"),
        (3, "train"),
        (4, "train"),
        (4, "validation"),
    ]


def test_a_signal_before_the_first_step_saves_nothing_and_says_so(tmp_path):
    def batches():
        os.kill(os.getpid(), signal.SIGINT)  # during the step-0 evaluation
        yield {"x": jax.numpy.ones((2,))}

    with pytest.raises(Interrupted, match="SIGINT: stopped at step 0 before any step ran; run again to start"):
        run_toy(tmp_path, total=4, eval_batches=batches)
    assert ckpt_lib.Checkpointer(str(tmp_path / "ckpt"), read_only=True).all_steps() == []
