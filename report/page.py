"""The report page: one self-contained HTML file (inline CSS, PNG charts as data: URIs, no script
and no link to anything), so it opens offline, from a CI artifact or mailed as one file.

Each chart is a <figure class="chart"> whose `data-series` attribute lists what it draws (run,
split, metric, colour, points): the headless-browser test reads it to check each chart shows its
data.
"""

from __future__ import annotations

import base64
import datetime
import html
import json
import math
import statistics
from collections.abc import Sequence
from typing import Any

from ftc import __version__
from ftc.report import diff as diff_lib
from ftc.report.charts import SECTIONS, Chart
from ftc.report.rundir import Run, subtree

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:0;color:#1b1f24}
header{background:#0f2a44;color:#fff;padding:16px 28px}header h1{margin:0;font-size:21px}
header p{margin:4px 0 0;color:#c8d6e5;font-size:13px}
main{padding:8px 28px 40px;max-width:1360px}
h2{font-size:17px;border-bottom:1px solid #d0d7de;padding-bottom:4px;margin-top:28px}
h3{font-size:15px;margin:18px 0 6px}
table{border-collapse:collapse;font-size:13px;margin:6px 0}
th,td{border:1px solid #d0d7de;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f3f5f7}td.num{text-align:right;font-variant-numeric:tabular-nums}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(560px,1fr));gap:14px}
figure.chart{margin:0;border:1px solid #d0d7de;border-radius:6px;padding:6px;background:#fff}
figure.chart img{width:100%;height:auto;display:block}
figcaption{font-size:12px;color:#57606a;padding:2px 4px}
pre{background:#f6f8fa;border:1px solid #d0d7de;padding:8px;overflow:auto;font-size:12px;max-height:480px}
.problems{background:#fff8c5;border:1px solid #d4a72c;padding:6px 12px;border-radius:6px}
.muted{color:#57606a}details{margin:6px 0}summary{cursor:pointer;font-weight:600}
"""


PROBLEMS_SHOWN = 20  # lines of "Left out" on the page


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            return str(value)
        if value != 0 and (abs(value) >= 1e6 or abs(value) < 1e-3):
            return f"{value:.{digits - 1}e}"
        return f"{value:.{digits}g}"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


def gib(value: float | None) -> str:
    return "–" if value is None else f"{value / 2**30:.2f} GiB"


def table(header: Sequence[str], rows: Sequence[Sequence[Any]], numeric: Sequence[bool] = ()) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = []
    for row in rows:
        cells = []
        for i, cell in enumerate(row):
            cls = ' class="num"' if i < len(numeric) and numeric[i] else ""
            cells.append(f"<td{cls}>{cell}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def key_values(tree: dict, skip: Sequence[str] = ()) -> str:
    flat = {k: v for k, v in diff_lib.flatten(tree).items() if k.split(".")[0] not in skip}
    return table(("key", "value"), [(esc(k), esc(fmt(v))) for k, v in flat.items()])


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


# ------------------------------------------------------------------ summary


def _median(run: Run, metric: str) -> float | None:
    points = run.series.get(("train", metric))
    values = [v for s, v in points or () if v == v]
    # The first logged window holds the compile: leave it out of a typical figure when others exist.
    return statistics.median(values[1:] if len(values) > 2 else values) if values else None


def _maximum(run: Run, metric: str) -> float | None:
    values = [v for split in run.splits for _, v in run.series.get((split, metric), ()) if v == v]
    return max(values) if values else None


def non_finite(run: Run) -> list[str]:
    """Where a run's loss stopped being a number: what a reader must see before reading the curves."""
    found = []
    for split in run.splits:
        bad = [step for step, v in run.series.get((split, "loss"), ()) if not math.isfinite(v)]
        if bad:
            found.append(
                f"{run.name}: the {split} loss is not a finite number from step {bad[0]} ({len(bad)} logged value(s))"
            )
    return found


def status(run: Run) -> str:
    last, total = run.last_step, run.total_steps
    done = run.export is not None or run.probe is not None or (last is not None and total and last >= total)
    where = f"step {fmt(last)}" + (f" of {fmt(total)}" if total else "")
    return f"{where}, {'finished' if done else 'in progress or stopped'}"


def summary_rows(runs: Sequence[Run]) -> str:
    header = (
        "run", "status", "method", "objective", "base", "train loss", "validation loss (best)",
        "validation perplexity", "validation token accuracy", "tokens/s (median)", "MFU (median)",
        "peak memory (host / device)", "export",
    )  # fmt: skip
    rows = []
    for run in runs:
        train = run.last("train", "loss")
        val = run.last("validation", "loss")
        best = min((v for _, v in run.series.get(("validation", "loss"), ()) if v == v), default=None)
        ppl = run.last("validation", "perplexity")
        acc = run.last("validation", "token_accuracy")
        mfu = _median(run, "mfu")
        export = run.export or {}
        rows.append(
            (
                f"<b>{esc(run.name)}</b><br><span class=muted>{esc(run.path)}</span>",
                esc(status(run)),
                esc(subtree(run.spec, "method").get("kind", "–")),
                esc(subtree(run.spec, "training").get("objective", "–")),
                esc(subtree(run.spec, "model").get("base", "–")),
                esc(fmt(train[1]) if train else "–"),
                esc(f"{fmt(val[1])} ({fmt(best)})" if val else "–"),
                esc(fmt(ppl[1]) if ppl else "–"),
                esc(fmt(acc[1]) if acc else "–"),
                esc(fmt(_median(run, "tokens_per_second"), 5)),
                esc("–" if mfu is None else f"{mfu:.2%}"),
                esc(f"{gib(_maximum(run, 'host_memory_peak_bytes'))} / {gib(_maximum(run, 'memory_peak_bytes'))}"),
                esc(" ".join(str(export.get(k)) for k in ("format", "dtype") if export.get(k)) or "–"),
            )
        )
    return table(header, rows)


# ------------------------------------------------------------------ sections


def chart_figure(chart: Chart) -> str:
    series = [
        {"run": s.run, "split": s.split, "metric": s.metric, "colour": s.colour, "points": len(s.points)}
        for s in chart.series
    ]
    steps = sorted({p[0] for s in chart.series for p in s.points})
    caption = f"{len(chart.series)} series, steps {steps[0]}–{steps[-1]}" if steps else "no data"
    return (
        f'<figure class="chart" id="chart-{esc(chart.group.key)}" data-chart="{esc(chart.group.key)}" '
        f"data-series='{esc(json.dumps(series))}'>"
        f'<img alt="{esc(chart.group.title)}" src="{data_uri(chart.png)}">'
        f"<figcaption>{esc(caption)}</figcaption></figure>"
    )


def charts_section(charts: Sequence[Chart]) -> str:
    out = []
    for section in SECTIONS:
        inside = [c for c in charts if c.group.section == section]
        if inside:
            out.append(f"<h2>{esc(section)}</h2><div class=grid>{''.join(chart_figure(c) for c in inside)}</div>")
    return "".join(out)


def probe_section(runs: Sequence[Run], png: bytes | None) -> str:
    probed = [r for r in runs if r.probe]
    if not probed:
        return ""
    rows = []
    for run in probed:
        for split in ("train", "validation"):
            m = run.probe.get(split)
            if isinstance(m, dict):
                rows.append(
                    [esc(run.name), esc(split)]
                    + [esc(fmt(m.get(k))) for k in ("accuracy", "majority_accuracy", "macro_f1", "majority_macro_f1")]
                    + [esc(fmt(m.get("examples")))]
                )
    head = ("run", "split", "accuracy", "majority accuracy", "macro-F1", "majority macro-F1", "examples")
    figure = ""
    if png:
        figure = (
            '<div class=grid><figure class="chart" data-chart="probe" data-series=\'[]\'>'
            f'<img alt="Probe metrics" src="{data_uri(png)}"><figcaption>probe against always predicting the '
            "training set's majority label</figcaption></figure></div>"
        )
    return f"<h2>Probe</h2>{figure}{table(head, rows, (False, False, True, True, True, True, True))}"


def sample_block(value: Any) -> str:
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        columns = list(dict.fromkeys(k for v in value for k in v))
        rows = [
            [f"<pre>{esc(v.get(c, ''))}</pre>" if isinstance(v.get(c), str) else esc(fmt(v.get(c))) for c in columns]
            for v in value
        ]
        return table(columns, rows)
    if isinstance(value, dict):
        return key_values(value)
    if isinstance(value, list):
        return (
            "<ol>"
            + "".join(f"<li><pre>{esc(v if isinstance(v, str) else json.dumps(v))}</pre></li>" for v in value)
            + "</ol>"
        )
    return f"<pre>{esc(value)}</pre>"


def samples_section(runs: Sequence[Run]) -> str:
    blocks = []
    for run in runs:
        for step, split, key, value in run.samples:
            blocks.append(
                f"<details{' open' if not blocks else ''}><summary>{esc(run.name)} · step {step} · {esc(split)} · "
                f"{esc(key)}</summary>{sample_block(value)}</details>"
            )
    return f"<h2>Samples</h2>{''.join(blocks)}" if blocks else ""


def plan_block(plan: dict) -> str:
    summary = {k: v for k, v in plan.items() if k not in ("params", "notes", "fingerprint")}
    listed = lambda key: plan.get(key) if isinstance(plan.get(key), list) else []  # a list of the wrong kind: none
    notes = "".join(f"<li>{esc(n)}</li>" for n in listed("notes"))
    params = listed("params")
    rows = [
        (
            esc(p.get("path")),
            esc(p.get("shape")),
            esc(p.get("dtype")),
            esc(p.get("partition")),
            esc(fmt(p.get("trainable"))),
        )
        for p in params
        if isinstance(p, dict)
    ]
    return (
        key_values(summary)
        + (f"<p>Notes:</p><ul>{notes}</ul>" if notes else "")
        + f"<details><summary>{len(rows)} parameters</summary>"
        + table(("path", "shape", "dtype", "partition", "trainable"), rows)
        + "</details>"
    )


def run_section(run: Run) -> str:
    parts = [f"<h2>Run {esc(run.name)}</h2><p class=muted>{esc(run.path)}</p>"]
    if run.data_stats:
        parts.append("<h3>Data</h3>" + key_values(run.data_stats))
    if run.plan:
        parts.append("<h3>Plan</h3>" + plan_block(run.plan))
    if run.export:
        parts.append("<h3>Export</h3>" + key_values(run.export))
    if run.spec:
        parts.append(
            f"<details><summary>Resolved spec (spec.resolved.json)</summary><pre>{esc(json.dumps(run.spec, indent=2))}"
            "</pre></details>"
        )
    return "".join(parts)


def differences_section(runs: Sequence[Run]) -> str:
    if len(runs) < 2:
        return ""
    with_spec = [r for r in runs if r.spec]
    if len(with_spec) < 2:
        return ""
    rows = diff_lib.differing([r.spec for r in with_spec])
    body = table(
        ["key"] + [r.name for r in with_spec], [[esc(k)] + [esc(diff_lib.show(v)) for v in vals] for k, vals in rows]
    )
    return f"<h2>Spec differences</h2>{body if rows else '<p>The resolved specs are identical.</p>'}"


def render(runs: Sequence[Run], charts: Sequence[Chart], probe_png: bytes | None, *, refresh_seconds: int = 0) -> str:
    """The whole page. `refresh_seconds` > 0: the browser reloads it (a run in progress)."""
    names = ", ".join(r.name for r in runs)
    when = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    meta = f'<meta http-equiv="refresh" content="{refresh_seconds}">' if refresh_seconds else ""
    live = f" · reloads every {refresh_seconds} s while the run is going" if refresh_seconds else ""
    problems = [p for r in runs for p in r.problems]
    # A file of garbage (binary appended, another tool's log) is one line per row: the first ones
    # say what is wrong; 100,000 of them made a 10 MB page with the charts at its end.
    shown = [esc(p) for p in problems[:PROBLEMS_SHOWN]]
    shown += [f"... and {len(problems) - PROBLEMS_SHOWN:,} more"] if len(problems) > PROBLEMS_SHOWN else []
    problem_box = (
        "<div class=problems><b>Left out:</b><ul>" + "".join(f"<li>{p}</li>" for p in shown) + "</ul></div>"
        if problems
        else ""
    )
    nan = [w for r in runs for w in non_finite(r)]
    nan_box = (
        "<div class=problems><b>Not a number:</b><ul>" + "".join(f"<li>{esc(w)}</li>" for w in nan) + "</ul></div>"
        if nan
        else ""
    )
    empty = "" if charts else "<p>No numeric metrics logged yet.</p>"
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8">{meta}'
        f'<meta name="viewport" content="width=device-width"><title>ftc report: {esc(names)}</title>'
        f"<style>{CSS}</style></head><body><header><h1>ftc report: {esc(names)}</h1>"
        f"<p>written {esc(when)} by ftc {esc(__version__)} from {len(runs)} run(s){esc(live)}</p></header><main>"
        f"<h2>Runs</h2>{summary_rows(runs)}{nan_box}{differences_section(runs)}{problem_box}{empty}"
        f"{charts_section(charts)}{probe_section(runs, probe_png)}{samples_section(runs)}"
        f"{''.join(run_section(r) for r in runs)}</main></body></html>\n"
    )
