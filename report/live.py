"""The report a run keeps up to date (`logging.report`): RUN_DIR/report.html, refreshed when the
loop has logged metrics, at most once per `every_seconds` (the page reloads itself as often, so
refreshing faster shows nothing more), and once more at the end without the reload.

A report is a view of the run directory: when it cannot be written the run goes on, and says so
once.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from ftc.report import LIVE_REFRESH_SECONDS, REPORT_FILE, write_report
from ftc.report.rundir import METRICS


class LiveReport:
    def __init__(
        self, run_dir: str, *, echo: Callable[[str], None] = print, every_seconds: float = LIVE_REFRESH_SECONDS
    ):
        self.run_dir = run_dir
        self.echo = echo
        self.every_seconds = every_seconds
        self._last = -float("inf")
        self._warned = False

    @property
    def path(self) -> str:
        return os.path.join(self.run_dir, REPORT_FILE)

    def __call__(self, step: int) -> None:
        """Metrics were logged at `step`: refresh if the last refresh is old enough."""
        if time.monotonic() - self._last >= self.every_seconds:
            self._write(live=True, step=step)

    def final(self) -> None:
        """The last refresh, without the reload; none when nothing was logged (a run that failed
        or was stopped before its first step: its own message says why, a report would only say
        that there is nothing to show)."""
        metrics = os.path.join(self.run_dir, METRICS)
        if os.path.exists(metrics) and os.path.getsize(metrics) > 0:
            self._write(live=False, step=None)

    def _write(self, *, live: bool, step: int | None) -> None:
        self._last = time.monotonic()
        try:
            write_report([self.run_dir], self.path, live=live)
        except Exception as e:  # noqa: BLE001 - a view of the run never stops the run
            if not self._warned:
                self._warned = True
                at = f" at step {step}" if step is not None else ""
                self.echo(f"warning: {self.path} not refreshed{at}: {type(e).__name__}: {e}")
