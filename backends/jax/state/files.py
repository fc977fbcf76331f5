"""Run-directory files written whole or not at all: a reader (a resumed run, a report, a second
process) never sees half a file, even when the writer is killed midway."""

from __future__ import annotations

import json
import os
from typing import Any


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """`text` into `path` through a temporary file beside it, renamed into place."""
    tmp = f"{os.fspath(path)}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """`data` as indented JSON (and a final newline) into `path`, atomically."""
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")
