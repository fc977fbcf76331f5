"""The keys in which resolved specs differ (`ftc diff`, and the table of a report over several runs).

A side is a spec file (TOML/JSON, resolved as `ftc run` would: extends, defaults, paths made
absolute) or a run directory (its spec.resolved.json: what actually ran).
"""

from __future__ import annotations

import json
import os
import unicodedata
from collections.abc import Sequence
from typing import Any

from ftc.report.rundir import RESOLVED_SPEC, ReportError, is_run_dir

ABSENT = object()  # a key one side does not have (it does not apply there, or has no default)


def resolved_spec(path: str | os.PathLike) -> dict:
    """The resolved spec of a spec file or a run directory. Raises ReportError (one line)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        if not is_run_dir(path):
            raise ReportError(f"{path}: not a run directory of `ftc run` (no {RESOLVED_SPEC}) and not a spec file")
        full = os.path.join(path, RESOLVED_SPEC)
        if not os.path.isfile(full):
            raise ReportError(f"{path}: the run has no {RESOLVED_SPEC} yet")
        try:
            with open(full, encoding="utf-8") as f:
                spec = json.load(f)
        except (OSError, ValueError, RecursionError) as e:  # ValueError: bad JSON or UTF-8, 4300+ digits
            why = "nested too deeply" if isinstance(e, RecursionError) else e  # json's decoder recurses
            raise ReportError(f"{full}: not readable as JSON ({why})") from None
        if not isinstance(spec, dict):
            raise ReportError(f"{full}: expected a JSON object, found {type(spec).__name__}")
        return spec
    if not os.path.exists(path):
        raise ReportError(f"{path}: no such spec file or run directory")
    from ftc.spec import SpecError, load_spec

    try:
        return load_spec(path).to_dict()
    except SpecError as e:
        # An extends chain that cannot be followed is the cause of the keys then missing: named first.
        errors = sorted((i for i in e.issues if i.severity == "error"), key=lambda i: i.key_path != "extends")
        first = errors[0] if errors else None
        where = f"{first.file}:{first.line}:{first.col}" if first and first.line else (first.file if first else path)
        what = f"{first.key_path + ': ' if first.key_path else ''}{first.message}" if first else str(e)
        more = f" (and {len(errors) - 1} more: ftc lint {path})" if len(errors) > 1 else ""
        raise ReportError(f"{where}: {what}{more}") from None


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{"a.b.c": leaf}: objects are walked, lists and scalars are leaves."""
    if not isinstance(tree, dict) or (prefix and not tree):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def differing(specs: Sequence[dict]) -> list[tuple[str, tuple[Any, ...]]]:
    """(key path, the value in each spec or ABSENT) for every key whose values are not all equal,
    in the first spec's key order, then keys only later specs have."""
    flat = [flatten(s) for s in specs]
    keys = list(dict.fromkeys(k for f in flat for k in f))
    rows = []
    for key in keys:
        values = tuple(f.get(key, ABSENT) for f in flat)
        if any(v is ABSENT for v in values) or any(v != values[0] for v in values[1:]):
            rows.append((key, values))
    return rows


def show(value: Any) -> str:
    if value is ABSENT:
        return "(not set)"
    if isinstance(value, str):
        return value
    return json.dumps(value)


def columns(text: str) -> int:
    """Terminal columns `text` takes: CJK and full-width characters take two (len() counted one,
    so a Japanese description pushed the next column out of line)."""
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def format_table(names: Sequence[str], rows: Sequence[tuple[str, tuple[Any, ...]]], width: int = 60) -> str:
    """A plain-text table: key, then one column per side; long values are cut with '...'."""

    def plain(text: str) -> str:
        # A newline in a value (a multi-line description) broke the table's rows; escapes from a
        # spec are not the terminal's to act on: control characters are shown escaped, as JSON does.
        if any(ord(c) < 32 or ord(c) == 127 for c in text):
            return json.dumps(text, ensure_ascii=False)[1:-1]
        return text

    def cut(text: str) -> str:
        text = plain(text)
        if columns(text) <= width:
            return text
        used, end = 0, 0
        for end, c in enumerate(text):  # noqa: B007 - `end` is where the room runs out
            used += columns(c)
            if used > width - 3:
                break
        return text[:end] + "..."

    table = [("key", *names)] + [(plain(key), *(cut(show(v)) for v in values)) for key, values in rows]
    widths = [max(columns(r[i]) for r in table) for i in range(len(table[0]))]
    lines = ["  ".join(cell + " " * (w - columns(cell)) for cell, w in zip(r, widths)).rstrip() for r in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
