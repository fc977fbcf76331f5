"""Reports on run directories: `ftc report`, `ftc diff`, and the report.html `ftc run` refreshes.

    write_report(["runs/a", "runs/b"], "report.html")   # -> Written(html, pngs)

Everything shown is read from the run directories (rundir.py): metrics.jsonl, spec.resolved.json,
data_stats.json, plan.json, probe_metrics.json, export/ftc_export.json. Nothing is recomputed,
and nothing here imports jax: a report renders on any machine that has the run directory.
The HTML is one self-contained file; the same charts are also written as PNGs into
`<name>_charts/` beside it.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from collections.abc import Sequence

from ftc.report import charts as charts_lib
from ftc.report import page
from ftc.report.rundir import ReportError, Run, read_run

__all__ = ["ReportError", "Run", "read_run", "write_report", "Written", "REPORT_FILE", "charts_dir"]

REPORT_FILE = "report.html"
LIVE_REFRESH_SECONDS = 60


@dataclasses.dataclass(frozen=True)
class Written:
    html: str
    pngs: tuple[str, ...]
    runs: tuple[Run, ...]


def charts_dir(html_path: str) -> str:
    stem, _ = os.path.splitext(html_path)
    return f"{stem}_charts"


def distinct(run_dirs: Sequence[str | os.PathLike]) -> list[str]:
    """The run directories, each once, in order. A run named twice (runs/a and runs/a/, or through a
    link) is one run: drawn twice it had two legend entries of one colour and two columns of one spec."""
    seen: dict[str, str] = {}
    for d in run_dirs:
        seen.setdefault(os.path.realpath(d), os.fspath(d))
    return list(seen.values())


def default_out(run_dirs: Sequence[str]) -> str:
    """One run: RUN_DIR/report.html; several: ./report.html."""
    return os.path.join(run_dirs[0], REPORT_FILE) if len(run_dirs) == 1 else REPORT_FILE


def is_report(path: str) -> bool:
    """Whether `path` is an HTML page `ftc report` or `ftc data inspect` wrote: the only file an
    --out (--html) may replace (a typo'd --out naming a data file or a spec would otherwise be
    overwritten)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return False
    return head.startswith(b"<!doctype html>") and any(
        t in head for t in (b"<title>ftc report: ", b"<title>ftc data inspect: ")
    )


def _is_charts_dir(path: str) -> bool:
    # What write_report leaves there: PNGs only. Anything else is the user's and is never replaced.
    try:
        return all(name.endswith(".png") and os.path.isfile(os.path.join(path, name)) for name in os.listdir(path))
    except OSError:
        return False


def out_problem(out: str, option: str = "--out", *, charts: bool = True) -> str | None:
    """Why an HTML page (and, with `charts`, its charts folder) must not be written at `out`, or None; checked
    before any work, so a bad path costs nothing and leaves nothing behind. Missing folders are
    made; one that is a file is named (makedirs would say only "File exists")."""
    if not out:
        return f"{option} is empty; it names the HTML file to write"
    # "reports/" that does not exist yet would otherwise become a file named reports
    if os.path.isdir(out) or out.endswith((os.sep, "/")):
        return f"{os.path.abspath(out)}: is a directory; {option} names the HTML file to write"
    out = os.path.abspath(out)
    if os.path.exists(out) and not is_report(out):
        return f"{out}: exists and is not a report ftc wrote (it replaces only those); choose another {option}"
    pngs = charts_dir(out)
    if charts and os.path.lexists(pngs) and not (os.path.isdir(pngs) and _is_charts_dir(pngs)):
        return f"{pngs}: exists and is not a charts folder ftc wrote (PNGs only); choose another {option}"
    ancestor = os.path.dirname(out)
    while not os.path.exists(ancestor) and ancestor != os.path.dirname(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        return f"{out}: {ancestor} is not a directory"
    return None


def write_report(run_dirs: Sequence[str | os.PathLike], out: str | None = None, *, live: bool = False) -> Written:
    """Read the runs, draw the charts, write `out` (HTML) and its PNGs. All or nothing: both are
    written beside their targets and renamed into place. Raises ReportError naming a bad run."""
    dirs = distinct(run_dirs)
    if not dirs:
        raise ReportError("no run directory given")
    runs = _unique_names([read_run(d) for d in dirs])
    out = out if out is not None else default_out(dirs)
    problem = out_problem(out)
    if problem:
        raise ReportError(problem)
    out = os.path.abspath(out)
    planned = charts_lib.plan_charts(runs)
    names = [r.name for r in runs]
    drawn = [charts_lib.draw(c, names) for c in planned]
    probe_png = charts_lib.draw_probe(runs)
    text = page.render(runs, drawn, probe_png, refresh_seconds=LIVE_REFRESH_SECONDS if live else 0)

    folder = os.path.dirname(out)
    os.makedirs(folder, exist_ok=True)
    pngs_final = charts_dir(out)
    staging = tempfile.mkdtemp(prefix=".report-", dir=folder)
    try:
        files = {f"{c.group.key}.png": c.png for c in drawn}
        if probe_png:
            files["probe.png"] = probe_png
        png_dir = os.path.join(staging, "charts")
        os.makedirs(png_dir)
        for name, data in files.items():
            with open(os.path.join(png_dir, name), "wb") as f:
                f.write(data)
        with open(os.path.join(staging, "report.html"), "w", encoding="utf-8") as f:
            f.write(text)
        old = None
        if os.path.exists(pngs_final):
            old = os.path.join(staging, "old")
            os.replace(pngs_final, old)
        os.replace(png_dir, pngs_final)
        os.replace(os.path.join(staging, "report.html"), out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return Written(out, tuple(os.path.join(pngs_final, n) for n in files), runs)


def _unique_names(runs: Sequence[Run]) -> tuple[Run, ...]:
    # Two runs of one name (the same spec in two output dirs) are told apart by their paths.
    names = [r.name for r in runs]
    return tuple(
        dataclasses.replace(r, name=f"{r.name} ({os.path.relpath(r.path)})") if names.count(r.name) > 1 else r
        for r in runs
    )
