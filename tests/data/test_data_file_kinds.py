"""The files people have data in: a JSON array (`json.dump(rows)`), compressed JSONL, CSV and TSV
read the same rows as JSONL, name each row, and a file that is none of these (plain text, UTF-16,
one JSON object) is one error naming it and what ftc reads instead."""

import bz2
import gzip
import json
import lzma

import pytest
from data_testlib import chat, write_jsonl

from ftc.backends.jax.data import sources
from ftc.backends.jax.data.read import DataError, read_rows

ROWS = [chat("user", f"hi {i}", "assistant", f"hello {i}") for i in range(3)]


def datas(result):
    return [r.data for r in result.rows]


def test_a_json_array_file_reads_its_rows_named_by_index_and_line(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(ROWS, indent=2))
    result = read_rows(str(path), format="chat", on_bad_row="error")
    assert datas(result) == datas(
        read_rows(write_jsonl(tmp_path / "rows.jsonl", ROWS), format="chat", on_bad_row="error")
    )
    lines = path.read_text().splitlines()
    for i, row in enumerate(result.rows):
        index, line = row.where.rsplit("[", 1)[1].split("] (line ")
        assert int(index) == i and lines[int(line.rstrip(")")) - 1].strip() == "{"


def test_a_bad_row_of_a_json_array_is_named_and_a_syntax_error_names_its_line(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text('[\n  {"text": "a"},\n  {"txt": "b"}\n]\n')
    with pytest.raises(DataError) as e:
        read_rows(str(path), format="text", on_bad_row="error")
    assert e.value.problems == (f"{path}[1] (line 3): missing key 'text', expected a string",)
    path.write_text('[\n  {"text": "a"}\n  {"text": "b"}\n]\n')
    with pytest.raises(DataError, match=rf"^{path}:3: invalid JSON \(Expecting ',' delimiter at column 3\)"):
        read_rows(str(path), format="text", on_bad_row="skip")


def test_a_json_file_of_json_lines_reads_as_jsonl_and_one_object_is_refused_naming_its_arrays(tmp_path):
    lines = write_jsonl(tmp_path / "lines.json", ROWS)  # what Dataset.to_json writes
    assert datas(read_rows(lines, format="chat", on_bad_row="error")) == ROWS
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"version": 1, "data": ROWS}, indent=1))
    with pytest.raises(DataError, match=r"one JSON object \(keys 'version', 'data'\).*'data' may hold the rows"):
        read_rows(str(wrapped), format="chat", on_bad_row="skip")


@pytest.mark.parametrize("suffix,opener", [(".gz", gzip.open), (".bz2", bz2.open), (".xz", lzma.open)])
def test_compressed_jsonl_json_and_csv_read_as_their_plain_files(tmp_path, suffix, opener):
    for name, text, fmt in [
        ("rows.jsonl", "".join(json.dumps(r) + "\n" for r in ROWS), "chat"),
        ("rows.json", json.dumps(ROWS), "chat"),
        ("rows.csv", "prompt,completion\nhi,hello\n", "completion"),
    ]:
        path = str(tmp_path / (name + suffix))
        with opener(path, "wt", encoding="utf-8") as f:
            f.write(text)
        result = read_rows(path, format=fmt, on_bad_row="error")
        assert datas(result) == (ROWS if fmt == "chat" else [{"prompt": "hi", "completion": "hello"}])
    broken = tmp_path / ("broken.jsonl" + suffix)
    broken.write_bytes(b"not compressed")
    with pytest.raises(DataError, match=rf"data source '{broken}': cannot read it"):
        read_rows(str(broken), format="chat", on_bad_row="skip")


def test_csv_and_tsv_rows_are_header_keyed_strings_named_by_the_line_they_start_on(tmp_path):
    csv_path = tmp_path / "alpaca.csv"
    csv_path.write_text('instruction,input,output\n"say hi, nicely",,"hello\nthere"\n\nbye,,ciao\nonly,two\n')
    result = read_rows(str(csv_path), format="alpaca", on_bad_row="skip")
    assert [r.where for r in result.rows] == [f"{csv_path}:2", f"{csv_path}:5"]
    assert [r.data["completion"] for r in result.rows] == ["hello\nthere", "ciao"]
    assert result.skipped == (f"{csv_path}:6: 2 fields, expected 3 (the header's instruction, input, output)",)
    tsv_path = tmp_path / "labels.tsv"
    tsv_path.write_text("\ufefftext\tlabel\nhello, you\tpos\nbye\tneg\n")  # a BOM, as Excel writes it
    rows = read_rows(str(tsv_path), format="classification", on_bad_row="error").rows
    assert [r.data for r in rows] == [{"text": "hello, you", "label": "pos"}, {"text": "bye", "label": "neg"}]


