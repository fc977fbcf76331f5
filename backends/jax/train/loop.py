"""The training loop: steps from the state's step to the plan's total, with logging, evaluation,
checkpoints and a clean stop.

`train_loop` is a function of its inputs (jitted steps, state, batch iterator, LoopConfig), so tests
drive it with any model and iterator. SIGTERM / SIGINT ask the loop to stop (`StopSignals`): it
saves a checkpoint, waits for it, and raises `Interrupted` (a non-zero exit); `ftc run` on the same
spec resumes from there. Outside the loop (setting up, exporting) a signal raises `Interrupted` at
once.

A stop is honoured within one step: after dispatching step N the host waits for step N-1 to
finish (its metrics), so at most one step (QUEUED) waits behind the one the device runs and the
device never idles for want of work; a signal then waits for those two steps only before the
checkpoint is written (without the bound the host would queue every step up to the next log
point). Evaluation stops between batches (its partial result is not logged; the checkpoint says
to redo it), and a signal that lands after the last step was dispatched, or during the final
save, still ends the run with `Interrupted`.
"""

from __future__ import annotations

import collections
import dataclasses
import signal
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax

from ftc.backends.jax.state import checkpoint as ckpt_lib
from ftc.backends.jax.train import run_log
from ftc.backends.jax.train import step as ts

# Steps the host may queue behind the one the device runs (bench/loop_stop.py measures the cost).
QUEUED = 1
SHOWN_VALIDATION = ("loss", "perplexity", "token_accuracy", "reward_accuracy", "reward_margin")


class Interrupted(SystemExit):
    """The run was asked to stop (SIGTERM/SIGINT) and saved a checkpoint first."""


# ------------------------------------------------------------------ stop signals


