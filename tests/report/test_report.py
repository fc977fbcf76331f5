"""`ftc report` and the report `ftc run` keeps: what the page shows is what the run directory holds."""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from report_testlib import figures

from ftc.cli import main
from ftc.report import read_run, write_report
from ftc.report.rundir import number


def metric_rows(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]


def numeric_keys(rows) -> set[tuple[str, str]]:
    return {
        (r.get("split", "train"), k)
        for r in rows
        if "step" in r
        for k, v in r.items()
        if k not in ("step", "split") and number(v) is not None
    }


def test_a_run_writes_its_plan_and_a_finished_report(sft_run):
    run_dir = sft_run.run_dir
    plan = json.loads((run_dir / "plan.json").read_text())
    assert plan["steps"]["total_steps"] == 4 and plan["method"] == "full"
    page = (run_dir / "report.html").read_text()
    assert 'http-equiv="refresh"' not in page  # the final report does not reload itself
    assert any(line.startswith("report: ") and line.endswith("open it in a browser)") for line in sft_run.log)
    charts = figures(run_dir / "report.html")
    pngs = {p.stem for p in (run_dir / "report_charts").glob("*.png")}
    assert set(charts) == pngs  # the same charts as PNG files beside the page


def test_every_numeric_metric_of_the_run_is_drawn_with_all_its_points(sft_run):
    rows = metric_rows(sft_run.run_dir)
    charts = figures(sft_run.run_dir / "report.html")
    drawn = {(s["split"], s["metric"]): s["points"] for f in charts.values() for s in f["series"]}
    assert numeric_keys(rows) == set(drawn)
    for (split, metric), points in drawn.items():
        assert points == sum(1 for r in rows if r.get("split", "train") == split and metric in r), (split, metric)
    assert {"train", "validation"} == {s["split"] for s in charts["loss"]["series"]}
    assert {"loss", "perplexity", "token_accuracy", "learning_rate", "grad_norm", "tokens_per_second", "mfu"} <= set(
        charts
    )
    assert [s["metric"] for s in charts["memory"]["series"]] == ["host_memory_peak_bytes", "host_memory_bytes"]


def test_the_report_reads_the_run_and_recomputes_nothing(sft_run):
    run = read_run(sft_run.run_dir)
    rows = metric_rows(sft_run.run_dir)
    val = [(r["step"], r["loss"]) for r in rows if r.get("split") == "validation"]
    assert run.series[("validation", "loss")] == tuple(val)
    page = (sft_run.run_dir / "report.html").read_text()
    stats = json.loads((sft_run.run_dir / "data_stats.json").read_text())
    assert f"<td>{stats['supervised_tokens']:,}</td>" in page
    assert f"{val[-1][1]:.4g}" in page  # the last validation loss, as logged


