"""What a stop within one step costs and gives: train/loop.py lets the host run at most one step
ahead of the device (it waits on step N-1's metrics after dispatching step N). This measures
train_loop's step time with that bound and without it (the loop as it was: the host free to
queue every step), and how long a SIGINT takes to stop the loop in each case.

    python -m bench.loop_stop                          # CPU sizes; --queued 1,2,0 compares QUEUED 1, 2, no bound
    python -m bench.loop_stop --sizes 2048x4,4096x8    # a GPU: N x K is K chained N x N matmuls a step

A step is K chained N x N float32 matmuls (a toy program: the loop's cost is what is measured,
not a model's). Prints one JSON object per size.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import threading
import time
import types

import jax
import jax.numpy as jnp
import numpy as np

from ftc.backends.jax.objectives.sft import CAUSAL_LM
from ftc.backends.jax.train import loop as loop_lib


def toy(n: int, k: int):
    @jax.jit
    def train(state, batch):
        m = jax.lax.fori_loop(0, k, lambda _, m: jnp.tanh(m @ m * (1.0 / n)) + batch["x"][0], state["m"])
        return {"step": state["step"] + 1, "m": m}, {"loss": m[0, 0]}

    steps = types.SimpleNamespace(train=train, put_train_batch=lambda b: b, objective=CAUSAL_LM)
    state = {"step": jnp.zeros((), jnp.int32), "m": jax.random.normal(jax.random.key(0), (n, n), jnp.float32)}
    return steps, state


class Batches:
    def __init__(self):
        self.i = 0

    def __next__(self):
        self.i += 1
        return {"x": np.full((1,), 1e-3 * (self.i % 7), np.float32)}

    def get_state(self):
        return {"i": self.i}


class _Unbounded:
    """jax as the loop sees it, without the wait that bounds the run-ahead."""

    def __getattr__(self, name):
        return getattr(jax, name)

    @staticmethod
    def block_until_ready(x):
        return x


def run(steps, state, total: int, queued: int | None, stop_after: float | None = None) -> dict:
    """train_loop over `total` steps with at most `queued` steps queued (None: no bound)."""
    config = loop_lib.LoopConfig(total_steps=total, log_every=total, eval_at_start=False, progress=False)
    dispatched, sent = [], []
    loop_lib.jax = jax if queued else _Unbounded()
    loop_lib.QUEUED = queued or 1
    timer = None

    def send():
        sent.append(time.perf_counter())
        os.kill(os.getpid(), signal.SIGINT)

    try:
        with loop_lib.StopSignals() as stop:
            if stop_after is not None:
                timer = threading.Timer(stop_after, send)
                timer.start()
            began = time.perf_counter()
            try:
                out = loop_lib.train_loop(
                    steps,
                    state,
                    Batches(),
                    config,
                    checkpointer=None,
                    metadata={},
                    stop=stop,
                    after_step=lambda s: dispatched.append((s, time.perf_counter())),
                )
                jax.block_until_ready(out)
                stopped = None
            except loop_lib.Interrupted as e:
                stopped = int(re.search(r"step (\d+)", str(e)).group(1))
            ended = time.perf_counter()
    finally:
        loop_lib.jax, loop_lib.QUEUED = jax, 1
        if timer is not None:
            timer.cancel()
    result = {"seconds": ended - began, "steps": dispatched[-1][0] if dispatched else 0}
    if stop_after is not None:
        at_signal = max((s for s, t in dispatched if t <= sent[0]), default=0)
        result.update(
            stopped_at=stopped,  # None: the loop ran to its end
            dispatched_at_signal=at_signal,
            latency_s=ended - sent[0],
        )
    return result


def measure(n: int, k: int, total: int, queues: list[int | None]) -> dict:
    steps, state = toy(n, k)
    run(steps, state, 3, queued=1)  # compile
    out = {"size": f"{n}x{k}", "steps": total}
    for queued in queues:
        name = f"queued_{queued}" if queued else "unbounded"
        timed = min((run(steps, state, total, queued) for _ in range(3)), key=lambda r: r["seconds"])
        step_s = timed["seconds"] / total
        stop = run(steps, state, total, queued, stop_after=0.25 * total * step_s)
        out[name] = {
            "step_ms": round(1e3 * step_s, 4),
            "signal_at_step": stop["dispatched_at_signal"],
            "stopped_at_step": stop["stopped_at"],
            "stop_latency_ms": round(1e3 * stop["latency_s"], 2),
            "stop_latency_steps": round(stop["latency_s"] / step_s, 2),
        }
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="256x4,512x8", help="N x K per step, comma separated")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--queued", default="1,2,0", help="loop.QUEUED values to compare; 0: no bound (the old loop)")
    args = parser.parse_args(argv)
    device = jax.devices()[0]
    print(json.dumps({"device": device.device_kind, "platform": device.platform, "host": platform.processor()}))
    for size in args.sizes.split(","):
        n, k = map(int, size.split("x"))
        queues = [int(q) or None for q in args.queued.split(",")]
        print(json.dumps(measure(n, k, args.steps, queues)), flush=True)


if __name__ == "__main__":
    main()
