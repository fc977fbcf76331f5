"""json: a `.json` file (or `.json.gz`, `.bz2`, `.xz`) holding one JSON array of rows, as
`json.dump(rows, f)` and many dataset downloads write it (Alpaca's `alpaca_data.json`).

Rows are named `path[i] (line n)`: the element's 0-based index and the line it starts on, so a
row of a pretty-printed file can be found. A `.json` file that does not start with `[` is read
as JSON Lines (`Dataset.to_json` writes those), except one JSON object over several lines,
which is refused naming the keys it holds (the rows are probably under one of them).
The array is parsed element by element, so a syntax error is reported at its line and column
after the rows before it.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from typing import Any

from ftc.backends.jax.data.read import BadRow, DataError
from ftc.backends.jax.data.sources import DECOMPRESS_ERRORS, Source, base_name, file_stat, jsonl, open_bytes

WHITESPACE = " \t\r\n"


def records(path: str, data_dir: str | None = None) -> Iterator[tuple[str, Any]]:
    try:
        with open_bytes(path) as f:
            data = f.read()
    except DECOMPRESS_ERRORS as e:
        raise DataError(f"data source {path!r}: cannot read it ({type(e).__name__}: {e})") from e
    if data.startswith(jsonl.UTF16_BOMS):
        raise DataError(f"{path}: the file is UTF-16 (it starts with a UTF-16 byte-order mark), expected UTF-8")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 ({e.reason} at byte {e.start}), expected UTF-8 JSON") from None
    start = len(text) - len(text.lstrip(WHITESPACE))
    if text[start : start + 1] != "[":
        _refuse_one_object(path, text)
        yield from jsonl.lines(path, io.BytesIO(data))
        return
    yield from _elements(path, text, start + 1)


def _elements(path: str, text: str, at: int) -> Iterator[tuple[str, Any]]:
    decoder = json.JSONDecoder()
    line, counted, i = 1, 0, 0

    def where(pos: int) -> tuple[int, int]:
        nonlocal line, counted
        line += text.count("\n", counted, pos)
        counted = pos
        return line, pos - (text.rfind("\n", 0, pos) + 1) + 1

    def refuse(pos: int, what: str):
        n, col = where(pos)
        return DataError(f"{path}:{n}: invalid JSON ({what} at column {col}), expected a JSON array of rows")

    at = _skip(text, at)
    if text.startswith("]", at):
        return
    while True:
        n, _ = where(at)
        try:
            value, end = decoder.raw_decode(text, at)
        except json.JSONDecodeError as e:
            raise refuse(e.pos, e.msg) from None
        except (ValueError, RecursionError) as e:  # an integer over 4300 digits; nesting past the stack
            raise DataError(f"{path}:{n}: unreadable JSON ({type(e).__name__}: {str(e)[:100]})") from None
        if "\\u" in text and (bad := jsonl.lone_surrogate(value)):
            value = BadRow(f"{bad} holds a lone surrogate escape (\\ud800-\\udfff), which is not Unicode text")
        yield f"{path}[{i}] (line {n})", value
        i, at = i + 1, _skip(text, end)
        if text.startswith("]", at):
            break
        if not text.startswith(",", at):
            raise refuse(at, "Expecting ',' delimiter")
        at = _skip(text, at + 1)
    if _skip(text, at + 1) != len(text):
        raise refuse(_skip(text, at + 1), "Extra data after the array")


def _skip(text: str, at: int) -> int:
    while at < len(text) and text[at] in WHITESPACE:
        at += 1
    return at


def _refuse_one_object(path: str, text: str) -> None:
    """A pretty-printed object is one value, not rows; JSON Lines rows are one line each."""
    if "\n" not in text.strip():
        return
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return  # JSON Lines (several values), or broken: jsonl names the bad lines
    if isinstance(value, dict):
        lists = [k for k, v in value.items() if isinstance(v, list)]
        hint = f"; its array(s) {', '.join(map(repr, lists[:5]))} may hold the rows: write them out" if lists else ""
        raise DataError(
            f"{path}: one JSON object (keys {', '.join(map(repr, list(value)[:8]))}), expected a JSON array of "
            f"rows or JSON Lines (one row per line){hint}"
        )


SOURCE = Source(
    name="json",
    claims=lambda entry: base_name(entry).endswith(".json"),
    records=records,
    fingerprint=file_stat,
)
