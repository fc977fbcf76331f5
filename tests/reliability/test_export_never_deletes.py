"""`ftc export` never deletes what it reads: an --out that is, contains or lies inside the run (or
any run directory), or is the base model it reads, is refused whatever --force says, and the run
is left as it was. The run's own export/ and any other directory still work."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from ftc.backends.jax.io import export as export_lib
from ftc.cli import main


def tree(path: Path) -> dict[str, int]:
    return {str(p.relative_to(path)): p.stat().st_size for p in sorted(path.rglob("*")) if p.is_file()}


def export(*args) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["export", *map(str, args)])
    return result.exit_code, result.output


@pytest.mark.parametrize(
    "out, why",
    [
        (lambda run: run, "it is "),
        (lambda run: run.parent, "it contains "),
        (lambda run: run.parent.parent, "it contains "),
        (lambda run: run / "checkpoints", "lies inside the run directory"),
        (lambda run: run / "checkpoints" / "4", "lies inside the run directory"),
        (lambda run: run / "new-dir", "lies inside the run directory"),
    ],
    ids=["the-run", "its-parent", "its-grandparent", "its-checkpoints", "a-checkpoint", "a-new-dir-inside"],
)
def test_export_refuses_an_out_that_is_contains_or_lies_inside_the_run(run_copy, out, why):
    before = tree(run_copy.parent.parent)
    code, output = export(run_copy, "--out", out(run_copy), "--force")
    assert code == 1, output  # before: exit 0, and the run's checkpoints (or the run) deleted
    assert why in output and "whatever --force says" in output
    assert tree(run_copy.parent.parent) == before


def test_export_refuses_a_symlink_to_the_run_and_another_run_directory(run_copy, tmp_path):
    link = tmp_path / "link"
    link.symlink_to(run_copy)
    code, output = export(run_copy, "--out", link, "--force")
    assert code == 1 and f"it is {run_copy}" in output
    other = tmp_path / "other-run"
    (other / "checkpoints").mkdir(parents=True)
    (other / "spec.resolved.json").write_text("{}")
    code, output = export(run_copy, "--out", other, "--force")
    assert code == 1 and "it is a run directory" in output and (other / "spec.resolved.json").exists()
    holder = tmp_path / "holder"
    (holder / "deep" / "run" / "checkpoints").mkdir(parents=True)
    code, output = export(run_copy, "--out", holder, "--force")
    assert code == 1 and f"it contains the run directory {holder / 'deep' / 'run'}" in output
    assert (holder / "deep" / "run" / "checkpoints").is_dir()


def test_export_refuses_to_replace_the_base_model_it_reads(run_copy):
    trained = export_lib.load_run(run_copy)
    before = tree(trained.model_dir)
    with pytest.raises(export_lib.ExportError, match=f"it is {trained.model_dir}, which this export reads"):
        export_lib.write_export(trained, trained.model_dir, format="hf", dtype="float32", force=True)
    assert tree(trained.model_dir) == before


def test_the_runs_own_export_dir_and_other_dirs_are_still_written(run_copy, tmp_path):
    code, output = export(run_copy, "--force")
    assert code == 0, output
    assert (run_copy / "export" / export_lib.MANIFEST).is_file()
    (tmp_path / "serve").mkdir()
    (tmp_path / "serve" / "old.txt").write_text("an earlier export")
    code, output = export(run_copy, "--out", tmp_path / "serve", "--force")
    assert code == 0, output
    assert not (tmp_path / "serve" / "old.txt").exists() and os.path.isdir(run_copy / "checkpoints" / "4")
