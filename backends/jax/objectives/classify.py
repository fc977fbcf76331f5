"""Classification: cross-entropy over `data.labels`, trained by the probe runner (probe_runner.py)
as a head on pooled features of a frozen base (methods/probe.py), not by the train steps."""

from __future__ import annotations

from ftc.backends.jax.objectives.contract import PROBE, Registered

RECORD = Registered("classify", build=None, trainer=PROBE)
