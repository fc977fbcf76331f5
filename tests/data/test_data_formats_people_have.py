"""ShareGPT and Alpaca rows (formats: row shapes) read, fail with located errors, and train exactly
as the chat / completion rows they normalise to. Fixtures: tests/data/fixtures/<format>_valid.*
and <format>_invalid.* with the expected problems in <format>_invalid.expect."""

import os

import numpy as np
import pytest
from data_testlib import make_tokenizer, spec_data_options, write_jsonl

from ftc.backends.jax.data.datasets import build_datasets
from ftc.backends.jax.data.formats import alpaca
from ftc.backends.jax.data.read import DataError, read_rows

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
TOK = make_tokenizer(eos_is_pad=True)
INVALID = sorted(name for name in os.listdir(FIXTURES) if name.endswith(".expect"))


def fixture(name: str) -> str:
    return os.path.join(FIXTURES, name)


def located_problems(path: str, format: str) -> list[str]:
    with pytest.raises(DataError) as e:
        read_rows(path, format=format, on_bad_row="error")
    return [p.replace(FIXTURES + os.sep, "") for p in e.value.problems]


@pytest.mark.parametrize("expect", INVALID)
def test_every_bad_row_of_an_invalid_fixture_is_reported_with_its_file_and_row(expect):
    data = next(n for n in os.listdir(FIXTURES) if n.startswith(expect[: -len(".expect")] + ".") and n != expect)
    format = data.split("_")[0]
    with open(fixture(expect), encoding="utf-8") as f:
        expected = f.read().splitlines()
    assert located_problems(fixture(data), format) == expected
    # The rows between the bad ones are fine: "skip" keeps exactly those.
    kept = read_rows(fixture(data), format=format, on_bad_row="skip")
    assert len(kept.skipped) == len(expected) and len(kept.rows) >= 1


def test_sharegpt_rows_become_chat_messages_with_roles_system_and_weights():
    rows = read_rows(fixture("sharegpt_valid.jsonl"), format="sharegpt", on_bad_row="error").rows
    assert rows[0].data == {
        "messages": [
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "Paris."},
        ]
    }
    assert [m["role"] for m in rows[1].data["messages"]] == ["system", "user", "assistant", "user", "assistant"]
    assert rows[1].data["messages"][-1]["weight"] == 1
    assert rows[2].data["messages"][0] == {"role": "system", "content": "Be kind."}
    assert rows[2].data["messages"][2] == {"role": "assistant", "content": "hi there", "weight": 0}
    assert rows[2].where.endswith("sharegpt_valid.jsonl:3")


def test_sharegpt_trains_exactly_as_the_chat_rows_it_normalises_to(tmp_path):
    rows = read_rows(fixture("sharegpt_valid.jsonl"), format="sharegpt", on_bad_row="error").rows
    as_chat = write_jsonl(tmp_path / "chat.jsonl", [r.data for r in rows])
    options = spec_data_options("sharegpt", train=fixture("sharegpt_valid.jsonl"), tokenizer=TOK, max_seq_len=256)
    ours = build_datasets(**options, batch_size=2)
    chat = build_datasets(**{**options, "format": "chat", "train": as_chat}, batch_size=2)
    assert ours.kind == "lm" and ours.stats.format == "sharegpt"
    for key, array in chat.train_rows.items():
        np.testing.assert_array_equal(ours.train_rows[key], array)
    # The weight-0 assistant turn ("hi there") carries no loss; the other assistant turns do.
    supervised = TOK.decode(ours.train_rows["targets"][ours.train_rows["weights"] > 0])
    assert "Paris" in supervised and "goodbye" in supervised and "hi there" not in supervised


def test_sharegpt_speakers_outside_the_table_are_roles_that_data_clean_roles_checks(tmp_path):
    path = write_jsonl(
        tmp_path / "s.jsonl", [{"conversations": [{"from": "narrator", "value": "x"}, {"from": "gpt", "value": "y"}]}]
    )
    options = spec_data_options("sharegpt", train=path, tokenizer=TOK, max_seq_len=32)
    with pytest.raises(
        DataError, match=r"s.jsonl:1: role 'narrator' is not one of 'assistant', 'system', 'tool', 'user'"
    ):
        build_datasets(**options, batch_size=1)


def test_alpaca_rows_become_completions_with_alpacas_own_prompts():
    rows = read_rows(fixture("alpaca_valid.jsonl"), format="alpaca", on_bad_row="error").rows
    assert rows[0].data["prompt"] == alpaca.PROMPT_NO_INPUT.format(instruction="Give three tips for staying healthy.")
    assert rows[1].data == {
        "prompt": alpaca.PROMPT_INPUT.format(instruction="Translate to French.", input="Good morning"),
        "completion": "Bonjour",
    }
    assert rows[1].data["prompt"].endswith("### Input:\nGood morning\n\n### Response:\n")
    assert rows[2].data["prompt"] == alpaca.PROMPT_NO_INPUT.format(instruction="Name a primary colour.")


def test_alpaca_trains_exactly_as_the_completion_rows_it_normalises_to(tmp_path):
    rows = read_rows(fixture("alpaca_valid.jsonl"), format="alpaca", on_bad_row="error").rows
    as_completion = write_jsonl(tmp_path / "c.jsonl", [r.data for r in rows])
    options = spec_data_options("alpaca", train=fixture("alpaca_valid.jsonl"), tokenizer=TOK, max_seq_len=512)
    ours = build_datasets(**options, batch_size=3)
    same = build_datasets(**{**options, "format": "completion", "train": as_completion}, batch_size=3)
    for key, array in same.train_rows.items():
        np.testing.assert_array_equal(ours.train_rows[key], array)
    supervised = TOK.decode(ours.train_rows["targets"][ours.train_rows["weights"] > 0])
    assert "Bonjour" in supervised and "Instruction" not in supervised


def test_sharegpt_turns_written_as_role_and_content_read_as_from_and_value(tmp_path):
    written = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    classic = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]
    path = write_jsonl(tmp_path / "s.jsonl", [{"conversations": written}, {"conversations": classic}])
    rows = read_rows(path, format="sharegpt", on_bad_row="error").rows
    assert rows[0].data == rows[1].data == {"messages": written}


def test_dolly_rows_read_as_alpaca_rows_with_context_and_response(tmp_path):
    dolly = {"instruction": "Summarise.", "context": "A long text.", "response": "Short.", "category": "summarization"}
    alpaca_row = {"instruction": "Summarise.", "input": "A long text.", "output": "Short."}
    path = write_jsonl(tmp_path / "d.jsonl", [dolly, alpaca_row, {**dolly, "context": ""}])
    rows = read_rows(path, format="alpaca", on_bad_row="error").rows
    assert rows[0].data == rows[1].data and rows[2].data["prompt"] == alpaca.PROMPT_NO_INPUT.format(
        instruction="Summarise."
    )
