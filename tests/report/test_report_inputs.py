"""`ftc report` on run directories as people leave them: files edited by hand or from another
version, odd names. The page is still written, or one line says why; never an internal error."""

from __future__ import annotations

import json
import os
import warnings

import pytest
from click.testing import CliRunner
from report_testlib import figures

from ftc.cli import main
from ftc.report import charts, write_report

METRICS = "".join(json.dumps({"step": s, "split": "train", "loss": 3.0 - s / 2}) + "\n" for s in (1, 2, 3, 4))


def make_run(path, **files) -> str:
    """A run directory holding metrics.jsonl and `files` (name -> JSON value, "/" for "__")."""
    path.mkdir()
    (path / "metrics.jsonl").write_text(METRICS)
    for name, value in files.items():
        target = path / name.replace("__", "/")
        target.parent.mkdir(exist_ok=True)
        target.write_text(json.dumps(value))
    return str(path)


@pytest.mark.parametrize(
    "files",
    [
        {"spec.resolved.json": {"name": "r", "method": "lora", "training": [1], "model": "x"}},
        {"spec.resolved.json": {"name": "r", "training": {"steps": "100"}}},
        {"plan.json": {"steps": {"total_steps": "abc"}, "notes": 5, "params": "x"}},
        {"probe_metrics.json": {"steps": True, "train": 5}, "export__ftc_export.json": {"format": ["x"]}},
    ],
    ids=["spec-sections-not-objects", "steps-a-string", "plan-of-other-kinds", "probe-and-export-of-other-kinds"],
)
def test_run_files_holding_values_of_the_wrong_kind_are_shown_as_absent_not_an_internal_error(tmp_path, files):
    run = make_run(tmp_path / "run", **files)
    result = CliRunner().invoke(main, ["report", run, "--out", str(tmp_path / "r.html")])
    assert result.exit_code == 0, result.output
    page = (tmp_path / "r.html").read_text()
    assert "<td>step 4, " in page and "loss" in figures(tmp_path / "r.html")  # no total steps shown


