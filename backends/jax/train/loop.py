"""The training loop: steps from the state's step to the plan's total, with logging, evaluation,
checkpoints and a clean stop.

`train_loop` is a function of its inputs (jitted steps, state, batch iterator, LoopConfig), so tests
drive it with any model and iterator. SIGTERM / SIGINT ask the loop to stop (`StopSignals`): it
saves a checkpoint, waits for it, and raises `Interrupted` (a non-zero exit); `ftc run` on the same
spec resumes from there.
"""

from __future__ import annotations

import dataclasses
import signal
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax

from ftc.backends.jax.state import checkpoint as ckpt_lib
from ftc.backends.jax.train import run_log
from ftc.backends.jax.train import step as ts

SHOWN_VALIDATION = ("loss", "perplexity", "token_accuracy", "reward_accuracy", "reward_margin")


class Interrupted(SystemExit):
    """The run was asked to stop (SIGTERM/SIGINT) and saved a checkpoint first."""


# ------------------------------------------------------------------ stop signals


class StopSignals:
    """Turns SIGTERM / SIGINT into a flag the loop polls (a second SIGINT kills at once)."""

    def __init__(self):
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


# ------------------------------------------------------------------ the loop


@dataclasses.dataclass
class LoopConfig:
    total_steps: int
    log_every: int = 10
    eval_every: int = 0  # 0: only at the end (and at step 0)
    eval_at_start: bool = True  # evaluate before the first step: the starting validation loss
    checkpoint_every: int = 0  # 0: only at the end and on interrupt
    progress: bool = True
    flops_per_step: float = 0.0  # model FLOPs of one optimizer step (plan); 0: no MFU
    peak_flops: float = 0.0  # peak FLOP/s of every device of the run together


def train_loop(
    steps: ts.Steps,
    state: dict,
    train_iter: Iterator[dict],
    config: LoopConfig,
    *,
    checkpointer: ckpt_lib.Checkpointer | None,
    metadata: dict,
    logger: run_log.RunLogger | None = None,
    eval_batches: Callable[[], Iterable[dict]] | None = None,
    stop: StopSignals | None = None,
    after_step: Callable[[int], None] | None = None,
    on_metrics: Callable[[int], None] | None = None,
) -> dict:
    """Train from `state["step"]` to `config.total_steps`. Returns the final state.

    `train_iter` yields host batches of [global batch (this process's share), T] and has
    get_state() (grain); its state is saved with every checkpoint. `after_step(step)` is a test
    hook, called after each step is dispatched; `on_metrics(step)` is called after metrics are
    logged (train or validation), e.g. to refresh the run's report.
    """
    from tqdm import tqdm

    step = int(jax.device_get(state["step"]))
    bar = tqdm(
        total=config.total_steps,
        initial=step,
        disable=not config.progress or jax.process_index() != 0,
        unit="step",
        dynamic_ncols=True,
    )
    window_tokens, window_steps, window_start = 0.0, 0, time.perf_counter()
    metrics = None  # the last step's metrics (device arrays), checked before any save

    def checked(at: int) -> dict | None:
        # Reading the loss waits for the step: done at log/checkpoint/stop points only, so the
        # host runs ahead of the device in between. No checkpoint holds an unchecked state.
        if metrics is None:
            return None
        host = ts.host_metrics(metrics)
        ts.check_finite(host, at)
        return host

    def save(at: int):
        checked(at)
        if checkpointer is not None:
            checkpointer.save(at, state, train_iter.get_state(), metadata)

    def run_eval(at: int):
        nonlocal window_start
        if eval_batches is None:
            return
        began = time.perf_counter()
        result = ts.evaluate(steps, state, eval_batches())
        if logger:
            logger.log(at, "validation", result)
        if on_metrics is not None:
            on_metrics(at)
        shown = [f"{k.replace('_', ' ')} {result[k]:.4f}" for k in SHOWN_VALIDATION if k in result]
        if jax.process_index() == 0:
            bar.write(f"step {at}: validation {', '.join(shown)}")
        window_start += time.perf_counter() - began  # tokens/s counts training time only

    try:
        if step == 0 and config.eval_at_start:
            run_eval(0)
        while step < config.total_steps:
            if stop is not None and stop.signum is not None:
                save(step)
                if checkpointer is not None:
                    checkpointer.wait()
                name = signal.Signals(stop.signum).name
                raise Interrupted(f"{name}: saved a checkpoint at step {step}; run again to resume")
            batch = next(train_iter)
            state, metrics = steps.train(state, steps.put_train_batch(batch))
            step += 1
            window_tokens += float(ts.real_tokens(batch)) * jax.process_count()
            window_steps += 1
            if after_step is not None:
                after_step(step)
            bar.update(1)
            last = step == config.total_steps
            if step % max(config.log_every, 1) == 0 or last:
                host = checked(step)
                elapsed = max(time.perf_counter() - window_start, 1e-9)
                row = {**host, "tokens_per_second": window_tokens / elapsed}
                if config.flops_per_step and config.peak_flops:
                    row["mfu"] = config.flops_per_step * window_steps / elapsed / config.peak_flops
                row.update(run_log.device_memory())
                row.update(run_log.host_memory())
                if logger:
                    logger.log(step, "train", row)
                if on_metrics is not None:
                    on_metrics(step)
                bar.set_postfix(loss=f"{host['loss']:.4f}", tok_s=f"{row['tokens_per_second']:.0f}")
                window_tokens, window_steps, window_start = 0.0, 0, time.perf_counter()
            if last or (config.eval_every and step % config.eval_every == 0):
                run_eval(step)
            if last or (config.checkpoint_every and step % config.checkpoint_every == 0):
                save(step)
        if checkpointer is not None:
            checkpointer.wait()
    finally:
        bar.close()
    return state
