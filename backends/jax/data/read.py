"""Read training rows from JSONL files or a tfds data source, checking each row's shape.

Sources: a path, a glob, a list of those, or `tfds:name/config:split` (also `tfds:name:split`),
read through `tfds.data_source` (array_record files; TensorFlow is never imported).

Every row keeps where it came from (`Row.where`: `path:line`, or `tfds:name/config:split[index]`)
so every later problem can name it. A row of the wrong shape is a problem
`where: what was wrong, expected what`; with on_bad_row="error" the read raises one `DataError`
listing the first problems, with "skip" the row is left out and counted.

Each format's normalised `Row.data` (what later stages see) is described in its module under
data/formats/; the checks they share (an object, a string, a list of messages) are here.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from ftc.backends.jax.data import formats

TFDS_PREFIX = "tfds:"
MAX_LISTED = 20  # problems quoted in one DataError; the rest are counted


class DataError(ValueError):
    """Data that cannot be used as the spec says; `problems` are `where: what` lines."""

    def __init__(self, summary: str, problems: Sequence[str] = ()):
        self.summary = summary
        self.problems = tuple(problems)
        lines = [summary] + ["  " + p for p in self.problems[:MAX_LISTED]]
        if len(self.problems) > MAX_LISTED:
            lines.append(f"  ... and {len(self.problems) - MAX_LISTED} more")
        super().__init__("\n".join(lines))


@dataclasses.dataclass(frozen=True)
class Row:
    where: str  # "path:line" or "tfds:name/config:split[i]"
    data: dict


@dataclasses.dataclass(frozen=True)
class ReadResult:
    rows: tuple[Row, ...]
    files: tuple[str, ...]  # resolved files (or the tfds source) in reading order
    skipped: tuple[str, ...] = ()  # problems of rows left out under on_bad_row="skip"


class BadRow(Exception):
    """One row's problem; caught per row and turned into a `where: message` line."""


def read_rows(
    sources: str | Sequence[str], *, format: str, on_bad_row: str, tfds_data_dir: str | None = None
) -> ReadResult:
    """Every row of every source, in order, normalised by `format`'s module (data/formats/)."""
    normalise = formats.get(format).normalise
    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"on_bad_row {on_bad_row!r} is not 'error' or 'skip'")
    rows, problems, files = [], [], []
    for name, records in _open_sources(sources, tfds_data_dir):
        files.append(name)
        for where, record in records:
            try:
                if isinstance(record, BadRow):
                    raise record
                rows.append(Row(where, normalise(record)))
            except BadRow as bad:
                problems.append(f"{where}: {bad}")
    if problems and on_bad_row == "error":
        raise DataError(
            f'{len(problems)} malformed {format} row(s) (set data.on_bad_row = "skip" to leave them out)', problems
        )
    if not rows and not problems:
        raise DataError(f"{', '.join(files)}: no rows (empty)")
    return ReadResult(tuple(rows), tuple(files), tuple(problems))


# ---------------------------------------------------------------------------- sources


def resolve_sources(sources: str | Sequence[str]) -> list[str]:
    """Files (sorted within each glob) and tfds sources named by `sources`, in order."""
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    out = []
    for source in sources:
        source = os.fspath(source)
        if source.startswith(TFDS_PREFIX):
            out.append(source)
            continue
        path = os.path.expanduser(source)
        if glob.has_magic(path):
            matches = sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p))
            if not matches:
                raise DataError(f"data source {source!r}: no files match this glob")
            out.extend(matches)
        elif os.path.isfile(path):
            out.append(path)
        else:
            raise DataError(f"data source {source!r}: no such file")
    if not out:
        raise DataError("no data sources given")
    return out


def _open_sources(sources, tfds_data_dir) -> Iterator[tuple[str, Iterable[tuple[str, Any]]]]:
    for source in resolve_sources(sources):
        if source.startswith(TFDS_PREFIX):
            yield source, _tfds_records(source, tfds_data_dir)
        else:
            yield source, _jsonl_records(source)


