"""Run logging: metrics.jsonl (one JSON object per logged step), TensorBoard, a progress bar.

metrics.jsonl rows: {"step", "split": "train" | "validation", "loss", "learning_rate",
"tokens_per_second", "grad_norm", "token_accuracy", ...}; validation rows carry "perplexity";
train rows also "mfu" with "peak_tflops" (its denominator: the peak of every device of the run
together), "host_memory_bytes" / "host_memory_peak_bytes" and, where the device
reports them (GPU, TPU), "memory_bytes" / "memory_peak_bytes".
Only process 0 writes. On resume, rows past the restored step (written by the interrupted run
after its last checkpoint, and about to be redone) are dropped, so the file reads as one run.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import jax

from ftc.backends.jax.state.files import write_text_atomic

METRICS_FILE = "metrics.jsonl"


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep the fact visible
    return value


def truncate_after(path: str, step: int) -> None:
    """Drop metrics rows with step > `step` (atomically rewritten)."""
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    kept = []
    for line in lines:
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
    write_text_atomic(path, "".join(kept))


class RunLogger:
    def __init__(self, run_dir: str, *, tensorboard: bool = True, resume_step: int | None = None):
        self.writer_process = jax.process_index() == 0
        self.path = os.path.join(run_dir, METRICS_FILE)
        self._tb = None
        if not self.writer_process:
            return
        os.makedirs(run_dir, exist_ok=True)
        # A fresh start (no checkpoint) drops every earlier row, the step-0 evaluation's included.
        truncate_after(self.path, -1 if resume_step is None else resume_step)
        self._file = open(self.path, "a", encoding="utf-8")
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(run_dir, "tensorboard"), purge_step=resume_step)

    def log(self, step: int, split: str, metrics: dict[str, float]) -> None:
        if not self.writer_process:
            return
        row = {"step": int(step), "split": split, **{k: _clean(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(f"{split}/{k}", v, step)

    def log_text(self, step: int, tag: str, text: str) -> None:
        """Text (markdown) to TensorBoard; metrics.jsonl rows carry their own text via `log`."""
        if self.writer_process and self._tb is not None:
            self._tb.add_text(tag, text, step)

    def close(self) -> None:
        if not self.writer_process:
            return
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def device_memory() -> dict[str, float]:
    """Peak and current bytes in use on the first local device, where the platform reports them
    (GPU/TPU; the CPU backend does not)."""
    try:
        stats = jax.local_devices()[0].memory_stats() or {}
    except Exception:  # noqa: BLE001 - a backend without memory stats
        return {}
    out = {}
    if "peak_bytes_in_use" in stats:
        out["memory_peak_bytes"] = float(stats["peak_bytes_in_use"])
    if "bytes_in_use" in stats:
        out["memory_bytes"] = float(stats["bytes_in_use"])
    return out


def host_memory() -> dict[str, float]:
    """This process's resident memory now and at its peak (Linux /proc; elsewhere the peak from
    getrusage). The peak is VmHWM, not ru_maxrss: ru_maxrss carries a parent's peak across exec."""
    out: dict[str, float] = {}
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    out["host_memory_bytes" if key == "VmRSS" else "host_memory_peak_bytes"] = (
                        float(value.split()[0]) * 1024
                    )
    except OSError:
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out["host_memory_peak_bytes"] = float(peak if sys.platform == "darwin" else peak * 1024)
    return out