def test_dollar_signs_in_run_and_metric_names_are_drawn_as_written_not_as_mathtext(tmp_path):
    """matplotlib reads "$...$" as mathtext: a run named "x $x^{$ y" failed the whole report."""
    a = make_run(tmp_path / "a", **{"spec.resolved.json": {"name": "x $x^{$ y"}})
    with open(f"{a}/metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 4, "split": "train", "a$\\frac{x$": 1.0}) + "\n")
    b = make_run(tmp_path / "b", **{"spec.resolved.json": {"name": "b"}})
    result = CliRunner().invoke(main, ["report", a, b, "--out", str(tmp_path / "r.html")])
    assert result.exit_code == 0, result.output
    shown = figures(tmp_path / "r.html")
    assert {s["run"] for s in shown["loss"]["series"]} == {"x $x^{$ y", "b"}
    assert charts.plain("cost $5 to $10") == r"cost \$5 to \$10"
    assert charts.plain("_ablation") == " _ablation"  # matplotlib leaves "_..." labels out of the legend


def test_a_run_named_twice_is_reported_once(tmp_path):
    run = make_run(tmp_path / "run", **{"spec.resolved.json": {"name": "r"}})
    result = CliRunner().invoke(main, ["report", run, f"{run}/", f"{tmp_path}/./run"])
    assert result.exit_code == 0, result.output
    page = tmp_path / "run" / "report.html"  # one run: its own report, not ./report.html
    assert [s["run"] for s in figures(page)["loss"]["series"]] == ["r"]
    assert "<title>ftc report: r</title>" in page.read_text()


def test_twelve_runs_get_twelve_colours_and_a_legend_beside_the_lines(tmp_path):
    """Past the palette's 9 colours runs 1 and 10 shared one, and 24 legend entries covered the plot
    (matplotlib warned 'Tight layout not applied' on stderr)."""
    from PIL import Image

    runs = [make_run(tmp_path / f"run{i}", **{"spec.resolved.json": {"name": f"run{i}"}}) for i in range(12)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = CliRunner().invoke(main, ["report", *runs, "--out", str(tmp_path / "r.html")])
    assert result.exit_code == 0, result.output
    series = figures(tmp_path / "r.html")["loss"]["series"]
    assert len({s["colour"] for s in series}) == len(series) == 12
    width, height = Image.open(tmp_path / "r_charts" / "loss.png").size
    assert width > 640 and height == 330  # the plot keeps its size; the legend is beside it


def test_a_metrics_file_with_rows_none_readable_says_so_not_that_it_has_no_rows(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('garbage\n{"step": "x", "loss": 1}\n')
    result = CliRunner().invoke(main, ["report", str(run)])
    assert result.exit_code == 1 and result.output == (
        f"error: {run}: no readable metrics: 2 line(s) of metrics.jsonl skipped, first {run}/metrics.jsonl:1: "
        "not a JSON object (Expecting value)\n"
    )


def test_json_nested_deeper_than_the_decoder_recurses_is_named_not_an_internal_error(tmp_path):
    deep = "[" * 100_000 + "]" * 100_000
    run = make_run(tmp_path / "run")
    (tmp_path / "run" / "spec.resolved.json").write_text('{"a": ' + deep + "}")
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "x": ' + deep + "}\n")
    result = CliRunner().invoke(main, ["report", run])
    assert result.exit_code == 0, result.output
    page = (tmp_path / "run" / "report.html").read_text()
    assert "spec.resolved.json: not readable as JSON (nested too deeply); left out" in page
    assert "metrics.jsonl:5: not a JSON object (nested too deeply); skipped" in page
    result = CliRunner().invoke(main, ["diff", run, run])
    assert result.exit_code == 1
    assert result.output == f"error: {run}/spec.resolved.json: not readable as JSON (nested too deeply)\n"


def test_a_spec_or_a_folder_of_runs_given_for_a_run_says_what_to_report_on(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = tmp_path / "bot.toml"
    spec.write_text(
        'ftc = 1\nname = "bot"\noutput_dir = "out"\n[model]\nbase = "m"\n[data]\nformat = "text"\ntrain = "t.jsonl"\n'
    )
    result = CliRunner().invoke(main, ["report", str(spec)])
    assert result.exit_code == 1 and result.output.endswith(
        "not a directory; expected a run directory of `ftc run` (a spec; its run is written to out/bot: "
        "ftc report out/bot)\n"
    ), result.output
    (tmp_path / "out").mkdir()
    for name in ("a", "b"):
        make_run(tmp_path / "out" / name)
    result = CliRunner().invoke(main, ["report", "out"])
    assert result.exit_code == 1 and result.output.endswith(
        "(it has no spec.resolved.json and no metrics.jsonl); it holds 2 run(s) (a, b): ftc report "
        f"{tmp_path / 'out' / '*'}\n"
    ), result.output


def test_values_near_the_end_of_float64_are_gaps_in_the_chart_not_an_internal_error(tmp_path):
    """grad_norm +-1e308 made matplotlib fail ('arange: cannot compute length'); 1e300 printed overflow warnings."""
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"step": 1, "grad_norm": 1e308, "loss": 1e300}, {"step": 2, "grad_norm": -1e308, "loss": 2.0}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = CliRunner().invoke(main, ["report", str(run)])
    assert result.exit_code == 0, result.output
    assert [s["points"] for s in figures(run / "report.html")["grad_norm"]["series"]] == [2]  # as logged


def test_integers_beyond_int64_in_metrics_are_named_or_read_as_infinite_not_an_internal_error(tmp_path):
    """JSON integers are unbounded: a 400-digit step or value failed float() (OverflowError), a
    5,000-digit one json itself (ValueError, past Python's 4,300-digit limit)."""
    run = tmp_path / "run"
    run.mkdir()
    huge = "9" * 400
    lines = [
        '{"step": 1, "loss": 2.0, "tokens": ' + huge + "}",
        '{"step": 2, "loss": 1.0, "tokens": -' + huge + "}",
        '{"step": ' + huge + ', "loss": 1.0}',
        '{"step": 3, "loss": ' + "9" * 5000 + "}",
    ]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    result = CliRunner().invoke(main, ["report", str(run)])
    assert result.exit_code == 0, result.output
    page = (run / "report.html").read_text()
    assert "metrics.jsonl:3: &#x27;step&#x27; is an integer beyond int64; skipped" in page
    assert "metrics.jsonl:4: not a JSON object (Exceeds the limit (4300 digits)" in page
    assert [s["points"] for s in figures(run / "report.html")["loss"]["series"]] == [2]


def test_a_blank_split_is_read_as_train_and_draws_a_legend(tmp_path):
    """An empty split made an empty legend label: matplotlib warned 'No artists with labels' on stderr."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(
        '{"step": 1, "split": "", "loss": 2.0}\n{"step": 2, "split": " ", "loss": 1.0}\n'
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = CliRunner().invoke(main, ["report", str(run)])
    assert result.exit_code == 0, result.output
    assert [(s["split"], s["points"]) for s in figures(run / "report.html")["loss"]["series"]] == [("train", 2)]


def test_rows_without_a_step_are_named_and_a_file_of_only_those_is_refused(tmp_path):
    """Rows without 'step' (nor the probe's 'event') were dropped unseen: a file of them gave an empty page."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"loss": 2.0}\n{"loss": 1.0, "split": "train"}\n')
    result = CliRunner().invoke(main, ["report", str(run)])
    assert result.exit_code == 1 and result.output == (
        f"error: {run}: no readable metrics: 2 line(s) of metrics.jsonl skipped, first {run}/metrics.jsonl:1: "
        "no 'step' (an integer) and no 'event'\n"
    )
    assert not (run / "report.html").exists()
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 1, "loss": 1.5}\n{"event": "probe_eval", "accuracy": 0.5}\n')
    assert CliRunner().invoke(main, ["report", str(run)]).exit_code == 0
    assert "metrics.jsonl:2: no &#x27;step&#x27; (an integer) and no &#x27;event&#x27;; skipped" in (
        (run / "report.html").read_text()
    )


def test_a_metrics_file_full_of_garbage_names_its_first_bad_lines_not_every_one(tmp_path):
    run = make_run(tmp_path / "run")
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
        f.write("not json\n" * 5000)
    result = CliRunner().invoke(main, ["report", run])
    assert result.exit_code == 0, result.output
    page = (tmp_path / "run" / "report.html").read_text()
    assert "metrics.jsonl:5: not a JSON object" in page and "metrics.jsonl:24: not a JSON object" in page
    assert "metrics.jsonl:25: not a JSON object" not in page and "<li>... and 4,980 more</li>" in page
    assert len(page) < 200_000


def test_probe_metrics_that_are_not_shares_draw_no_bar_and_print_nothing(tmp_path):
    """NaN, Infinity and 1e308 in probe_metrics.json made matplotlib print RuntimeWarnings; a 400-digit
    integer failed float()."""
    run = make_run(tmp_path / "run")
    (tmp_path / "run" / "probe_metrics.json").write_text(
        '{"steps": 4, "train": {"accuracy": NaN, "macro_f1": Infinity, "majority_accuracy": 1e308}, '
        '"validation": {"accuracy": 2.5, "macro_f1": ' + "9" * 400 + ', "majority_macro_f1": "x"}}'
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = CliRunner().invoke(main, ["report", run])
    assert result.exit_code == 0, result.output
    assert "probe" in figures(tmp_path / "run" / "report.html")
    assert charts._share(0.25) == 0.25 and charts._share(2.5) == 1.0 and charts._share("x") == 0.0


def test_an_unknown_metric_named_like_a_known_chart_gets_its_own_png(tmp_path):
    """A metric called "memory" (beside memory_bytes) wrote memory.png over the Memory chart's."""
    run = make_run(tmp_path / "run")
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 4, "split": "train", "memory": 3.0, "memory_bytes": 2**30, "probe": 1.0}) + "\n")
    written = write_report([run])
    names = [os.path.basename(p) for p in written.pngs]
    assert len(names) == len(set(names)) and {"memory.png", "memory-metric.png", "probe-metric.png"} <= set(names)
    shown = figures(written.html)
    assert (
        shown["memory"]["series"][0]["metric"] == "memory_bytes"
        and shown["memory-metric"]["series"][0]["metric"] == "memory"
    )
