"""A toy program for train/loop.py's stop tests: every step is a few matmuls that take the device
a fraction of a second while the host dispatches it at once, so the host can run ahead of the
device as it does on a real run. Run as a script it is the driver of the signal tests: it trains, printing one JSON
line per dispatched step and one when it stops, so a test can signal it from outside.

    python loop_testlib.py CHECKPOINT_DIR STEPS [CHECKPOINT_EVERY]
"""

from __future__ import annotations

import json
import os
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np

from ftc.backends.jax.objectives.sft import CAUSAL_LM
from ftc.backends.jax.state import checkpoint as ckpt_lib
from ftc.backends.jax.train.loop import Interrupted, LoopConfig, StopSignals, train_loop

N = 1024  # a step is a few N x N matmuls: a fraction of a second to a second on one CPU core


@jax.jit
def _train(state, batch):
    m = jax.lax.fori_loop(0, 8, lambda _, m: jnp.tanh(m @ m * (1.0 / N)), state["m"])
    w = state["w"] * 0.5 + batch["x"].mean() + m[0, :4]
    return {"step": state["step"] + 1, "w": w, "m": m}, {"loss": w.sum()}


@jax.jit
def _eval(state, batch):
    return {"loss_sum": state["w"].sum() + batch["x"].sum(), "weight_sum": 1.0, "correct_sum": 0.0, "tokens": 1.0}


STEPS = types.SimpleNamespace(
    train=_train, eval=_eval, put_train_batch=lambda b: b, put_eval_batch=lambda b: b, objective=CAUSAL_LM
)


class Batches:
    """Batches of one number; get_state() is where the stream stands, as a grain iterator's."""

    def __init__(self, position: int = 0):
        self.position = position

    def __next__(self):
        self.position += 1
        return {"x": np.full((2,), self.position, np.float32), "segment_ids": np.ones((2, 2), np.int32)}

    def get_state(self):
        return {"position": self.position}


def initial_state() -> dict:
    m = jax.random.normal(jax.random.key(0), (N, N), jnp.float32)
    return {"step": jnp.zeros((), jnp.int32), "w": jnp.zeros((4,), jnp.float32), "m": m}


def main(directory: str, steps: int, every: int = 0) -> None:
    checkpointer = ckpt_lib.Checkpointer(directory, keep=100)
    say = lambda **k: print(json.dumps({**k, "t": time.time()}), flush=True)
    config = LoopConfig(total_steps=steps, log_every=10_000, checkpoint_every=every, progress=False)
    try:
        with StopSignals() as stop:
            train_loop(
                STEPS,
                initial_state(),
                Batches(),
                config,
                checkpointer=checkpointer,
                metadata={},
                stop=stop,
                after_step=lambda step: say(dispatched=step),
            )
        checkpointer.close()
        say(done=checkpointer.latest_step())
        code = 0
    except Interrupted as e:
        say(interrupted=str(e), saved=checkpointer.latest_step())
        code = 3
    os._exit(code)  # skip interpreter teardown: the test times the stop, not jax's exit


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 0)
