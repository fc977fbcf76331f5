"""Read training rows from their sources, checking each row's shape.

Sources (data/sources/, one module per kind): a path, a glob, a list of those; JSONL files,
JSON array files, CSV/TSV files (each also .gz/.bz2/.xz), Parquet files, directories written by
`datasets`' save_to_disk, `tfds:name/config:split` and `hf:NAME[:SPLIT]` (the local Hugging Face
datasets cache). Nothing is downloaded.

Every row keeps where it came from (`Row.where`: `path:line`, `path[i] (line n)`, `path[i]`,
`tfds:name:split[i]`)
so every later problem can name it. A row of the wrong shape is a problem
`where: what was wrong, expected what`; with on_bad_row="error" the read raises one `DataError`
listing the first problems, with "skip" the row is left out and counted.

Each format's normalised `Row.data` (what later stages see) is described in its module under
data/formats/; the checks they share (an object, a string, a list of messages) are here.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from ftc.backends.jax.data import formats
from ftc.backends.jax.data import sources as data_sources

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
    where: str  # "path:line", "path[i]" or "tfds:name/config:split[i]"
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
                shape = str(bad).startswith("missing key")  # not a wrong value: a row of another shape
                hint = _fits_other_formats(record, format) if shape and len(problems) < MAX_LISTED else ""
                problems.append(f"{where}: {bad}{hint}")
    if problems and on_bad_row == "error":
        raise DataError(
            f'{len(problems)} malformed {format} row(s) (set data.on_bad_row = "skip" to leave them out)', problems
        )
    if not rows and not problems:
        raise DataError(f"{', '.join(files)}: no rows (empty)")
    return ReadResult(tuple(rows), tuple(files), tuple(problems))


def _fits_other_formats(record: Any, format: str) -> str:
    """' (it reads as data.format = 'sharegpt')' for a row another format takes: the usual cause of
    a missing key is a spec naming the wrong format, or a file mixing two."""
    if not isinstance(record, dict):
        return ""
    fits = []
    for name in formats.names():
        if name != format:
            try:
                formats.get(name).normalise(record)
            except BadRow:
                continue
            fits.append(name)
    return f" (it reads as data.format = {' or '.join(map(repr, fits))})" if fits else ""


# ---------------------------------------------------------------------------- sources


def resolve_sources(sources: str | Sequence[str]) -> list[str]:
    """Files (sorted within each glob), dataset directories and named sources (`tfds:`, `hf:`)
    named by `sources`, in order (data/sources/)."""
    return data_sources.resolve(sources, DataError)


def _open_sources(sources, tfds_data_dir) -> Iterator[tuple[str, Iterable[tuple[str, Any]]]]:
    for entry in resolve_sources(sources):
        yield entry, data_sources.source_for(entry).records(entry, tfds_data_dir)


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
        bare = isinstance(record, list) and record and all(isinstance(m, dict) and "role" in m for m in record)
        hint = ' (a bare list of messages: write {"messages": [...]})' if bare else ""
        raise BadRow(f"row is {kind_of(record)}, expected a JSON object{hint}")
    return record


def json_text(value: Any, path: str) -> Any:
    """A list written as JSON text (a CSV cell, a Parquet string column) read as the list: a
    string is never a list of messages, so reading it as JSON only turns an error into the rows."""
    if not (isinstance(value, str) and value.lstrip().startswith("[")):
        return value
    try:
        return json.loads(value)
    except (ValueError, RecursionError):
        raise BadRow(f"{path!r} is a string that is not a JSON array, expected an array of messages") from None


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
    if isinstance(value, list) and all(isinstance(p, dict) for p in value):
        for i, part in enumerate(value):
            if part.get("type") != "text":
                raise BadRow(
                    f'{path + f"[{i}].type"!r} is {json.dumps(part.get("type"))}, expected "text" '
                    "(ftc trains on text only)"
                )
            if not isinstance(part.get("text"), str):
                raise BadRow(f"{path + f'[{i}].text'!r} is {kind_of(part.get('text'))}, expected a string")
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
    value = columns_to_rows(json_text(value, path))
    if not isinstance(value, list) or not value:
        what = "an empty array" if value == [] else kind_of(value)
        raise BadRow(f"{path!r} is {what}, expected a non-empty array of messages")
    out = []
    for i, message in enumerate(value):
        here = f"{path}[{i}]"
        if not isinstance(message, dict):
            raise BadRow(f'{here!r} is {kind_of(message)}, expected a message object {{"role", "content"}}')
        role = expect_string(message, "role", here + ".")
        calls = expect_tool_calls(message.get("tool_calls"), here + ".tool_calls")
        if calls and message.get("content") is None:  # OpenAI: an assistant turn that only calls tools
            content = ""
        elif "content" not in message:
            raise BadRow(f"missing key {here + '.content'!r}, expected a string")
        else:
            content = expect_content(message["content"], here + ".content")
        normal = {"role": role, "content": content}
        if calls:
            normal["tool_calls"] = calls
        for key in TOOL_KEYS:  # which call a tool message answers; templates write them
            if isinstance(message.get(key), str):
                normal[key] = message[key]
        if "weight" in message:
            normal["weight"] = expect_weight(message["weight"], here + ".weight")
        out.append(normal)
    return out


TOOL_KEYS = ("tool_call_id", "name")


def expect_tool_calls(value: Any, path: str) -> list[dict]:
    """OpenAI's `tool_calls` ([{"type": "function", "function": {"name", "arguments"}}]) as chat
    templates take them: `arguments` an object (OpenAI writes it as a JSON string)."""
    if value is None or value == []:
        return []
    if not isinstance(value, list):
        raise BadRow(f"{path!r} is {kind_of(value)}, expected an array of tool calls")
    calls = []
    for i, call in enumerate(value):
        here = f"{path}[{i}]"
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict):
            raise BadRow(f'{here + ".function"!r} is {kind_of(function)}, expected {{"name", "arguments"}}')
        name = expect_string(function, "name", here + ".function.")
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except (ValueError, RecursionError):
                raise BadRow(
                    f"{here + '.function.arguments'!r} is a string that is not JSON, expected a JSON object"
                ) from None
        if not isinstance(arguments, dict):
            raise BadRow(f"{here + '.function.arguments'!r} is {kind_of(arguments)}, expected a JSON object")
        calls.append({**call, "type": call.get("type", "function"), "function": {"name": name, "arguments": arguments}})
    return calls


def expect_weight(weight: Any, path: str) -> int:
    """A message's loss weight: 0 or 1."""
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight not in (0, 1):
        raise BadRow(f"{path!r} is {json.dumps(weight)}, expected 0 or 1")
    return int(weight)
