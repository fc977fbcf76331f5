"""A damaged newest checkpoint is found before use, named with its file and what is wrong, moved
aside (never deleted), and the run resumes from the newest good one; export refuses it, naming
the good step. Fault injection: every file of the newest checkpoint, truncated and corrupted."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

from ftc.backends.jax import pipeline
from ftc.backends.jax.generate.source import SourceError, load_source
from ftc.backends.jax.io import export as export_lib
from ftc.backends.jax.state import checkpoint as ckpt_lib
from ftc.backends.jax.state import integrity
from ftc.spec import load_spec


def newest_files(finished_run: Path) -> list[str]:
    step_dir = finished_run / "checkpoints" / "4"
    return sorted(str(p.relative_to(step_dir)) for p in step_dir.rglob("*") if p.is_file())


def damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif data:  # corrupted: one byte flipped in the middle, the size unchanged
        middle = len(data) // 2
        path.write_bytes(data[:middle] + bytes([data[middle] ^ 0x5A]) + data[middle + 1 :])
    else:
        path.write_bytes(b"\0")


def test_every_checkpoint_file_has_a_digest(finished_run):
    for step in (2, 4):
        step_dir = finished_run / "checkpoints" / str(step)
        digest = json.loads((step_dir / integrity.DIGEST_FILE).read_text())["files"]
        assert set(digest) == set(newest_files(finished_run) if step == 4 else digest) - {integrity.DIGEST_FILE}
        assert integrity.problem(step_dir) is None


@pytest.mark.parametrize("how", ["truncated", "corrupted"])
def test_each_damaged_file_of_the_newest_checkpoint_falls_back_to_the_previous(finished_run, tmp_path, how):
    files = newest_files(finished_run)
    assert len(files) >= 10 and integrity.DIGEST_FILE in files
    for rel in files:
        if how == "truncated" and (finished_run / "checkpoints" / "4" / rel).stat().st_size < 2:
            continue  # nothing to cut
        directory = tmp_path / rel.replace("/", "_") / "checkpoints"
        shutil.copytree(finished_run / "checkpoints", directory)
        damage(directory / "4" / rel, how)
        warnings = []
        good = integrity.set_aside_damaged(directory, warnings.append)
        assert good == 2, rel
        assert len(warnings) == 1 and rel in warnings[0] and "checkpoints/4 is damaged" in warnings[0], warnings
        assert sorted(p.name for p in directory.iterdir()) == ["2"]
        aside = directory.parent / integrity.DAMAGED_DIR / "4"
        assert (aside / rel).exists() and rel in (aside / "REASON.txt").read_text()  # moved, not deleted


def test_a_checkpoint_without_digest_is_checked_structurally(finished_run, tmp_path):
    directory = tmp_path / "checkpoints"
    shutil.copytree(finished_run / "checkpoints", directory)
    (directory / "4" / integrity.DIGEST_FILE).unlink()  # as an older ftc wrote it
    assert integrity.newest_good(directory) == (4, [])
    damage(directory / "4" / "meta" / "metadata", "truncated")
    good, damaged = integrity.newest_good(directory)
    assert good == 2 and damaged[0][0] == 4 and "meta/metadata is not valid JSON" in damaged[0][1]


def test_ftc_run_resumes_from_the_newest_good_checkpoint_and_ends_where_an_undamaged_run_does(
    tiny, finished_run, run_copy
):
    damage(run_copy / "checkpoints" / "4" / "meta" / "metadata", "truncated")  # before: a bare JSON error
    spec = load_spec(tiny.spec(run_copy.parent.parent))
    assert Path(spec.run_dir) == run_copy
    log = []
    summary = pipeline.run(spec, echo=log.append)
    assert summary["step"] == 4
    warning = next(line for line in log if line.startswith("warning:"))
    assert f"{run_copy}/checkpoints/4 is damaged: meta/metadata is" in warning and "resuming from step 2" in warning
    assert "resumed from step 2" in "\n".join(log)
    assert (run_copy / integrity.DAMAGED_DIR / "4" / "REASON.txt").exists()
    # Steps 3 and 4 ran again: the same losses and the same final weights as the undamaged run.
    rows = lambda run: [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in rows(run_copy)] == [(r["step"], r["loss"]) for r in rows(finished_run)]
    want = jax.tree.leaves(export_lib.load_run(finished_run).params)
    got = jax.tree.leaves(export_lib.load_run(run_copy).params)
    assert len(got) == len(want)
    for a, b in zip(want, got):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()


def test_export_refuses_a_damaged_checkpoint_naming_the_newest_good_step(run_copy, tmp_path):
    damage(run_copy / "checkpoints" / "4" / "state" / "_sharding", "corrupted")
    with pytest.raises(export_lib.ExportError, match=r"checkpoints/4 is damaged: state/_sharding .*--step 2"):
        export_lib.export_run(run_copy, out=tmp_path / "out", echo=lambda s: None)
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in (run_copy / "checkpoints").iterdir()) == ["2", "4"]  # export never moves it
    # ftc generate / chat / eval have no --step: they name the export that reads the good one
    with pytest.raises(SourceError, match=rf"damaged: .*\(ftc export {run_copy} --step 2 --out DIR\) and generate"):
        load_source(run_copy)
    result, _ = export_lib.export_run(run_copy, out=tmp_path / "out", step=2, echo=lambda s: None)
    assert result.step == 2
    assert ckpt_lib.latest_step(str(run_copy)) == 4
