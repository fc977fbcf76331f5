"""Data sources (file kinds): Parquet files and Hugging Face datasets (save_to_disk directories and
the local datasets cache, offline) read the same rows as JSONL, name each row, and refuse what they
cannot read with the source's name. Registry: one module per kind, each claimed in order."""

import glob
import os
import shutil
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from data_testlib import make_tokenizer, spec_data_options, write_jsonl

from ftc.backends.jax.data import sources
from ftc.backends.jax.data.datasets import build_datasets
from ftc.backends.jax.data.read import DataError, read_rows, resolve_sources

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
TOK = make_tokenizer(eos_is_pad=True)
SHAREGPT = [
    {"conversations": [{"from": "human", "value": f"question {i}?"}, {"from": "gpt", "value": f"answer {i}."}]}
    for i in range(5)
]


def test_parquet_rows_read_like_the_same_rows_in_jsonl(tmp_path):
    path = os.path.join(FIXTURES, "chat_valid.parquet")
    result = read_rows(path, format="chat", on_bad_row="error")
    assert [r.where for r in result.rows] == [f"{path}[{i}]" for i in range(3)]
    as_jsonl = write_jsonl(tmp_path / "chat.jsonl", pq.read_table(path).to_pylist())
    assert [r.data for r in result.rows] == [
        r.data for r in read_rows(as_jsonl, format="chat", on_bad_row="error").rows
    ]
    options = spec_data_options("chat", train=path, tokenizer=TOK, max_seq_len=64)
    ours, same = build_datasets(**options, batch_size=2), build_datasets(**{**options, "train": as_jsonl}, batch_size=2)
    for key, array in same.train_rows.items():
        np.testing.assert_array_equal(ours.train_rows[key], array)


def test_a_glob_mixes_jsonl_and_parquet_each_read_by_its_kind(tmp_path):
    pq.write_table(pa.Table.from_pylist([{"text": "b"}, {"text": "c"}]), tmp_path / "b.parquet")
    write_jsonl(tmp_path / "a.jsonl", [{"text": "a"}])
    result = read_rows(str(tmp_path / "*"), format="text", on_bad_row="error")
    assert [r.data["text"] for r in result.rows] == ["a", "b", "c"]
    assert [sources.source_for(f).name for f in result.files] == ["jsonl", "parquet"]


def test_a_file_that_is_not_parquet_is_refused_naming_it(tmp_path):
    bad = tmp_path / "rows.parquet"
    bad.write_text('{"text": "JSON in disguise"}\n')
    with pytest.raises(DataError, match=r"rows.parquet': cannot read it as Parquet \(ArrowInvalid"):
        read_rows(str(bad), format="text", on_bad_row="error")


def test_parquet_with_another_formats_columns_names_the_missing_key(tmp_path):
    path = tmp_path / "alpaca.parquet"
    pq.write_table(pa.Table.from_pylist([{"instruction": "x", "answer": "y"}]), path)
    with pytest.raises(DataError) as e:
        read_rows(str(path), format="alpaca", on_bad_row="error")
    assert e.value.problems == (f"{path}[0]: missing key 'output', expected a string",)


def test_sources_registry_claims_named_sources_then_files_with_jsonl_last():
    assert sources.names()[-1] == "jsonl"
    assert sources.source_for("tfds:a:train").name == "tfds" and sources.source_for("hf:org/x").name == "hf"
    assert sources.prefixes() == ("tfds:", "hf:")
    assert sources.source_for(os.path.join(FIXTURES, "chat_valid.parquet")).name == "parquet"
    assert sources.source_for(os.path.join(FIXTURES, "alpaca_valid.jsonl")).name == "jsonl"


# ------------------------------------------------------------------ Hugging Face datasets

datasets = pytest.importorskip("datasets")


def test_a_save_to_disk_directory_reads_as_rows(tmp_path):
    datasets.Dataset.from_list(SHAREGPT).save_to_disk(str(tmp_path / "saved"))
    result = read_rows(str(tmp_path / "saved"), format="sharegpt", on_bad_row="error")
    assert result.rows[4].where == f"{tmp_path / 'saved'}[4]"
    assert result.rows[4].data["messages"][1] == {"role": "assistant", "content": "answer 4."}
    # A glob over data directories finds the dataset directory too.
    assert resolve_sources(str(tmp_path / "*")) == [str(tmp_path / "saved")]


def test_a_save_to_disk_row_whose_binary_column_is_not_utf8_is_a_bad_row_named_by_index(tmp_path):
    datasets.Dataset.from_dict({"text": [b"fine", b"caf\xe9", b"ok"]}).save_to_disk(str(tmp_path / "bin"))
    result = read_rows(str(tmp_path / "bin"), format="text", on_bad_row="skip")
    assert [r.data["text"] for r in result.rows] == ["fine", "ok"]
    assert result.skipped == (
        f"{tmp_path / 'bin'}[1]: a binary value is not UTF-8 text (unexpected end of data at byte 3)",
    )


