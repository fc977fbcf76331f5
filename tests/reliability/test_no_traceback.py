"""What reaches the user is one located line, never a raw traceback: bad models, tokenizers and
data name their file (and line); an unwritable output directory names it; an error ftc did not
foresee names the command and where to report it, with the full log written to a file."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import ftc.spec
from ftc.cli import main


def run(spec: Path, *extra) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["run", str(spec), *extra])
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.output


@pytest.fixture
def model(tiny, tmp_path) -> Path:
    """A copy of the tiny model that a test may break."""
    return Path(shutil.copytree(tiny.root / "model", tmp_path / "model"))


def spec_with(tiny, tmp_path, **replace) -> Path:
    path = tiny.spec(tmp_path)
    text = path.read_text()
    for old, new in replace.items():
        text = text.replace(old, new)
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "breaks, says",
    [
        (lambda m: _truncate(m / "model.safetensors", 0.6), "model.safetensors: tensor '"),
        (
            lambda m: _truncate(m / "model.safetensors", 0.001),
            "model.safetensors: not a safetensors file, or truncated",
        ),
        (lambda m: _truncate(m / "tokenizer.json", 0.5), "tokenizer.json: not valid JSON"),
        (lambda m: [p.unlink() for p in m.glob("tokenizer*")], "no tokenizer (tokenizer.json, tokenizer_config.json"),
        (lambda m: _dir_for(m / "model.safetensors"), "model.safetensors is a directory, expected a safetensors file"),
        (lambda m: _config(m, trust_remote_code=True), "config.json: key 'trust_remote_code': true asks for custom"),
        (lambda m: _pickle_only(m), "it has only pickle weights (pytorch_model.bin), which ftc does not load"),
        (lambda m: _config(m, vocab_size=0), "config.json: vocab_size: expected an integer from 1 to"),
        (lambda m: (m / "tokenizer.json").write_text("{}"), "its tokenizer files do not load: KeyError"),
        (lambda m: _config(m, vocab_size=100), "but the model's vocab_size is 100 (config.json)"),
        (lambda m: _nan_in(m / "model.safetensors"), "the starting weights hold nan or inf in layers/mlp/down_proj"),
    ],
    ids=[
        "truncated-safetensors",
        "safetensors-header-cut",
        "truncated-tokenizer",
        "no-tokenizer",
        "weights-a-dir",
        "remote-code",
        "pickle-only",
        "vocab-size-0",
        "tokenizer-json-empty-object",
        "tokenizer-of-another-model",
        "nan-weights",
    ],
)
def test_a_broken_base_model_is_named_with_its_file(tiny, tmp_path, model, breaks, says):
    breaks(model)
    code, output = run(spec_with(tiny, tmp_path, **{f"{tiny.root}/model": str(model)}))
    assert code == 1 and says in output and str(model) in output, output
    assert "Traceback" not in output


def _truncate(path: Path, fraction: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])


def _nan_in(path: Path) -> None:  # one stored value made nan, the file otherwise intact
    from safetensors.numpy import load_file, save_file

    tensors = load_file(path)
    tensors["model.layers.1.mlp.down_proj.weight"][0, 0] = float("nan")
    save_file(tensors, path, metadata={"format": "pt"})


def _pickle_only(model: Path) -> None:  # pickle bytes ftc must never unpickle
    (model / "model.safetensors").unlink()
    (model / "pytorch_model.bin").write_bytes(b"\x80\x04junk")


def _dir_for(path: Path) -> None:
    path.unlink()
    path.mkdir()


def _config(model: Path, **keys) -> None:
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps(config | keys))


@pytest.mark.parametrize(
    "rows, on_bad_row, says",
    [
        ("", "error", "{file}: no rows (empty)"),
        ('{"text": "not chat"}\n', "skip", "{file}: no training rows left after cleaning (kept 0 of 0; 1 malformed"),
        (
            '{"messages": [{"role": "user", "content": "hi \\ud800"}, {"role": "assistant", "content": "yo"}]}\n',
            "error",
            "{file}:1: row.messages[0].content holds a lone surrogate escape",
        ),
    ],
    ids=["empty-file", "every-row-dropped", "lone-surrogate"],
)
def test_bad_data_is_named_by_file_and_line(tiny, tmp_path, rows, on_bad_row, says):
    data = tmp_path / "data.jsonl"
    data.write_text(rows)
    spec = spec_with(
        tiny,
        tmp_path,
        **{f"{tiny.root}/train.jsonl": str(data), "[training]": f'on_bad_row = "{on_bad_row}"\n[training]'},
    )
    code, output = run(spec)
    assert code == 1 and says.format(file=data) in output, output
    assert "Traceback" not in output


def test_an_unwritable_output_directory_is_named(tiny, tmp_path):
    if os.geteuid() == 0:  # root writes anywhere a permission bit allows: use a file system that refuses it
        out = Path("/sys/ftc-test-runs")
    else:
        out = tmp_path / "read-only"
        out.mkdir(mode=0o555)
    spec = spec_with(tiny, tmp_path, **{f'output_dir = "{tmp_path}/runs"': f'output_dir = "{out}"'})
    proc = subprocess.run(
        [sys.executable, "-m", "ftc.cli", "run", str(spec)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 1, proc.stderr  # before: a PermissionError traceback
    assert proc.stderr.startswith(f"ftc run: error: {out}"), proc.stderr
    assert "Traceback" not in proc.stderr and "full log: " in proc.stderr


def test_an_unforeseen_error_prints_one_line_and_writes_the_full_log(tmp_path, monkeypatch):
    spec = tmp_path / "s.toml"
    spec.write_text('name = "x"\n')

    def broken(*a, **k):
        return {}["a key ftc forgot"]  # a bug

    monkeypatch.setattr(ftc.spec, "lint_file", broken)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    result = CliRunner().invoke(main, ["lint", str(spec)])
    assert result.exit_code == 1
    lines = result.output.splitlines()
    assert lines[0].startswith("ftc lint: internal error: KeyError: 'a key ftc forgot' (a bug in ftc: please report")
    assert "issue tracker" in lines[0] and len(lines) == 2
    log = Path(lines[1].split("full log: ")[1].split(" ")[0])
    assert log.parent == tmp_path and "Traceback" in log.read_text() and "Traceback" not in result.output
    result = CliRunner().invoke(main, ["--debug", "lint", str(spec)])
    assert isinstance(result.exception, KeyError)  # --debug lets the traceback through
    for off in ("0", "false"):  # FTC_DEBUG=0 is off: before, any value let the traceback through
        result = CliRunner().invoke(main, ["lint", str(spec)], env={"FTC_DEBUG": off})
        assert result.exit_code == 1 and "internal error: KeyError" in result.output, off
    assert isinstance(CliRunner().invoke(main, ["lint", str(spec)], env={"FTC_DEBUG": "1"}).exception, KeyError)


def test_sigterm_during_a_command_exits_143_after_its_clean_up(run_copy, tmp_path, monkeypatch):
    from ftc.backends.jax.io import export_common

    def terminated_midway(tmp):  # SIGTERM lands while the export is being written
        (tmp / "half-written.safetensors").write_bytes(b"\0" * 10)
        os.kill(os.getpid(), signal.SIGTERM)

    original = export_common.publish
    monkeypatch.setattr(
        "ftc.backends.jax.io.export.publish", lambda out, write, **k: original(out, terminated_midway, **k)
    )
    result = CliRunner().invoke(main, ["export", str(run_copy), "--out", str(tmp_path / "out")])
    assert result.exit_code == 143 and "ftc export: terminated (SIGTERM)" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]  # no out/, no .out.partial-* left
