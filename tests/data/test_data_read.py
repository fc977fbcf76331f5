import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
from data_testlib import chat, write_jsonl

from ftc.backends.jax.data.read import DataError, read_rows, resolve_sources


def test_every_format_reads_and_normalises(tmp_path):
    cases = {
        "chat": (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "you"}]},
                    {"role": "assistant", "content": "yo", "weight": 1},
                ],
                "tools": [],
            },
            {"messages": [{"role": "user", "content": "hi you"}, {"role": "assistant", "content": "yo", "weight": 1}]},
        ),
        "completion": ({"prompt": "2+2=", "completion": "4", "id": 7}, {"prompt": "2+2=", "completion": "4"}),
        "text": ({"text": "plain"}, {"text": "plain"}),
        "classification": ({"text": "t", "label": 3}, {"text": "t", "label": 3}),
    }
    for format, (raw, normal) in cases.items():
        path = write_jsonl(tmp_path / f"{format}.jsonl", [raw])
        result = read_rows(path, format=format, on_bad_row="error")
        assert [r.data for r in result.rows] == [normal]
        assert result.rows[0].where == f"{path}:1"


def test_preference_openai_and_trl_styles_normalise_alike(tmp_path):
    openai = {
        "input": {"messages": [{"role": "user", "content": "q"}]},
        "preferred_output": [{"role": "assistant", "content": "good"}],
        "non_preferred_output": [{"role": "assistant", "content": "bad"}],
    }
    trl_messages = {
        "prompt": [{"role": "user", "content": "q"}],
        "chosen": [{"role": "assistant", "content": "good"}],
        "rejected": [{"role": "assistant", "content": "bad"}],
    }
    trl_mixed = {"prompt": "q", "chosen": [{"role": "assistant", "content": "good"}], "rejected": "bad"}
    trl_implicit = {
        "chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "good"}],
        "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "bad"}],
    }
    trl_strings = {"prompt": "q", "chosen": "good", "rejected": "bad"}
    path = write_jsonl(tmp_path / "p.jsonl", [openai, trl_messages, trl_mixed, trl_implicit, trl_strings])
    rows = read_rows(path, format="preference", on_bad_row="error").rows
    assert rows[0].data == rows[1].data == rows[2].data == rows[3].data == trl_messages
    assert rows[4].data == trl_strings


def test_malformed_rows_are_named_by_file_and_line(tmp_path):
    path = write_jsonl(
        tmp_path / "bad.jsonl",
        [
            chat("user", "fine", "assistant", "ok"),
            "{not json",
            "",  # blank lines are not rows (and do not shift line numbers)
            {"messages": [{"role": "user"}]},
            {"messages": "hello"},
            {"messages": [{"role": "assistant", "content": "x", "weight": 2}]},
            [1, 2],
            {"msgs": []},
        ],
    )
    with pytest.raises(DataError) as e:
        read_rows(path, format="chat", on_bad_row="error")
    problems = e.value.problems
    assert [p.split(": ")[0] for p in problems] == [f"{path}:{n}" for n in (2, 4, 5, 6, 7, 8)]
    assert "invalid JSON" in problems[0] and "expected one JSON object per line" in problems[0]
    assert "missing key 'messages[0].content', expected a string" in problems[1]
    assert "'messages' is a string, expected a non-empty array of messages" in problems[2]
    assert "'messages[0].weight' is 2, expected 0 or 1" in problems[3]
    assert "row is an array, expected a JSON object" in problems[4]
    assert f"{path}:2" in str(e.value)  # the message itself lists them


def test_skip_leaves_bad_rows_out_and_counts_them(tmp_path):
    path = write_jsonl(
        tmp_path / "c.jsonl",
        [
            {"prompt": "a", "completion": "b"},
            {"prompt": "a", "completion": 5},
            {"prompt": "c", "completion": "d"},
            b"\xff\xfe".decode("latin-1"),
        ],
    )
    with open(path, "ab") as f:
        f.write(b'{"prompt": "\xff", "completion": "x"}\n')
    result = read_rows(path, format="completion", on_bad_row="skip")
    assert [r.data["prompt"] for r in result.rows] == ["a", "c"]
    assert [r.where for r in result.rows] == [f"{path}:1", f"{path}:3"]
    assert len(result.skipped) == 3
    assert result.skipped[0] == f"{path}:2: 'completion' is an integer, expected a string"
    assert result.skipped[2].startswith(f"{path}:5: not valid UTF-8")