def test_a_dataset_dict_directory_asks_for_one_of_its_splits(tmp_path):
    ds = datasets.Dataset.from_list(SHAREGPT)
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match=r"it holds the splits test, train: name one, e.g. '.*dd/test'"):
        resolve_sources(str(tmp_path / "dd"))
    rows = read_rows(str(tmp_path / "dd" / "test"), format="sharegpt", on_bad_row="error").rows
    assert len(rows) == 1
    with pytest.raises(DataError, match="a directory, but not one written by `datasets`' save_to_disk"):
        resolve_sources(str(tmp_path))


def cache_dataset(tmp_path, repo: str, splits: dict) -> str:
    """The local HF datasets cache entry that `datasets.load_dataset(repo)` leaves behind, made
    from Parquet files without a hub (the builder load_dataset uses, moved under the repo's name)."""
    from datasets.packaged_modules.parquet.parquet import Parquet

    files = {}
    for split, rows in splits.items():
        files[split] = str(tmp_path / f"{split}.parquet")
        pq.write_table(pa.Table.from_pylist(rows), files[split])
    name = repo.split("/")[-1]
    Parquet(
        cache_dir=str(tmp_path / "build"), dataset_name=name, data_files=files, hash="0123abcd"
    ).download_and_prepare()
    cache = tmp_path / "hf_datasets_cache"
    (cache / repo.replace("/", "___")).mkdir(parents=True)
    shutil.move(
        glob.glob(str(tmp_path / "build" / name / "default-*"))[0], cache / repo.replace("/", "___") / "default"
    )
    return str(cache)


def test_hf_names_a_dataset_in_the_local_cache_offline(tmp_path, monkeypatch):
    cache = cache_dataset(tmp_path, "someorg/tiny_alpaca", {"train": [{"instruction": "i", "output": "o"}] * 3})
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    result = read_rows("hf:someorg/tiny_alpaca", format="alpaca", on_bad_row="error")  # split: train
    assert [r.where for r in result.rows] == [f"hf:someorg/tiny_alpaca[{i}]" for i in range(3)]
    assert result.rows[0].data["completion"] == "o"
    assert "HF_HUB_OFFLINE" not in os.environ  # offline only while reading
    with pytest.raises(DataError, match=r"Unknown split \"validation\". Should be one of \['train'\]"):
        read_rows("hf:someorg/tiny_alpaca:validation", format="alpaca", on_bad_row="error")
    with pytest.raises(DataError, match=r"'someorg/absent' is not in the local Hugging Face datasets cache .*never"):
        read_rows("hf:someorg/absent:train", format="alpaca", on_bad_row="error")
    with pytest.raises(DataError, match="expected hf:NAME, hf:NAME:SPLIT or hf:NAME:CONFIG:SPLIT"):
        read_rows("hf:a:b:c:d", format="alpaca", on_bad_row="error")


def test_without_the_datasets_package_hf_sources_say_which_extra_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DataError, match=r"needs the `datasets` package: pip install 'ftc\[datasets\]'"):
        read_rows("hf:org/x:train", format="chat", on_bad_row="error")


def test_parquet_struct_fields_a_message_lacks_are_absent_not_null(tmp_path):
    # pyarrow gives every message every field: null "weight" where a message had none.
    rows = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo", "weight": 0}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
    ]
    path = str(tmp_path / "chat.parquet")
    pq.write_table(pa.Table.from_pylist(rows), path)
    assert [r.data for r in read_rows(path, format="chat", on_bad_row="error").rows] == rows
    user, good, bad = ({"role": r, "content": c} for r, c in (("user", "q"), ("assistant", "a"), ("assistant", "b")))
    pairs = [
        {"prompt": [user], "chosen": [good], "rejected": [bad]},
        {"prompt": None, "chosen": [user, good], "rejected": [user, bad]},  # the prompt is what they share
    ]
    pq.write_table(pa.Table.from_pylist(pairs), path)
    read = read_rows(path, format="preference", on_bad_row="error").rows
    assert read[0].data == read[1].data == pairs[0]


def test_a_parquet_file_damaged_past_its_first_rows_is_a_data_error_naming_where(tmp_path):
    path = tmp_path / "big.parquet"
    pq.write_table(pa.Table.from_pylist([{"text": f"row {i} " * 3} for i in range(12000)]), path, row_group_size=5000)
    page = pq.ParquetFile(path).metadata.row_group(2).column(0).data_page_offset
    damaged = bytearray(path.read_bytes())
    damaged[page + 40 : page + 240] = b"\xff" * 200  # the last row group's page header
    path.write_bytes(bytes(damaged))
    with pytest.raises(DataError, match=rf"data source '{path}': cannot read it as Parquet past row 8192 "):
        read_rows(str(path), format="text", on_bad_row="skip")
