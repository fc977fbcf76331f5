"""Read training rows from JSONL files or a tfds data source, checking each row's shape.

Sources: a path, a glob, a list of those, or `tfds:name/config:split` (also `tfds:name:split`),
read through `tfds.data_source` (array_record files; TensorFlow is never imported).

Every row keeps where it came from (`Row.where`: `path:line`, or `tfds:name/config:split[index]`)
so every later problem can name it. A row of the wrong shape is a problem
`where: what was wrong, expected what`; with on_bad_row="error" the read raises one `DataError`
listing the first problems, with "skip" the row is left out and counted.

Formats and the normalised `Row.data` each yields (later stages see only these shapes):
- chat: `{"messages": [{"role", "content", optional "weight": 0|1}]}` (OpenAI). Content may be a
  string or a list of `{"type": "text", "text": ...}` parts (joined). Columns of equal length
  (`{"role": [...], "content": [...]}`, how tfds returns a Sequence feature) are read as rows.
  -> `{"messages": [{"role": str, "content": str, "weight"?: int}]}`
- completion: `{"prompt", "completion"}` -> same keys, strings.
- text: `{"text"}` -> same key, string.
- preference: OpenAI `{"input": {"messages"}, "preferred_output": [msg], "non_preferred_output": [msg]}`
  or TRL `{"prompt", "chosen", "rejected"}` with strings or message lists (a missing prompt is the
  messages `chosen` and `rejected` share at the start)
  -> `{"prompt", "chosen", "rejected"}`, all strings or all message lists (a string prompt with
  message responses becomes one user message; string responses one assistant message).
- classification: `{"text", "label"}` with label a string or a non-negative int -> same keys.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from typing import Any, Iterable, Iterator, Sequence

FORMATS = ("chat", "completion", "text", "preference", "classification")
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
    files: tuple[str, ...]          # resolved files (or the tfds source) in reading order
    skipped: tuple[str, ...] = ()   # problems of rows left out under on_bad_row="skip"


class _Bad(Exception):
    """One row's problem; caught per row and turned into a `where: message` line."""


def read_rows(sources: str | Sequence[str], *, format: str, on_bad_row: str = "error",
              tfds_data_dir: str | None = None) -> ReadResult:
    """Every row of every source, in order, normalised for `format` (see module docstring)."""
    if format not in FORMATS:
        raise ValueError(f"data format {format!r} is not one of {', '.join(FORMATS)}")
    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"on_bad_row {on_bad_row!r} is not 'error' or 'skip'")
    normalise = _NORMALISERS[format]
    rows, problems, files = [], [], []
    for name, records in _open_sources(sources, tfds_data_dir):
        files.append(name)
        for where, record in records:
            try:
                if isinstance(record, _Bad):
                    raise record
                rows.append(Row(where, normalise(record)))
            except _Bad as bad:
                problems.append(f"{where}: {bad}")
    if problems and on_bad_row == "error":
        raise DataError(f"{len(problems)} malformed {format} row(s) (set data.on_bad_row = \"skip\" "
                        f"to leave them out)", problems)
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
                yield where, _Bad(f"not valid UTF-8 ({e.reason} at byte {e.start}), expected UTF-8 JSON")
                continue
            if not line.strip():
                continue  # blank lines (a trailing newline) are not rows
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                yield where, _Bad(f"invalid JSON ({e.msg} at column {e.colno}), expected one JSON object per line")


def parse_tfds(source: str) -> tuple[str, str]:
    """`tfds:name/config:split` -> ("name/config", "split")."""
    body = source[len(TFDS_PREFIX):]
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
        raise DataError(f"data source {source!r}: cannot open it through tfds.data_source "
                        f"(prepared with file_format='array_record'?): {type(e).__name__}: {e}") from e
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


# ---------------------------------------------------------------------------- formats