def test_classification_label_must_be_string_or_non_negative_int(tmp_path):
    path = write_jsonl(tmp_path / "l.jsonl", [{"text": "a", "label": -1}, {"text": "a", "label": True}, {"text": "a"}])
    with pytest.raises(DataError) as e:
        read_rows(path, format="classification", on_bad_row="error")
    assert len(e.value.problems) == 3
    assert "expected a string or a non-negative integer" in e.value.problems[0]


def test_classification_labels_written_as_whole_floats_read_as_integers(tmp_path):
    # pandas writes an integer column that has a missing value as floats: 0.0, 1.0
    path = write_jsonl(tmp_path / "l.jsonl", [{"text": "a", "label": 1.0}, {"text": "b", "label": 0.5}])
    result = read_rows(path, format="classification", on_bad_row="skip")
    assert [r.data["label"] for r in result.rows] == [1] and isinstance(result.rows[0].data["label"], int)
    assert result.skipped == (f"{path}:2: 'label' is 0.5, expected a string or a non-negative integer",)


def test_globs_and_lists_read_in_order(tmp_path):
    for name in ("b", "a", "c"):
        write_jsonl(tmp_path / f"{name}.jsonl", [{"text": name}])
    (tmp_path / "sub").mkdir()
    write_jsonl(tmp_path / "sub" / "d.jsonl", [{"text": "d"}])
    result = read_rows(
        [str(tmp_path / "*.jsonl"), str(tmp_path / "sub" / "d.jsonl")], format="text", on_bad_row="error"
    )
    assert [r.data["text"] for r in result.rows] == ["a", "b", "c", "d"]
    with pytest.raises(DataError, match="no files match"):
        resolve_sources(str(tmp_path / "*.json"))
    with pytest.raises(DataError, match="no such file"):
        resolve_sources(str(tmp_path / "missing.jsonl"))


class TinyChatForFtc(tfds.core.GeneratorBasedBuilder):
    """A local tfds dataset, prepared as array_record (no TensorFlow, no download)."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {"messages": tfds.features.Sequence({"role": tfds.features.Text(), "content": tfds.features.Text()})}
            ),
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(3)}

    def _generate_examples(self, n):
        for i in range(n):
            yield (
                i,
                {
                    "messages": [
                        {"role": "user", "content": f"question {i}"},
                        {"role": "assistant", "content": f"answer {i}"},
                    ]
                },
            )


def test_tfds_source_reads_through_array_record_without_tensorflow(tmp_path):
    TinyChatForFtc(data_dir=str(tmp_path)).download_and_prepare(file_format="array_record")
    result = read_rows("tfds:tiny_chat_for_ftc:train", format="chat", on_bad_row="error", tfds_data_dir=str(tmp_path))
    assert [r.data for r in result.rows] == [
        {"messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]}
        for i in range(3)
    ]
    assert result.rows[1].where == "tfds:tiny_chat_for_ftc:train[1]"
    assert "tensorflow" not in sys.modules
    with pytest.raises(DataError, match="cannot open it through tfds.data_source"):
        read_rows("tfds:tiny_chat_for_ftc:test", format="chat", on_bad_row="error", tfds_data_dir=str(tmp_path))
    with pytest.raises(DataError, match="cannot open it through tfds.data_source") as unknown:
        read_rows("tfds:no_such_set_for_ftc:train", format="chat", on_bad_row="error", tfds_data_dir=str(tmp_path))
    assert "\n" not in str(unknown.value)  # tfds follows 'not found' with the ~270 datasets it knows, one a line


def test_classification_labels_from_csv_cells_are_numerals_in_order_or_indices_into_data_labels(tmp_path):
    from ftc.backends.jax.data.formats.classification import label_indexer, label_names_of

    path = tmp_path / "l.csv"
    path.write_text("text,label\n" + "".join(f"t{i},{i}\n" for i in (10, 2, 0, 1)))
    rows = read_rows(str(path), format="classification", on_bad_row="error").rows
    names = label_names_of(rows)
    assert names == ("0", "1", "2", "10") and [label_indexer(names)(r) for r in rows] == [3, 2, 0, 1]
    given = label_indexer(["zero", "one", "two"])  # data.labels names them; the cells are their indices
    assert [given(r) for r in rows[1:]] == [2, 0, 1]
    with pytest.raises(DataError, match=r"l.csv:2: label '10' is not one of the labels \['zero', 'one', 'two'\]"):
        given(rows[0])


class TinyBytesForFtc(tfds.core.GeneratorBasedBuilder):
    """Text stored as a bytes feature, one row of it not UTF-8."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        feature = tfds.features.Tensor(shape=(), dtype=np.object_)
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({"text": feature}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for i, text in enumerate([b"fine", b"caf\xe9", b"also fine"]):
            yield i, {"text": text}


def test_a_tfds_row_whose_bytes_are_not_utf8_is_a_bad_row_named_by_its_index(tmp_path):
    TinyBytesForFtc(data_dir=str(tmp_path)).download_and_prepare(file_format="array_record")
    result = read_rows("tfds:tiny_bytes_for_ftc:train", format="text", on_bad_row="skip", tfds_data_dir=str(tmp_path))
    assert [r.data["text"] for r in result.rows] == ["fine", "also fine"]
    assert result.skipped == (
        "tfds:tiny_bytes_for_ftc:train[1]: a bytes feature is not UTF-8 text (unexpected end of data at byte 3)",
    )


def test_a_stray_huge_integer_label_is_refused_naming_its_row_not_a_class_list_built(tmp_path):
    from ftc.backends.jax.data.formats.classification import label_names_of

    path = write_jsonl(tmp_path / "l.jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": 10**15}])
    rows = read_rows(path, format="classification", on_bad_row="error").rows
    with pytest.raises(DataError, match=rf"^{path}:2: label 1000000000000000 makes 1000000000000001 classes"):
        label_names_of(rows)


