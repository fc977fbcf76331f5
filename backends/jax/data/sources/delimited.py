"""csv: a `.csv` or `.tsv` file (or `.gz`, `.bz2`, `.xz` of one) with a header row, read with
Python's csv module (quoted fields may hold commas, tabs and newlines).

The header names the keys; every cell is a string, as the file holds it (nothing is guessed:
"1" stays "1"; message lists need JSONL, JSON or Parquet). Rows are named `path:line`, the line
a record starts on (1-based, the header is line 1); blank lines are not rows. A record with more
or fewer fields than the header is a bad row; a header with empty or repeated names, or a file
that is not UTF-8, is the file's problem (one DataError naming it).
"""

from __future__ import annotations

import csv
import io
import sys
from collections.abc import Iterator
from typing import Any

from ftc.backends.jax.data.read import BadRow, DataError
from ftc.backends.jax.data.sources import DECOMPRESS_ERRORS, Source, base_name, file_stat, open_bytes

SUFFIXES = (".csv", ".tsv")


def records(path: str, data_dir: str | None = None) -> Iterator[tuple[str, Any]]:
    # A training example is often longer than the csv module's default 128 KiB field limit.
    csv.field_size_limit(max(csv.field_size_limit(), min(sys.maxsize, 2**31 - 1)))
    delimiter = "\t" if base_name(path).endswith(".tsv") else ","
    try:
        with open_bytes(path) as raw:
            yield from _rows(path, io.TextIOWrapper(raw, encoding="utf-8-sig", newline=""), delimiter)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 ({e.reason}), expected UTF-8 text") from None
    except DECOMPRESS_ERRORS as e:
        raise DataError(f"data source {path!r}: cannot read it ({type(e).__name__}: {e})") from e


def _rows(path: str, text, delimiter: str) -> Iterator[tuple[str, Any]]:
    reader = csv.reader(text, delimiter=delimiter)
    try:
        header = next(reader, None)
        if header is None:
            return
        _check_header(path, header, delimiter)
        line = reader.line_num
        for fields in reader:
            where, line = f"{path}:{line + 1}", reader.line_num
            if not fields:
                continue  # a blank line
            if len(fields) != len(header):
                yield where, BadRow(f"{len(fields)} fields, expected {len(header)} (the header's {', '.join(header)})")
                continue
            yield where, dict(zip(header, fields))
    except csv.Error as e:
        raise DataError(
            f"{path}:{reader.line_num}: not readable as {'TSV' if delimiter == chr(9) else 'CSV'}: {e}"
        ) from None


def _check_header(path: str, header: list[str], delimiter: str) -> None:
    named = "tab" if delimiter == "\t" else "comma"
    other = [d for d in (";", "|", "\t", ",") if d != delimiter and len(header) == 1 and d in header[0]]
    if other:  # a semicolon-separated "CSV" (a European spreadsheet's export) reads as one column
        raise DataError(
            f"{path}:1: the header row is one column {header[0]!r}, separated by {other[0]!r}; expected "
            f"{named}-separated keys (ftc reads .csv as comma-separated, .tsv as tab-separated)"
        )
    if any(not name.strip() for name in header):
        raise DataError(
            f"{path}:1: the header row has an empty column name ({header!r}), expected the rows' keys, "
            f"{named}-separated"
        )
    repeated = sorted({name for name in header if header.count(name) > 1})
    if repeated:
        raise DataError(f"{path}:1: the header row repeats {', '.join(map(repr, repeated))}, expected distinct keys")


SOURCE = Source(
    name="csv",
    claims=lambda entry: base_name(entry).endswith(SUFFIXES),
    records=records,
    fingerprint=file_stat,
)
