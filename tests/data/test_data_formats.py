import textwrap

import numpy as np
import pytest
from data_testlib import make_tokenizer, spec_data_options, write_jsonl

from ftc.backends.jax.data import formats
from ftc.backends.jax.data.datasets import build_datasets
from ftc.backends.jax.data.read import DataError, read_rows
from ftc.spec import schema_walk

TOK = make_tokenizer(eos_is_pad=True)

QA_MODULE = '''
"""qa: {"question", "answer"} rows, trained like completion rows (the question is the prompt)."""
import dataclasses

from ftc.backends.jax.data.formats import completion
from ftc.backends.jax.data.read import expect_object, expect_string


def normalise(record):
    record = expect_object(record)
    return {"prompt": expect_string(record, "question"), "completion": expect_string(record, "answer")}


FORMAT = dataclasses.replace(completion.FORMAT, name="qa", normalise=normalise)
'''


@pytest.fixture
def qa_format(tmp_path, monkeypatch):
    """A format registered the way a new one is: its own module and one registry line."""
    (tmp_path / "toy_qa_format.py").write_text(textwrap.dedent(QA_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(formats.FORMAT_MODULES, "qa", "toy_qa_format")
    return "qa"


def test_registry_lists_exactly_the_schemas_data_formats():
    assert formats.names() == tuple(schema_walk.node_at(("data", "format"))["enum"])
    assert all(formats.get(name).name == name for name in formats.names())


def test_a_format_registered_in_its_own_module_reads_tokenises_and_batches(tmp_path, qa_format):
    rows = [{"question": f"what is {i}? ", "answer": f"it is {i}."} for i in range(5)]
    path = write_jsonl(tmp_path / "qa.jsonl", rows + [{"question": "no answer"}])
    with pytest.raises(DataError, match=r"qa.jsonl:6: missing key 'answer', expected a string"):
        read_rows(path, format="qa", on_bad_row="error")
    # The schema does not know "qa": take the spec's [data] values for completion data.
    options = {
        **spec_data_options("completion", train=path, tokenizer=TOK, max_seq_len=32, batch_size=4, on_bad_row="skip"),
        "format": "qa",
    }
    ds = build_datasets(**options)
    assert ds.kind == "lm" and ds.stats.format == "qa" and ds.stats.bad_rows_skipped == 1
    assert ds.stats.train_sequences == 5 and ds.stats.packing
    batch = next(ds.train_iterator())
    supervised = TOK.decode(batch["targets"][batch["weights"] > 0])
    assert "it is" in supervised and "what" not in supervised
    # The same rows written as completion rows give the same arrays: only normalising differs.
    completion = write_jsonl(tmp_path / "c.jsonl", [{"prompt": r["question"], "completion": r["answer"]} for r in rows])
    same = build_datasets(**{**options, "format": "completion", "train": completion})
    for key, array in ds.train_rows.items():
        np.testing.assert_array_equal(array, same.train_rows[key])


def test_an_unregistered_format_names_the_registered_ones(tmp_path):
    with pytest.raises(
        ValueError, match="data format 'qa' is not one of chat, completion, text, preference, classification"
    ):
        read_rows(write_jsonl(tmp_path / "x.jsonl", [{}]), format="qa", on_bad_row="error")


def test_spec_keys_that_do_not_apply_to_a_format_may_be_none(tmp_path):
    rows = [{"text": f"hello {i}", "label": ["spam", "ham"][i % 2]} for i in range(4)]
    options = spec_data_options(
        "classification", train=write_jsonl(tmp_path / "t.jsonl", rows), tokenizer=TOK, max_seq_len=16, batch_size=4
    )
    assert options["packing"] is None and options["train_on"] is None
    ds = build_datasets(**options)
    assert ds.kind == "classification" and ds.stats.packing is False
    with pytest.raises(ValueError, match="train_on None is not 'assistant' or 'all'"):
        build_datasets(**{**options, "format": "chat", "train": write_jsonl(tmp_path / "c.jsonl", [{"messages": []}])})
