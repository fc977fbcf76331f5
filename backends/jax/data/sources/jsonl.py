"""jsonl: a file of one JSON value per line (any file no other source kind claims).

Rows are named `path:line` (1-based); blank lines are not rows. A line that is not UTF-8 JSON is
a bad row of its own, so one broken line never hides the rest of the file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

from ftc.backends.jax.data.read import BadRow
from ftc.backends.jax.data.sources import Source, file_stat


def records(path: str, data_dir: str | None = None) -> Iterator[tuple[str, Any]]:
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
                record = json.loads(line.rstrip("\r\n"))  # a column past the end stays on this line
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


SOURCE = Source(name="jsonl", claims=os.path.isfile, records=records, fingerprint=file_stat)