def _kind(value: Any) -> str:
    """'a string', 'an array', ... for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    return {dict: "an object", list: "an array", str: "a string", int: "an integer",
            float: "a number"}.get(type(value), "a " + type(value).__name__)


def _object(record: Any) -> dict:
    if not isinstance(record, dict):
        raise _Bad(f"row is {_kind(record)}, expected a JSON object")
    return record


def _string(obj: dict, key: str, path: str = "") -> str:
    if key not in obj:
        raise _Bad(f"missing key {path + key!r}, expected a string")
    value = obj[key]
    if not isinstance(value, str):
        raise _Bad(f"{path + key!r} is {_kind(value)}, expected a string")
    return value


def _content(value: Any, path: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                       and isinstance(p.get("text"), str) for p in value):
        return "".join(p["text"] for p in value)
    raise _Bad(f"{path!r} is {_kind(value)}, expected a string (or a list of "
               f"{{\"type\": \"text\", \"text\": ...}} parts)")


def _columns_to_rows(value: Any) -> Any:
    """tfds `Sequence({"role", "content"})` features come back as columns of equal length."""
    if (isinstance(value, dict) and value and all(isinstance(v, list) for v in value.values())
            and len({len(v) for v in value.values()}) == 1):
        keys = list(value)
        return [dict(zip(keys, items)) for items in zip(*value.values())]
    return value


def _messages(value: Any, path: str) -> list[dict]:
    value = _columns_to_rows(value)
    if not isinstance(value, list) or not value:
        what = "an empty array" if value == [] else _kind(value)
        raise _Bad(f"{path!r} is {what}, expected a non-empty array of messages")
    out = []
    for i, message in enumerate(value):
        here = f"{path}[{i}]"
        if not isinstance(message, dict):
            raise _Bad(f"{here!r} is {_kind(message)}, expected a message object {{\"role\", \"content\"}}")
        role = _string(message, "role", here + ".")
        if "content" not in message:
            raise _Bad(f"missing key {here + '.content'!r}, expected a string")
        normal = {"role": role, "content": _content(message["content"], here + ".content")}
        if "weight" in message:
            weight = message["weight"]
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight not in (0, 1):
                raise _Bad(f"{here + '.weight'!r} is {json.dumps(weight)}, expected 0 or 1")
            normal["weight"] = int(weight)
        out.append(normal)
    return out


def _chat(record: Any) -> dict:
    record = _object(record)
    if "messages" not in record:
        raise _Bad("missing key 'messages', expected an array of {\"role\", \"content\"} messages")
    return {"messages": _messages(record["messages"], "messages")}


def _completion(record: Any) -> dict:
    record = _object(record)
    return {"prompt": _string(record, "prompt"), "completion": _string(record, "completion")}


def _text(record: Any) -> dict:
    return {"text": _string(_object(record), "text")}


def _classification(record: Any) -> dict:
    record = _object(record)
    text = _string(record, "text")
    if "label" not in record:
        raise _Bad("missing key 'label', expected a string or a non-negative integer")
    label = record["label"]
    if isinstance(label, bool) or not (isinstance(label, str) or isinstance(label, int) and label >= 0):
        raise _Bad(f"'label' is {json.dumps(label)}, expected a string or a non-negative integer")
    return {"text": text, "label": label}


def _str_or_messages(record: dict, key: str) -> str | list[dict]:
    if key not in record:
        raise _Bad(f"missing key {key!r}, expected a string or an array of messages")
    value = record[key]
    return value if isinstance(value, str) else _messages(value, key)


def _preference(record: Any) -> dict:
    record = _object(record)
    if "input" in record or "preferred_output" in record:  # OpenAI preference format
        inp = record.get("input")
        if not isinstance(inp, dict):
            raise _Bad("'input' is " + ("missing" if inp is None else _kind(inp))
                       + ", expected an object {\"messages\": [...]}")
        if "messages" not in inp:
            raise _Bad("missing key 'input.messages', expected an array of messages")
        prompt = _messages(inp["messages"], "input.messages")
        chosen = _messages(record.get("preferred_output"), "preferred_output")
        rejected = _messages(record.get("non_preferred_output"), "non_preferred_output")
    elif "chosen" in record or "rejected" in record:  # TRL
        chosen = _str_or_messages(record, "chosen")
        rejected = _str_or_messages(record, "rejected")
        if "prompt" in record:
            prompt = _str_or_messages(record, "prompt")
        elif isinstance(chosen, list) and isinstance(rejected, list):
            prompt, chosen, rejected = _split_shared_prefix(chosen, rejected)
        else:
            raise _Bad("missing key 'prompt', expected a string or an array of messages "
                       "(it may be left out only when 'chosen' and 'rejected' are message arrays)")
    else:
        raise _Bad("missing keys, expected {\"input\", \"preferred_output\", \"non_preferred_output\"} "
                   "(OpenAI) or {\"prompt\", \"chosen\", \"rejected\"} (TRL)")
    if any(isinstance(v, list) for v in (prompt, chosen, rejected)):
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        chosen, rejected = ([{"role": "assistant", "content": v}] if isinstance(v, str) else v
                            for v in (chosen, rejected))
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _split_shared_prefix(chosen: list[dict], rejected: list[dict]):
    n = 0
    while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
        n += 1
    if n == 0:
        raise _Bad("'chosen' and 'rejected' share no leading messages and there is no 'prompt', "
                   "expected a prompt (shared first messages or a 'prompt' key)")
    return chosen[:n], chosen[n:], rejected[n:]


_NORMALISERS = {"chat": _chat, "completion": _completion, "text": _text,
                "preference": _preference, "classification": _classification}
