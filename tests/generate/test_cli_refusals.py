"""`ftc generate`, `ftc chat` and `ftc eval` refuse what they cannot do with one line naming the
option or path, a non-zero exit and no output file, never an internal error; and they refuse it
before the model loads where the problem is in the arguments (a missing --out directory used to be
found only at the final write, after every prompt was generated)."""

import json
import os
from pathlib import Path

import pytest
import train_testlib as tl
from click.testing import CliRunner
from data_testlib import chat, write_jsonl

from ftc.cli import main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tl.make_model_dir(tmp_path_factory.mktemp("model"))


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.mark.parametrize(
    "args, message",
    [
        (["--temperature", "nan"], "'--temperature': nan is not a finite number"),
        (["--temperature", "inf"], "'--temperature': inf is not a finite number"),
        (["--min-p", "nan"], "'--min-p': nan is not a finite number"),
        (["--top-p", "nan"], "'--top-p': nan is not a finite number"),
        (["--seed", str(2**64)], "'--seed': 18446744073709551616 is not in the range"),
        (["--stop", ""], "'--stop': an empty text"),
    ],
    ids=["nan-temperature", "inf-temperature", "nan-min-p", "nan-top-p", "seed-past-int64", "empty-stop"],
)
@pytest.mark.parametrize("command", ["generate", "chat", "eval"])
def test_sampling_options_that_are_no_number_are_usage_errors(model_dir, tmp_path, command, args, message):
    extra = {"generate": ["--prompt", "hi"], "chat": [], "eval": ["--data", tmp_path / "d.jsonl"]}[command]
    result = _run(command, model_dir, *extra, *args)
    assert result.exit_code == 2 and message in result.output, result.output
    assert "internal error" not in result.output


def test_a_seed_anywhere_in_int64_samples(model_dir):
    seed = -(2**63)
    result = _run("generate", model_dir, "--prompt", "hi", "--temperature", 1, "--seed", seed, "--max-new-tokens", 2)
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("command", ["generate", "eval"])
def test_an_out_file_in_a_missing_directory_is_refused_before_the_model_loads(model_dir, tmp_path, command):
    rows = write_jsonl(tmp_path / "rows.jsonl", [chat("user", "hi", "assistant", "there")])
    out = tmp_path / "no" / "such" / "out.jsonl"
    data = ["--file", rows] if command == "generate" else ["--data", rows]
    result = _run(command, model_dir, *data, "--out", out, "--max-new-tokens", 2)
    assert result.exit_code == 1, result.output
    assert f"--out {out}: the directory {out.parent} does not exist" in result.output
    assert "model:" not in result.output  # nothing was loaded, nothing generated
    assert not (tmp_path / "no").exists()


def test_an_out_file_under_a_file_is_refused_naming_it(model_dir, tmp_path):
    rows = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": "hi"}])
    result = _run("generate", model_dir, "--file", rows, "--out", f"{rows}/out.jsonl")
    assert result.exit_code == 1 and f"{rows} is not a directory" in result.output, result.output


def test_an_out_in_an_unwritable_directory_is_refused_before_the_model_loads(model_dir, tmp_path):
    if os.geteuid() == 0:  # root writes anywhere a permission bit allows: use a file system that refuses it
        where = Path("/sys")
    else:
        where = tmp_path / "read-only"
        where.mkdir(mode=0o555)
    rows = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": "hi"}])
    result = _run("generate", model_dir, "--file", rows, "--out", where / "out.jsonl")
    assert result.exit_code == 1 and f"--out {where / 'out.jsonl'}: cannot write in {where} (" in result.output
    assert "model:" not in result.output
    result = _run("export", model_dir, "--out", where / "export")  # checked before the run is read
    assert result.exit_code == 1 and f"--out {where / 'export'}: cannot write in {where} (" in result.output


def test_eval_refuses_a_max_seq_len_past_the_models_context(model_dir, tmp_path):
    rows = write_jsonl(tmp_path / "rows.jsonl", [chat("user", "hi", "assistant", "there")])
    context = tl.TINY["max_position_embeddings"]
    result = _run("eval", model_dir, "--data", rows, "--max-seq-len", context + 1)
    assert result.exit_code == 1, result.output
    assert f"--max-seq-len {context + 1} is above" in result.output
    assert f"context ({context} positions)" in result.output


