"""jsonl: a file of one JSON value per line (any file no other source kind claims).

Rows are named `path:line` (1-based); blank lines are not rows. A line that is not UTF-8 JSON is
a bad row of its own, so one broken line never hides the rest of the file. Two things are the
file's problem, not a row's, and raise one DataError naming it: a UTF-16 file (its byte-order
mark), and a file not named as JSON (.jsonl, .ndjson, .json) whose first line is not JSON
(plain text, a CSV under another name), which would otherwise be one bad row per line.
`.gz`, `.bz2` and `.xz` files are read decompressed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

from ftc.backends.jax.data.read import BadRow, DataError
from ftc.backends.jax.data.sources import DECOMPRESS_ERRORS, Source, base_name, file_stat, open_bytes

JSON_NAMES = (".jsonl", ".ndjson", ".jsonlines", ".json")
UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")
OTHER_KINDS = (
    "ftc reads .json (an array of rows, or JSON Lines), .parquet, .csv and .tsv (a header row), "
    'a datasets save_to_disk directory; plain text goes in JSON Lines rows {"text": ...}'
)


def records(path: str, data_dir: str | None = None) -> Iterator[tuple[str, Any]]:
    try:
        with open_bytes(path) as f:
            yield from lines(path, f)
    except DECOMPRESS_ERRORS as e:
        raise DataError(f"data source {path!r}: cannot read it ({type(e).__name__}: {e})") from e


def lines(path: str, f) -> Iterator[tuple[str, Any]]:
    """The rows of an open binary file of JSON Lines (json_array.py reads its JSONL through this)."""
    named_json = base_name(path).endswith(JSON_NAMES)
    first = True
    for number, raw in enumerate(f, start=1):
        where = f"{path}:{number}"
        if number == 1 and raw.startswith(UTF16_BOMS):
            raise DataError(f"{where}: the file is UTF-16 (it starts with a UTF-16 byte-order mark), expected UTF-8")
        try:
            line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as e:
            if first and not named_json:
                raise DataError(f"{where}: not UTF-8 text, so not JSON Lines; {OTHER_KINDS}") from None
            first = False
            yield where, BadRow(f"not valid UTF-8 ({e.reason} at byte {e.start}), expected UTF-8 JSON")
            continue
        if not line.strip():
            continue  # blank lines (a trailing newline) are not rows
        try:
            record = json.loads(line.rstrip("\r\n"))  # a column past the end stays on this line
        except json.JSONDecodeError as e:
            if first and not named_json:
                raise DataError(
                    f"{where}: not JSON ({e.msg} at column {e.colno}), so not JSON Lines; {OTHER_KINDS}"
                ) from None
            first = False
            yield where, BadRow(f"invalid JSON ({e.msg} at column {e.colno}), expected one JSON object per line")
            continue
        except (ValueError, RecursionError) as e:  # an integer over 4300 digits; nesting past the stack
            first = False
            yield where, BadRow(f"unreadable JSON ({type(e).__name__}: {str(e)[:100]})")
            continue
        first = False
        if "\\u" in line and (bad := lone_surrogate(record)):
            yield where, BadRow(f"{bad} holds a lone surrogate escape (\\ud800-\\udfff), which is not Unicode text")
            continue
        yield where, record


def lone_surrogate(record: Any) -> str | None:
    """The key path of the first string (or key) holding a lone UTF-16 surrogate, or None."""
    stack = [("row", record)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return path
        elif isinstance(value, dict):
            for k, v in value.items():
                stack += [(f"{path} key {k!r}", k), (f"{path}.{k}", v)]
        elif isinstance(value, list):
            stack += [(f"{path}[{i}]", v) for i, v in enumerate(value)]
    return None


SOURCE = Source(name="jsonl", claims=os.path.isfile, records=records, fingerprint=file_stat)