def test_a_metric_no_chart_knows_still_gets_its_own_chart(sft_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(sft_run.run_dir, run_dir, ignore=shutil.ignore_patterns("checkpoints", "export"))
    with open(run_dir / "metrics.jsonl", "a") as f:  # what a future objective logs
        for step in (1, 2, 3):
            f.write(json.dumps({"step": step, "split": "train", "rollout_reward": 0.1 * step, "kl": 0.01}) + "\n")
    written = write_report([run_dir])
    charts = figures(written.html)
    assert [s["points"] for s in charts["rollout_reward"]["series"]] == [3]
    assert charts["kl"]["series"][0]["metric"] == "kl"
    assert "Rollout reward" in Path(written.html).read_text()


def test_a_cut_line_in_metrics_is_named_and_the_rest_is_reported(sft_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(sft_run.run_dir, run_dir, ignore=shutil.ignore_patterns("checkpoints", "export"))
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 9, "split": "tr')  # killed mid-write
    written = write_report([run_dir], str(tmp_path / "out" / "r.html"))
    page = Path(written.html).read_text()
    assert f"metrics.jsonl:{len(lines) + 1}: not a JSON object" in page
    assert figures(written.html)["loss"]["series"]


def test_a_loss_that_stops_being_a_number_is_named_above_the_charts(sft_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(sft_run.run_dir, run_dir, ignore=shutil.ignore_patterns("checkpoints", "export"))
    with open(run_dir / "metrics.jsonl", "a") as f:  # a run that diverged: Python's json writes NaN / Infinity
        f.write(json.dumps({"step": 97, "split": "train", "loss": float("nan")}) + "\n")
        f.write(json.dumps({"step": 98, "split": "train", "loss": float("inf")}) + "\n")
    page = Path(write_report([run_dir]).html).read_text()
    assert "Not a number:" in page
    assert "the train loss is not a finite number from step 97 (2 logged value(s))" in page
    assert page.index("Not a number:") < page.index("<figure")
    clean = Path(write_report([sft_run.run_dir], str(tmp_path / "clean.html")).html).read_text()
    assert "Not a number:" not in clean


def test_several_runs_are_overlaid_with_the_keys_their_specs_differ_in(sft_run, lora_run, tmp_path):
    out = tmp_path / "compare.html"
    result = CliRunner().invoke(main, ["report", str(sft_run.run_dir), str(lora_run.run_dir), "--out", str(out)])
    assert result.exit_code == 0, result.output
    charts = figures(out)
    loss = charts["loss"]["series"]
    assert {s["run"] for s in loss} == {"full", "lora"}
    colours = {s["run"]: s["colour"] for s in loss}
    assert colours["full"] != colours["lora"]
    page = out.read_text()
    differences = page.split("<h2>Spec differences</h2>", 1)[1].split("</table>", 1)[0]
    for key in ("method.kind", "training.learning_rate", "method.rank", "name"):
        assert f"<td>{key}</td>" in differences
    assert "<td>model.base</td>" not in differences  # only keys that differ
    assert (tmp_path / "compare_charts" / "loss.png").is_file()


def test_dpo_rewards_and_margins_are_charted(dpo_run):
    charts = figures(dpo_run.run_dir / "report.html")
    assert {s["metric"] for s in charts["rewards"]["series"]} == {"chosen_reward", "rejected_reward"}
    assert {"reward_margin", "reward_accuracy", "logps", "loss"} <= set(charts)
    assert {s["split"] for s in charts["reward_margin"]["series"]} == {"train", "validation"}


def test_probe_metrics_are_shown_against_the_majority_baseline(probe_run):
    page = (probe_run.run_dir / "report.html").read_text()
    probe = json.loads((probe_run.run_dir / "probe_metrics.json").read_text())
    section = page.split("<h2>Probe</h2>", 1)[1]
    assert f"{probe['validation']['majority_accuracy']:.4g}" in section
    assert f"{probe['validation']['accuracy']:.4g}" in section
    assert "probe" in figures(probe_run.run_dir / "report.html")


def test_generation_samples_in_metrics_are_shown_per_evaluation(sft_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(sft_run.run_dir, run_dir, ignore=shutil.ignore_patterns("checkpoints", "export"))
    sample = {"prompt": "What is <b>AI</b>?", "completion": "A branch of science.", "reference": "Science."}
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 4, "split": "validation", "samples": [sample], "exact_match": 0.0}) + "\n")
    page = Path(write_report([run_dir]).html).read_text()
    section = page.split("<h2>Samples</h2>", 1)[1]
    assert "step 4 · validation · samples" in section
    assert "What is &lt;b&gt;AI&lt;/b&gt;?" in section and "A branch of science." in section


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda p: None, "no such directory"),
        (lambda p: p.mkdir(), "not a run directory of `ftc run` (it has no spec.resolved.json and no metrics.jsonl)"),
        (lambda p: (p.mkdir(), (p / "spec.resolved.json").write_text("{}")), "no metrics yet"),
        (lambda p: p.write_text("x"), "not a directory"),
    ],
    ids=["missing", "not-a-run", "no-metrics-yet", "a-file"],
)
def test_a_path_that_is_not_a_reportable_run_is_one_line_and_exit_1(tmp_path, make, expected):
    path = tmp_path / "r"
    make(path)
    out = tmp_path / "report.html"
    result = CliRunner().invoke(main, ["report", str(path), "--out", str(out)])
    assert result.exit_code == 1
    assert result.output.strip().count("\n") == 0 and str(path) in result.output and expected in result.output
    assert not out.exists() and not (tmp_path / "report_charts").exists()


def test_the_png_charts_are_images_with_ink(sft_run):
    from PIL import Image

    for png in (sft_run.run_dir / "report_charts").glob("*.png"):
        image = Image.open(io.BytesIO(png.read_bytes())).convert("RGB")
        assert image.size == (640, 330)
        assert len(image.getcolors(maxcolors=1 << 16) or ()) > 20, png.name