def test_training_rows_of_a_single_class_are_refused_naming_the_file_unless_data_labels_names_more(tmp_path):
    # one class: the softmax is 1 whatever the head says, so the loss is 0 and a run would train nothing
    from ftc.backends.jax.data.formats.classification import label_names_of

    for label in ("spam", 0):
        path = write_jsonl(tmp_path / "one.jsonl", [{"text": "a", "label": label}, {"text": "b", "label": label}])
        rows = read_rows(path, format="classification", on_bad_row="error").rows
        with pytest.raises(DataError, match=rf"^{path}:1: label .*expected at least 2 classes"):
            label_names_of(rows)
    assert label_names_of(rows, ["ham", "spam"]) == ("ham", "spam")


def test_prompt_rows_read_trls_grpo_prompt_key_as_messages_or_a_user_turn(tmp_path):
    user = [{"role": "user", "content": "What is 2 + 2?"}]
    rows = [{"prompt": user, "answer": 4}, {"prompt": "What is 2 + 2?", "answer": "4"}, {"messages": user, "answer": 4}]
    read = read_rows(write_jsonl(tmp_path / "g.jsonl", rows), format="prompt", on_bad_row="error").rows
    assert [r.data for r in read] == [
        {"messages": user, "answer": "4", "text": None},
        {"messages": user, "answer": "4", "text": "What is 2 + 2?"},  # kept for a tokenizer without a template
        {"messages": user, "answer": "4", "text": None},
    ]


def test_hh_rows_split_where_trls_extract_prompt_splits_them_when_the_answers_differ_from_a_word(tmp_path):
    """Prompt and response are tokenised apart: with the prompt ending in "Assistant: " a BPE
    tokenizer trained a lone space token and then "The" without its space (generation writes
    " The"); TRL's extract_prompt leaves the space with the responses."""
    from trl.data_utils import extract_prompt

    human = "\n\nHuman: What is up?\n\nAssistant:"
    rows = [
        {"chosen": human + " The sky.", "rejected": human + " Nothing."},
        {"chosen": human + " It is blue.", "rejected": human + " It is green."},
        {
            "chosen": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: yes",
            "rejected": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: no",
        },
    ]
    read = read_rows(write_jsonl(tmp_path / "hh.jsonl", rows), format="preference", on_bad_row="error").rows
    assert [r.data for r in read] == [extract_prompt(row) for row in rows]
    assert read[0].data["prompt"].endswith("Assistant:") and read[0].data["chosen"] == " The sky."


def test_preference_strings_without_a_prompt_share_their_start_as_the_prompt_as_hh_rows_do(tmp_path):
    human = "\n\nHuman: What should I name my cat?\n\nAssistant:"
    rows = [
        {"chosen": human + " How about Tom?", "rejected": human + " How rude."},
        {"chosen": "first answer", "rejected": "second answer"},
    ]
    result = read_rows(write_jsonl(tmp_path / "hh.jsonl", rows), format="preference", on_bad_row="skip")
    # The space before the first differing word starts the responses, as TRL's extract_prompt leaves it.
    assert [r.data for r in result.rows] == [{"prompt": human + " How", "chosen": " about Tom?", "rejected": " rude."}]
    assert result.skipped[0].endswith(
        "'chosen' and 'rejected' share no leading text and there is no 'prompt', "
        "expected a prompt (a shared start or a 'prompt' key)"
    )