def test_eval_no_generate_says_generation_was_not_run(model_dir, tmp_path):
    rows = write_jsonl(tmp_path / "rows.jsonl", [chat("user", "hi", "assistant", "there")])
    result = _run("eval", model_dir, "--data", rows, "--no-generate")
    assert result.exit_code == 0, result.output
    assert "generation: not run (--no-generate)" in result.output and "no rows with a reference" not in result.output


@pytest.mark.parametrize("command", ["generate", "chat", "eval"])
def test_a_run_directory_without_a_checkpoint_is_named_as_one(model_dir, tmp_path, command):
    run = tmp_path / "run"
    run.mkdir()
    (run / "spec.resolved.json").write_text("{}")  # what `ftc run` writes before its first checkpoint
    extra = {"generate": ["--prompt", "hi"], "chat": [], "eval": ["--data", write_jsonl(tmp_path / "d.jsonl", [])]}
    result = _run(command, run, *extra[command])
    assert result.exit_code == 1, result.output
    assert "is a run directory of `ftc run` with no checkpoint yet" in result.output


def test_a_probe_run_is_named_as_a_classifier_not_a_run_without_checkpoints(tmp_path):
    run = tmp_path / "run"
    run.mkdir()  # a probe trains outside the step loop: its run directory never has checkpoints/
    (run / "spec.resolved.json").write_text('{"method": {"kind": "probe", "pooling": "mean"}}')
    result = _run("generate", run, "--prompt", "hi")
    assert result.exit_code == 1 and "it is a probe run, a classifier head" in result.output, result.output


def test_a_system_message_the_prompt_cannot_carry_is_refused_not_dropped(model_dir, tmp_path):
    result = _run("generate", model_dir, "--prompt", "hi", "--raw", "--system", "be brief")
    assert result.exit_code == 2 and "--system is a chat message" in result.output, result.output
    plain = tmp_path / "plain"  # the same model, its tokenizer without a chat template
    tl.make_model_dir(plain)
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((plain / "tokenizer_config.json").read_text())
    (plain / "tokenizer_config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "chat_template"}))
    result = _run("generate", plain, "--prompt", "hi", "--system", "be brief")
    assert result.exit_code == 1 and "--system needs a chat template" in result.output, result.output
    result = _run("generate", plain, "--prompt", "hi", "--max-new-tokens", 2)  # plain text still generates
    assert result.exit_code == 0, result.output


STRICT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% elif m['content'] == 'boom' %}{{ raise_exception('no booms') }}{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_chat_names_what_its_chat_template_refuses_and_goes_on_after_a_refused_turn(tmp_path):
    strict = tmp_path / "strict"  # a template like Gemma's: no system role
    tl.make_model_dir(strict)
    (strict / "chat_template.jinja").write_text(STRICT_TEMPLATE)
    result = CliRunner().invoke(main, ["chat", str(strict), "--system", "be brief"], input="hello\n")
    assert result.exit_code == 1 and "error: --system: " in result.output
    assert "System role not supported" in result.output
    assert "internal error" not in result.output
    result = CliRunner().invoke(main, ["chat", str(strict), "--max-new-tokens", 2], input="boom\nhello\n")
    assert result.exit_code == 0, result.output
    assert "no booms" in result.output and result.stdout.count("\n") >= 2  # the note, then the reply to hello


def test_an_out_that_would_replace_the_input_or_an_existing_file_is_refused(model_dir, tmp_path):
    rows = write_jsonl(tmp_path / "rows.jsonl", [chat("user", "hi", "assistant", "there")])
    before = Path(rows).read_text()
    for args in (
        ["generate", model_dir, "--file", rows, "--out", rows, "--force"],
        ["eval", model_dir, "--data", rows, "--out", rows, "--force"],
        ["eval", model_dir, "--data", rows, "--out", rows],
    ):
        result = _run(*args)
        assert result.exit_code == 2 and f"--out {rows} is the --" in result.output, result.output
    taken = tmp_path / "taken.json"
    taken.write_text("keep me")
    result = _run("eval", model_dir, "--data", rows, "--out", taken, "--no-generate")
    assert result.exit_code == 2 and "exists; pass --force" in result.output
    assert taken.read_text() == "keep me" and Path(rows).read_text() == before
    result = _run("eval", model_dir, "--data", rows, "--out", taken, "--no-generate", "--force")
    assert result.exit_code == 0 and json.loads(taken.read_text())["rows"] == 1
