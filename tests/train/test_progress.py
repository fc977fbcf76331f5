"""The progress bar counts completed steps, one at a time (not in jumps at log points), and its ETA
is the mean step time since the first step (which compiles) was done: steady through the run."""

import time
import types

import jax.numpy as jnp
import numpy as np
import pytest
import tqdm

from ftc.backends.jax.train.loop import LoopConfig, train_loop

STEP_SECONDS = 0.05
COMPILE_SECONDS = 0.6


class RecordingBar(tqdm.tqdm):
    seen: list = []

    def update(self, n=1):
        out = super().update(n)
        RecordingBar.seen.append((self.n, self.format_dict))
        return out


def fake_steps():
    """A train step that takes STEP_SECONDS (the first one COMPILE_SECONDS longer, like a compile)."""
    calls = []

    def train(state, batch):
        time.sleep(STEP_SECONDS + (COMPILE_SECONDS if not calls else 0.0))
        calls.append(1)
        return {"step": state["step"] + 1}, {"loss": jnp.float32(1.0)}

    return types.SimpleNamespace(train=train, put_train_batch=lambda batch: batch)


def batches():
    while True:
        yield {"segment_ids": np.ones((2, 4), np.int32)}


def test_the_bar_advances_every_step_and_its_eta_is_the_steady_step_time(monkeypatch):
    monkeypatch.setattr(tqdm, "tqdm", RecordingBar)
    RecordingBar.seen = []
    total = 16
    config = LoopConfig(total_steps=total, log_every=10, eval_at_start=False, progress=True)
    train_loop(fake_steps(), {"step": jnp.int32(0)}, batches(), config, checkpointer=None, metadata={})
    counts = [n for n, _ in RecordingBar.seen]
    assert counts == list(range(1, total + 1))  # one step at a time, none skipped, none in a jump
    for n, meter in RecordingBar.seen[2:-1]:
        rate = (meter["n"] - meter["initial"]) / meter["elapsed"]  # what tqdm's ETA divides by (smoothing 0)
        eta = (total - n) / rate
        assert eta == pytest.approx((total - n) * STEP_SECONDS, rel=0.3), (n, eta)