def test_metric_names_with_slashes_get_flat_distinct_png_files(sft_run, tmp_path):
    """TRL's names (clip_ratio/high_mean, rewards/numeric/mean) once made the report write into a
    folder that did not exist, so a GRPO run's report never refreshed."""
    run_dir = tmp_path / "run"
    shutil.copytree(sft_run.run_dir, run_dir, ignore=shutil.ignore_patterns("checkpoints", "export"))
    names = ("clip_ratio/high_mean", "rewards/numeric/mean", "rewards_numeric_mean")
    with open(run_dir / "metrics.jsonl", "a") as f:
        for step in (1, 2):
            f.write(json.dumps({"step": step, "split": "train", **{n: 0.1 * step for n in names}}) + "\n")
    written = write_report([run_dir])
    pngs = [Path(p) for p in written.pngs]
    assert all(p.parent == pngs[0].parent and p.is_file() for p in pngs)
    assert len({p.name for p in pngs}) == len(pngs)
    shown = figures(written.html)
    assert all(len(shown[k]["series"]) == 1 for k in shown if k.startswith(("clip_ratio", "rewards")))
    assert "Clip ratio / high mean" in Path(written.html).read_text()


def test_an_out_that_cannot_be_written_is_named_not_the_staging_directory(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "split": "train", "loss": 2.0}\n')
    if os.geteuid() == 0:  # root writes anywhere a permission bit allows: use a file system that refuses it
        where = Path("/sys")
    else:
        where = tmp_path / "read-only"
        where.mkdir(mode=0o555)
    result = CliRunner().invoke(main, ["report", str(run), "--out", str(where / "r.html")])
    assert result.exit_code == 1, result.output
    assert result.output.startswith(f"error: {where / 'r.html'}: could not write the report ("), result.output
    assert ".report-" not in result.output


def test_an_out_that_is_not_a_report_is_never_replaced(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "split": "train", "loss": 2.0}\n')
    data = tmp_path / "train.jsonl"  # a typo'd --out naming the user's data
    data.write_text('{"text": "precious"}\n')
    result = CliRunner().invoke(main, ["report", str(run), "--out", str(data)])
    assert result.exit_code == 1 and "exists and is not a report ftc wrote" in result.output, result.output
    assert data.read_text() == '{"text": "precious"}\n' and not (tmp_path / "train_charts").exists()
    page = tmp_path / "r.html"
    for _ in range(2):  # its own report it replaces
        result = CliRunner().invoke(main, ["report", str(run), "--out", str(page)])
        assert result.exit_code == 0, result.output


def test_a_charts_folder_ftc_did_not_write_is_never_replaced(tmp_path):
    """The PNG folder beside --out (NAME_charts) was replaced whole, deleting a file or folder of that name."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "split": "train", "loss": 2.0}\n')
    (tmp_path / "notes_charts").write_text("precious")
    (tmp_path / "plots_charts").mkdir()
    (tmp_path / "plots_charts" / "mine.txt").write_text("precious")
    for name in ("notes", "plots"):
        result = CliRunner().invoke(main, ["report", str(run), "--out", str(tmp_path / f"{name}.html")])
        assert result.exit_code == 1 and result.output == (
            f"error: {tmp_path / name}_charts: exists and is not a charts folder ftc wrote (PNGs only); "
            "choose another --out\n"
        )
        assert not (tmp_path / f"{name}.html").exists()
    assert (tmp_path / "notes_charts").read_text() == (tmp_path / "plots_charts" / "mine.txt").read_text() == "precious"
    result = CliRunner().invoke(main, ["report", str(run), "--out", str(tmp_path / "r.html")])
    assert result.exit_code == 0 and (tmp_path / "r_charts" / "loss.png").is_file()
    again = CliRunner().invoke(main, ["report", str(run), "--out", str(tmp_path / "r.html")])
    assert again.exit_code == 0, again.output  # its own charts folder it replaces


@pytest.mark.parametrize(
    "out, expected",
    [
        ("run/metrics.jsonl/r.html", "run/metrics.jsonl is not a directory"),
        ("", "error: --out is empty; it names the HTML file to write"),
        ("reports/", "reports: is a directory; --out names the HTML file to write"),
    ],
    ids=["under-a-file", "empty", "a-new-directory"],
)
def test_an_out_that_cannot_be_a_file_says_why_in_one_line(tmp_path, out, expected):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "split": "train", "loss": 2.0}\n')
    result = CliRunner().invoke(main, ["report", str(run), "--out", f"{tmp_path}/{out}" if out else ""])
    assert result.exit_code == 1 and expected in result.output and result.output.count("\n") == 1, result.output
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["metrics.jsonl", "run"]
