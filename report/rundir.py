"""Read a run directory of `ftc run` as plain data: what a report shows, never recomputed.

    run = read_run("runs/quickstart")
    run.series[("validation", "loss")]        # ((step, value), ...) in step order
    run.spec, run.data_stats, run.plan, run.probe, run.samples, run.problems

Files read (each optional except that a run has a spec.resolved.json or a metrics.jsonl):
spec.resolved.json, metrics.jsonl, data_stats.json, plan.json, probe_metrics.json,
export/ftc_export.json. A metrics line that is not a JSON object (one cut short by a kill, say)
is skipped and named by file:line in `problems`; the report shows them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

RESOLVED_SPEC = "spec.resolved.json"
METRICS = "metrics.jsonl"
DATA_STATS = "data_stats.json"
PLAN = "plan.json"
PROBE_METRICS = "probe_metrics.json"
EXPORT_MANIFEST = os.path.join("export", "ftc_export.json")

# What run_log writes for a float JSON cannot hold (run_log._clean), read back as the float.
_NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf, "infinity": math.inf, "-infinity": -math.inf}


STEP_LIMIT = 2**63  # a step or integer value beyond int64 is no run's: a step is skipped, a value reads as inf


class ReportError(Exception):
    """A path that cannot be reported on; the message names it and says why, in one line."""


@dataclasses.dataclass(frozen=True)
class Run:
    path: str  # absolute run directory
    name: str  # spec's name, else the directory's
    spec: dict | None  # spec.resolved.json
    series: dict[tuple[str, str], tuple[tuple[int, float], ...]]  # (split, metric) -> points
    samples: tuple[tuple[int, str, str, Any], ...]  # (step, split, key, value): non-numeric values
    events: tuple[dict, ...]  # rows without a step (e.g. the probe's "probe_eval")
    data_stats: dict | None
    plan: dict | None
    probe: dict | None  # probe_metrics.json
    export: dict | None  # export/ftc_export.json
    problems: tuple[str, ...]  # lines skipped or files unreadable, "file:line: why"

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(split for split, _ in self.series))

    def last(self, split: str, metric: str) -> tuple[int, float] | None:
        points = self.series.get((split, metric))
        return points[-1] if points else None

    @property
    def last_step(self) -> int | None:
        steps = [points[-1][0] for points in self.series.values() if points]
        return max(steps) if steps else None

    @property
    def total_steps(self) -> int | None:
        for steps in (
            subtree(self.plan, "steps").get("total_steps"),
            (self.probe or {}).get("steps"),
            subtree(self.spec, "training").get("steps"),
        ):
            if isinstance(steps, int) and not isinstance(steps, bool):
                return steps
        return None


def subtree(tree: Any, key: str) -> dict:
    """`tree[key]` when both are JSON objects, else {}: a run's files are read as they are (edited by
    hand, from another version), and a value of the wrong kind is shown as absent, never a crash."""
    value = tree.get(key) if isinstance(tree, dict) else None
    return value if isinstance(value, dict) else {}


def is_run_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, RESOLVED_SPEC)) or os.path.isfile(os.path.join(path, METRICS))


def read_run(path: str | os.PathLike, *, need_metrics: bool = True) -> Run:
    """The run at `path`. Raises ReportError for a path that is not a run directory, or (with
    `need_metrics`) a run that has logged nothing yet."""
    path = os.path.abspath(os.fspath(path))
    if not os.path.exists(path):
        raise ReportError(f"{path}: no such directory")
    if not os.path.isdir(path):
        raise ReportError(f"{path}: not a directory; expected a run directory of `ftc run`{_spec_hint(path)}")
    if not is_run_dir(path):
        raise ReportError(
            f"{path}: not a run directory of `ftc run` (it has no {RESOLVED_SPEC} and no {METRICS}){_runs_inside(path)}"
        )
    problems: list[str] = []
    spec = _read_json(path, RESOLVED_SPEC, problems)
    series, samples, events = _read_metrics(os.path.join(path, METRICS), problems)
    if need_metrics and not series and not events:
        skipped = [p for p in problems if p.startswith(os.path.join(path, METRICS) + ":")]
        if skipped:  # not "no rows": rows there are, and none could be read
            first = skipped[0].removesuffix("; skipped")
            raise ReportError(
                f"{path}: no readable metrics: {len(skipped)} line(s) of {METRICS} skipped, first {first}"
            )
        raise ReportError(
            f"{path}: no metrics yet ({METRICS} is missing or has no rows); the run has not logged a step"
        )
    name = spec.get("name") if isinstance(spec, dict) and isinstance(spec.get("name"), str) else None
    return Run(
        path=path,
        name=name or os.path.basename(path),
        spec=spec if isinstance(spec, dict) else None,
        series=series,
        samples=samples,
        events=events,
        data_stats=_read_json(path, DATA_STATS, problems),
        plan=_read_json(path, PLAN, problems),
        probe=_read_json(path, PROBE_METRICS, problems),
        export=_read_json(path, EXPORT_MANIFEST, problems),
        problems=tuple(problems),
    )


def _spec_hint(path: str) -> str:
    """For a spec given where its run belongs: the run directory `ftc run` writes for it."""
    if not path.endswith((".toml", ".json")) or os.path.basename(path) == RESOLVED_SPEC:
        return ""
    from ftc.spec import load_spec

    try:
        run_dir = load_spec(path).run_dir
    except Exception:  # noqa: BLE001 - only a hint: a spec that does not load gets the plain message
        return " (a spec? report on the run directory `ftc run` wrote for it)"
    return f" (a spec; its run is written to {os.path.relpath(run_dir)}: ftc report {os.path.relpath(run_dir)})"


def _runs_inside(path: str) -> str:
    """A hint for the folder that holds runs (an output_dir), not one run: which, and how to name them."""
    try:
        inside = sorted(e.name for e in os.scandir(path) if e.is_dir() and is_run_dir(e.path))
    except OSError:
        return ""
    if not inside:
        return ""
    shown = ", ".join(inside[:3]) + (", ..." if len(inside) > 3 else "")
    return f"; it holds {len(inside)} run(s) ({shown}): ftc report {os.path.join(path, '*')}"


def _read_json(run_dir: str, name: str, problems: list[str]) -> Any:
    full = os.path.join(run_dir, name)
    if not os.path.isfile(full):
        return None
    try:
        with open(full, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, ValueError, RecursionError) as e:  # ValueError: JSONDecodeError, UnicodeDecodeError, 4300+ digits
        problems.append(f"{full}: not readable as JSON ({_why(e)}); left out")
        return None
    if not isinstance(value, dict):
        problems.append(f"{full}: expected a JSON object, found {type(value).__name__}; left out")
        return None
    return value


def _why(error: Exception) -> str:
    # json's decoder recurses: nesting deeper than the interpreter's limit is a RecursionError.
    return "nested too deeply" if isinstance(error, RecursionError) else str(error)


def number(value: Any) -> float | None:
    """A metric value as a float (non-finite ones included), or None for anything else."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int) and not -STEP_LIMIT <= value < STEP_LIMIT:  # float() overflows past 1e308
        return math.inf if value > 0 else -math.inf
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        return _NON_FINITE.get(value.strip().lower())
    return None


