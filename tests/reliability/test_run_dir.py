"""`ftc run` writes only into a directory that can be a run's: one that holds something else is
refused and left as it was (before: the run wrote into it and its final export replaced the
directory's export/, deleting what was there), and a file in the way is named as such."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from ftc.backends.jax.state.files import run_dir_problem
from ftc.cli import main


def _run(spec: Path, *extra) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["run", str(spec), *extra])
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.output


def _tree(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def test_a_directory_holding_other_files_is_refused_and_left_as_it_was(tiny, tmp_path):
    run_dir = tmp_path / "runs" / "tiny"
    (run_dir / "export").mkdir(parents=True)
    (run_dir / "export" / "mine.safetensors").write_bytes(b"not ftc's")
    (run_dir / "notes.txt").write_text("mine")
    before = _tree(tmp_path / "runs")
    code, output = _run(tiny.spec(tmp_path))
    assert code == 1, output
    assert f"error: {run_dir} already holds files that are not an ftc run (export, notes.txt)" in output
    assert _tree(tmp_path / "runs") == before  # no ftc.lock, nothing replaced


def test_a_file_where_the_run_directory_goes_is_named(tiny, tmp_path):
    (tmp_path / "runs").write_text("a file, not output_dir")
    code, output = _run(tiny.spec(tmp_path))
    assert code == 1 and f"error: {tmp_path / 'runs'} is a file, not a directory" in output, output
    (tmp_path / "runs").unlink()
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "tiny").write_text("a file where the run goes")
    code, output = _run(tiny.spec(tmp_path))
    assert code == 1 and "tiny is a file, not a directory (it is the run directory <output_dir>/<name>)" in output
    assert "Traceback" not in output and "internal error" not in output


def test_what_a_run_may_be_written_into(tmp_path):
    assert run_dir_problem(tmp_path / "new" / "run") is None  # made by the run
    assert run_dir_problem(tmp_path) is None  # empty
    (tmp_path / ".gitkeep").touch()
    assert run_dir_problem(tmp_path) is None  # hidden files only
    (tmp_path / "data.jsonl").touch()
    assert "already holds files that are not an ftc run (data.jsonl)" in run_dir_problem(tmp_path)
    for marker in ("ftc.lock", "spec.resolved.json"):  # an earlier run, to resume
        (tmp_path / marker).touch()
        assert run_dir_problem(tmp_path) is None
        (tmp_path / marker).unlink()
    (tmp_path / "checkpoints").mkdir()
    assert run_dir_problem(tmp_path) is None
    (tmp_path / "checkpoints").rmdir()
    (tmp_path / "checkpoints").touch()  # before: the run trained until its first save found it
    assert "checkpoints is a file, where a run keeps its checkpoints directory" in run_dir_problem(tmp_path)


def test_a_start_refused_for_its_inputs_leaves_no_run_directory(tiny, tmp_path):
    code, output = _run(tiny.spec(tmp_path), "--set", f"data.train={tmp_path}/missing.jsonl")
    assert code == 1 and f"{tmp_path}/missing.jsonl" in output, output
    assert not (tmp_path / "runs").exists()  # before: runs/tiny/ftc.lock (and checkpoints/) stayed


def test_a_resume_on_edited_training_data_is_refused(tiny, tmp_path):
    # Before: the run resumed and continued at its data position in the other rows.
    data = tmp_path / "train.jsonl"
    data.write_bytes((tiny.root / "train.jsonl").read_bytes())
    spec = tiny.spec(tmp_path, steps=2)
    spec.write_text(spec.read_text().replace(f"{tiny.root}/train.jsonl", str(data)))
    assert _run(spec)[0] == 0
    data.write_text("".join(data.read_text().splitlines(keepends=True)[:5]))
    code, output = _run(spec, "--set", "training.steps=4")
    assert code == 1 and "training rows: digest " in output, output
    assert sorted(p.name for p in (tmp_path / "runs" / "tiny" / "checkpoints").iterdir()) == ["2"]