def test_a_csv_header_with_repeated_or_empty_names_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("text,text\na,b\n")
    with pytest.raises(DataError, match=rf"^{path}:1: the header row repeats 'text'"):
        read_rows(str(path), format="text", on_bad_row="skip")
    path.write_text("text,\na,b\n")
    with pytest.raises(DataError, match=rf"^{path}:1: the header row has an empty column name"):
        read_rows(str(path), format="text", on_bad_row="skip")


def test_a_semicolon_separated_csv_is_refused_naming_its_separator(tmp_path):
    path = tmp_path / "excel.csv"
    path.write_text("prompt;completion\na;b\n")
    with pytest.raises(
        DataError, match=rf"^{path}:1: the header row is one column 'prompt;completion', separated by ';'"
    ):
        read_rows(str(path), format="completion", on_bad_row="skip")


def test_a_csv_field_longer_than_the_csv_modules_default_limit_is_read(tmp_path):
    path = tmp_path / "long.csv"
    path.write_text("text\n" + "word " * 40_000 + "\n")
    assert len(read_rows(str(path), format="text", on_bad_row="error").rows[0].data["text"]) == 200_000


def test_a_file_that_is_not_json_lines_is_one_error_saying_what_ftc_reads(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("just some text\nanother line\n")
    with pytest.raises(DataError) as e:
        read_rows(str(text), format="text", on_bad_row="skip")
    assert str(e.value).startswith(f"{text}:1: not JSON") and '{"text": ...}' in str(e.value)
    assert ".csv" in str(e.value) and e.value.problems == ()
    jsonl = write_jsonl(tmp_path / "rows.jsonl", ["not json", {"text": "fine"}])  # a .jsonl: a bad row, no more
    assert len(read_rows(jsonl, format="text", on_bad_row="skip").skipped) == 1


def test_a_utf16_file_is_refused_as_utf16_not_as_lines_of_bad_bytes(tmp_path):
    for name in ("rows.jsonl", "rows.json"):
        path = tmp_path / name
        path.write_bytes("".join(json.dumps(r) + "\n" for r in ROWS).encode("utf-16"))
        with pytest.raises(DataError, match=rf"^{path}(:1)?: the file is UTF-16"):
            read_rows(str(path), format="chat", on_bad_row="skip")


def test_each_file_kind_is_claimed_by_its_suffix_with_or_without_compression(tmp_path):
    for name in ("a.json", "a.JSON.gz", "a.csv.xz", "a.tsv", "a.txt"):
        (tmp_path / name).write_text("")
    kinds = {
        name: sources.source_for(str(tmp_path / name)).name
        for name in ("a.json", "a.JSON.gz", "a.csv.xz", "a.tsv", "a.txt")
    }
    assert kinds == {"a.json": "json", "a.JSON.gz": "json", "a.csv.xz": "csv", "a.tsv": "csv", "a.txt": "jsonl"}


def test_prompt_files_for_eval_and_generate_read_every_file_kind_training_data_does(tmp_path):
    from ftc.backends.jax.generate.prompt_rows import read_prompt_rows

    path = tmp_path / "valid.json"
    path.write_text(json.dumps(ROWS, indent=2))
    rows = read_prompt_rows(path)
    assert [(r.where, r.reference) for r in rows] == [
        (f"{path}[{i}] (line {2 + 12 * i})", f"hello {i}") for i in range(3)
    ]
    csv_path = tmp_path / "prompts.csv.gz"
    with gzip.open(csv_path, "wt") as f:
        f.write("prompt,completion\nthe quick,brown fox\n")
    assert [(r.prompt, r.reference) for r in read_prompt_rows(csv_path)] == [("the quick", "brown fox")]
    with pytest.raises(DataError, match=rf"^{tmp_path}: cannot read the prompt file \(a directory, expected a file\)"):
        read_prompt_rows(tmp_path)