class StopSignals:
    """SIGTERM / SIGINT while active: inside the loop (`deferred`) a flag the loop polls, once per
    step (a second SIGINT stops at once, saving nothing); outside it `Interrupted` at once, with
    `outside` saying what that means for the run."""

    def __init__(self):
        self.signum: int | None = None
        self.deferred = False
        self.outside = "stopped before training; nothing new was saved: run again"
        self._old: dict[int, Any] = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if not self.deferred:
            raise Interrupted(f"{name}: {self.outside}")
        if self.signum is not None and signum == signal.SIGINT:
            raise Interrupted(f"{name} again: stopped at once, without waiting for the checkpoint")
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
    eval_first: bool = False  # evaluate at the starting step, whatever it is: one a stop cut short
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
    generation_eval: Callable[[dict, int], dict] | None = None,
    on_metrics: Callable[[int], None] | None = None,
) -> dict:
    """Train from `state["step"]` to `config.total_steps`. Returns the final state.

    `train_iter` yields host batches of [global batch (this process's share), T] and has
    get_state() (grain); its state is saved with every checkpoint. `after_step(step)` is a test
    hook, called after each step is dispatched. `generation_eval(state, step)` runs after each
    validation (generate/in_run.py: it logs sample generations) and returns metrics to show;
    `on_metrics(step)` is called after metrics are logged (train or validation), e.g. to refresh
    the run's report.
    """
    from tqdm import tqdm

    step = start = int(jax.device_get(state["step"]))
    saved_at = start if start else None  # a resumed run starts from its checkpoint at `start`
    # The bar counts completed steps and its ETA is the mean time of the steps since the first
    # completed one (which compiles), evaluations and checkpoint saves left out: steady, unlike a
    # moving average.
    bar = tqdm(
        total=config.total_steps,
        initial=step,
        disable=not config.progress or jax.process_index() != 0,
        unit="step",
        dynamic_ncols=True,
        smoothing=0,
        # No elapsed time: the timer restarts after the first step, so it would not be the run's.
        bar_format="{percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [ETA {remaining}, {rate_fmt}{postfix}]",
    )
    timed_from_first = False

    def completed(upto: int) -> None:
        nonlocal timed_from_first
        if upto > bar.n:
            bar.update(upto - bar.n)
            if not timed_from_first:
                bar.initial, bar.start_t, bar.last_print_t = bar.n, time.time(), time.time()
                timed_from_first = True

    window_tokens, window_steps, window_start = 0.0, 0, time.perf_counter()
    metrics = None  # the last step's metrics (device arrays), checked before any save
    stopping = lambda: stop is not None and stop.signum is not None
    eval_cut = False  # a stop cut the evaluation at the current step short: the next run redoes it
    in_flight = collections.deque()  # metrics of the steps dispatched before the last one

    def checked(at: int) -> dict | None:
        # Reading the loss waits for the step: done at log/checkpoint/stop points only, so the
        # host runs ahead of the device (by QUEUED steps) in between. No checkpoint holds an
        # unchecked state.
        if metrics is None:
            return None
        host = ts.host_metrics(metrics)
        ts.check_finite(host, at)
        return host

    def save(at: int):
        nonlocal saved_at
        checked(at)
        if checkpointer is not None and saved_at != at:
            checkpointer.save(at, state, train_iter.get_state(), {**metadata, "eval_pending": eval_cut})
            saved_at = at

    def until_stopped(batches):
        for batch in batches:
            if stopping():
                return
            yield batch

    def run_eval(at: int):
        nonlocal window_start, eval_cut
        if eval_batches is None:
            return
        # The step that made `state` may still run: let it finish (training time), so the evaluation's
        # program never runs beside a train step on the same devices.
        jax.block_until_ready(state)
        began = time.perf_counter()
        result = ts.evaluate(steps, state, until_stopped(eval_batches()))
        if stopping():  # cut short: not logged; the checkpoint says to redo it
            eval_cut = True
            return
        if logger:
            logger.log(at, "validation", result)
        if on_metrics is not None:
            on_metrics(at)
        shown = [f"{k.replace('_', ' ')} {result[k]:.4f}" for k in SHOWN_VALIDATION if k in result]
        if jax.process_index() == 0:
            bar.write(f"step {at}: validation {', '.join(shown)}")
        if generation_eval is not None:
            generated = generation_eval(state, at)
            if jax.process_index() == 0:
                bar.write(f"step {at}: generation {', '.join(f'{k} {v:.4f}' for k, v in generated.items())}")
        window_start += time.perf_counter() - began  # tokens/s counts training time only
        bar.unpause()  # nor does the ETA

    def stop_here():
        name = signal.Signals(stop.signum).name
        if step == start:  # nothing new: step 0, or the checkpoint this run resumed from
            raise Interrupted(
                f"{name}: stopped at step {step} before any step ran; "
                + (f"the checkpoint at step {step} stands; run again to resume" if step else "run again to start")
            )
        save(step)
        if checkpointer is not None:
            checkpointer.wait()
        last = " (the last: running again exports)" if step == config.total_steps else ""
        raise Interrupted(f"{name}: saved a checkpoint at step {step}{last}; run again to resume")

    if stop is not None:
        stop.deferred = True
    try:
        if (step == 0 and config.eval_at_start) or config.eval_first:
            run_eval(step)
        while step < config.total_steps:
            if stopping():
                stop_here()
            batch = next(train_iter)
            in_flight.append(metrics)
            state, metrics = steps.train(state, steps.put_train_batch(batch))
            step += 1
            window_tokens += float(ts.real_tokens(batch)) * jax.process_count()
            window_steps += 1
            if after_step is not None:
                after_step(step)
            # At most QUEUED steps queued behind the running one: a stop waits for those only.
            while len(in_flight) >= QUEUED:
                jax.block_until_ready(in_flight.popleft())
            completed(step - 1 - len(in_flight))
            last = step == config.total_steps
            if step % max(config.log_every, 1) == 0 or last:
                host = checked(step)
                completed(step)
                elapsed = max(time.perf_counter() - window_start, 1e-9)
                row = {**host, "tokens_per_second": window_tokens / elapsed}
                if config.flops_per_step and config.peak_flops:
                    row["mfu"] = config.flops_per_step * window_steps / elapsed / config.peak_flops
                    row["peak_tflops"] = config.peak_flops / 1e12
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
                completed(step)
                bar.unpause()
        if checkpointer is not None:
            checkpointer.wait()
        if stopping():  # landed after the last step was dispatched, or during the final save
            stop_here()
    finally:
        if stop is not None:
            stop.deferred = False
        bar.close()
    return state