def _read_metrics(path: str, problems: list[str]):
    points: dict[tuple[str, str], dict[int, float]] = {}
    samples, events = [], []
    if not os.path.isfile(path):
        return {}, (), ()
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.readlines()
    except OSError as e:
        problems.append(f"{path}: not readable ({e})")
        return {}, (), ()
    for number_, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (ValueError, RecursionError) as e:  # a JSONDecodeError, or an integer of 4300+ digits
            why = e.msg if isinstance(e, json.JSONDecodeError) else _why(e)
            problems.append(f"{path}:{number_}: not a JSON object ({why}); skipped")
            continue
        if not isinstance(row, dict):
            problems.append(f"{path}:{number_}: expected a JSON object, found {type(row).__name__}; skipped")
            continue
        step = row.get("step")
        if isinstance(step, bool) or not isinstance(step, int) or not -STEP_LIMIT <= step < STEP_LIMIT:
            if isinstance(step, int) and not isinstance(step, bool):
                problems.append(f"{path}:{number_}: 'step' is an integer beyond int64; skipped")
            elif "step" in row:
                problems.append(f"{path}:{number_}: 'step' is {step!r}, expected an integer; skipped")
            elif "event" in row:  # the probe's "probe_eval": the one row a run writes without a step
                events.append(row)
            else:  # drawn nowhere, so named: a report of such rows alone showed an empty page
                problems.append(f"{path}:{number_}: no 'step' (an integer) and no 'event'; skipped")
            continue
        split = row["split"] if isinstance(row.get("split"), str) and row["split"].strip() else "train"
        for key, value in row.items():
            if key in ("step", "split"):
                continue
            x = number(value)
            if x is not None:
                # A resumed run rewrites rows past its checkpoint: the last row of a step wins.
                points.setdefault((split, key), {})[step] = x
            elif value is not None:
                samples.append((step, split, key, value))
    series = {k: tuple(sorted(v.items())) for k, v in points.items()}
    return series, tuple(samples), tuple(events)