def _jsonl_records(path: str) -> Iterator[tuple[str, Any]]:
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as e:
                yield where, BadRow(f"not valid UTF-8 ({e.reason} at byte {e.start}), expected UTF-8 JSON")
                continue
            if not line.strip():
                continue  # blank lines (a trailing newline) are not rows
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                yield where, BadRow(f"invalid JSON ({e.msg} at column {e.colno}), expected one JSON object per line")
                continue
            except (ValueError, RecursionError) as e:  # an integer over 4300 digits; nesting past the stack
                yield where, BadRow(f"unreadable JSON ({type(e).__name__}: {str(e)[:100]})")
                continue
            if "\\u" in line and (bad := _lone_surrogate(record)):
                yield where, BadRow(f"{bad} holds a lone surrogate escape (\\ud800-\\udfff), which is not Unicode text")
                continue
            yield where, record


def _lone_surrogate(record: Any) -> str | None:
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


def parse_tfds(source: str) -> tuple[str, str]:
    """`tfds:name/config:split` -> ("name/config", "split")."""
    body = source[len(TFDS_PREFIX) :]
    name, sep, split = body.rpartition(":")
    if not sep or not name or not split:
        raise DataError(f"data source {source!r}: expected tfds:name/config:split (or tfds:name:split)")
    return name, split


def _tfds_records(source: str, data_dir: str | None) -> Iterator[tuple[str, Any]]:
    import tensorflow_datasets as tfds  # lazy: JSONL users never pay for it

    name, split = parse_tfds(source)
    try:
        data = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception as e:  # tfds raises many kinds for a missing/unprepared dataset
        raise DataError(
            f"data source {source!r}: cannot open it through tfds.data_source "
            f"(prepared with file_format='array_record'?): {type(e).__name__}: {e}"
        ) from e
    for i in range(len(data)):
        yield f"{source}[{i}]", _from_tfds(data[i])


def _from_tfds(value: Any) -> Any:
    """tfds features come back as bytes and numpy; rows are checked as JSON values."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, dict):
        return {k: _from_tfds(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_from_tfds(v) for v in value]
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        return _from_tfds(value.tolist())
    return value


# ---------------------------------------------------------------------------- row checks the formats share


def kind_of(value: Any) -> str:
    """'a string', 'an array', ... for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    return {dict: "an object", list: "an array", str: "a string", int: "an integer", float: "a number"}.get(
        type(value), "a " + type(value).__name__
    )


def expect_object(record: Any) -> dict:
    if not isinstance(record, dict):
        raise BadRow(f"row is {kind_of(record)}, expected a JSON object")
    return record


def expect_string(obj: dict, key: str, path: str = "") -> str:
    if key not in obj:
        raise BadRow(f"missing key {path + key!r}, expected a string")
    value = obj[key]
    if not isinstance(value, str):
        raise BadRow(f"{path + key!r} is {kind_of(value)}, expected a string")
    return value


def expect_content(value: Any, path: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in value
    ):
        return "".join(p["text"] for p in value)
    raise BadRow(
        f'{path!r} is {kind_of(value)}, expected a string (or a list of {{"type": "text", "text": ...}} parts)'
    )


def columns_to_rows(value: Any) -> Any:
    """tfds `Sequence({"role", "content"})` features come back as columns of equal length."""
    if (
        isinstance(value, dict)
        and value
        and all(isinstance(v, list) for v in value.values())
        and len({len(v) for v in value.values()}) == 1
    ):
        keys = list(value)
        return [dict(zip(keys, items)) for items in zip(*value.values())]
    return value


def expect_messages(value: Any, path: str) -> list[dict]:
    value = columns_to_rows(value)
    if not isinstance(value, list) or not value:
        what = "an empty array" if value == [] else kind_of(value)
        raise BadRow(f"{path!r} is {what}, expected a non-empty array of messages")
    out = []
    for i, message in enumerate(value):
        here = f"{path}[{i}]"
        if not isinstance(message, dict):
            raise BadRow(f'{here!r} is {kind_of(message)}, expected a message object {{"role", "content"}}')
        role = expect_string(message, "role", here + ".")
        if "content" not in message:
            raise BadRow(f"missing key {here + '.content'!r}, expected a string")
        normal = {"role": role, "content": expect_content(message["content"], here + ".content")}
        if "weight" in message:
            weight = message["weight"]
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight not in (0, 1):
                raise BadRow(f"{here + '.weight'!r} is {json.dumps(weight)}, expected 0 or 1")
            normal["weight"] = int(weight)
        out.append(normal)
    return out
