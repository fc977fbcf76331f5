"""The train step compiled ahead of its first call: from the abstract train state and batch, in a
thread, while `ftc run` reads the weights, builds the train state or restores a checkpoint.

Start-up is otherwise load, then compile, one after the other; the compile needs only shapes
and shardings (program.Program.abstract_state), so the two can overlap. XLA releases the GIL
while it compiles. The step's own first call then finds the executable in jax's in-memory cache
(the same jitted function, the same avals and shardings), so nothing is compiled twice
(tests/train/test_compile_ahead.py counts the compiles). `ftc plan --compile` compiles the same
step on the same abstract inputs (compiled_memory.py). When a run fails or is stopped while its
step compiles, the `ftc` process exits at once (ftc/console.py); a Python process that called
`pipeline.run` itself waits at exit for the compile to end (`_finish_at_exit`).
"""

from __future__ import annotations

import atexit
import concurrent.futures
import dataclasses
import functools
import logging
import signal
import threading
from collections.abc import Callable
from typing import Any

import jax

from ftc.backends.jax.data import formats

log = logging.getLogger(__name__)
THREAD_NAME = "ftc-compile-ahead"


class BatchKeysError(ValueError):
    """The objective takes batch keys that the data format's rows do not have."""


def abstract_batch(spec, plan, objective, sharding) -> dict:
    """One step's batch as ShapeDtypeStructs: the data format's rows (data/pack.py laid out for
    no items gives every key's trailing shape and dtype) as [accum, micro-batch, ...], as
    step.Steps.put_train_batch shapes them."""
    layout = formats.get(spec.data.format).layout
    rows = layout.lay_out([], plan.batch.seq_len, False).arrays
    missing = [k for k in objective.batch_keys if k not in rows]
    if missing:
        raise BatchKeysError(
            f"objective {objective.name!r} takes batch keys {missing} that "
            f"data.format={spec.data.format!r} rows do not have"
        )
    lead = (plan.batch.accum_steps, plan.batch.micro_batch)

    def one(a):
        return jax.ShapeDtypeStruct(lead + a.shape[1:], a.dtype, sharding=sharding)

    return jax.tree.map(one, {k: rows[k] for k in objective.batch_keys})


@dataclasses.dataclass(frozen=True)
class Compiling:
    """A compile `start` began: its future (the executable) and the exit handler that waits for it."""

    future: concurrent.futures.Future
    at_exit: Callable[[], None]


def start(jitted, *abstract_args: Any) -> Compiling:
    """Lower and compile `jitted` for `abstract_args` (ShapeDtypeStructs with shardings) in a
    thread; `result` gives the executable."""
    future: concurrent.futures.Future = concurrent.futures.Future()

    def compile_() -> None:
        future.set_running_or_notify_cancel()
        try:
            future.set_result(jitted.lower(*abstract_args).compile())
        except BaseException as e:  # handed to whoever waits
            future.set_exception(e)

    thread = threading.Thread(target=compile_, name=THREAD_NAME, daemon=True)
    at_exit = functools.partial(_finish_at_exit, thread)
    atexit.register(at_exit)  # after jax's own handler: runs before it
    thread.start()
    return Compiling(future, at_exit)


def compiling_now() -> bool:
    """Whether a compile `start` began is still running (ftc/console.py asks at exit)."""
    return any(t.name == THREAD_NAME and t.is_alive() for t in threading.enumerate())


def _finish_at_exit(thread: threading.Thread) -> None:
    """A process that ran a run that failed or was stopped while its step compiled exits only once
    the compile is over: jax's exit handler tears the backend down, and XLA must not be compiling
    then. A Ctrl-C while it waits ends the process at once (the default action), no traceback."""
    if thread.is_alive():
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, signal.SIG_DFL)
        thread.join()


def result(compiling: Compiling | None):
    """Wait for the compile `start` began; the executable, or None when there was none or it failed.
    A failure is left to the step's own call, which compiles again and raises with its context."""
    if compiling is None:
        return None
    try:
        return compiling.future.result()
    except Exception as e:  # the step's first call reports it
        log.debug("compiling the train step ahead failed: %s", e)
        return None
    finally:
        if compiling.future.done():
            atexit.unregister(compiling.at_exit)
