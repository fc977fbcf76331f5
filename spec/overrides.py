"""`--set key.path=value` overrides, typed through the schema.

The value is read as the schema says the key is: `--set training.steps=100` is an integer,
`--set data.packing=false` a boolean, `--set training.learning_rate=1e-4` a number, and a value
starting with `[` or `{` is a TOML array or inline table (`--set data.train='["a.jsonl", "b.jsonl"]'`).
Path-valued keys are relative to the working directory.
"""

from __future__ import annotations

import difflib
import os
import tomllib

from ftc.spec import schema_walk
from ftc.spec.errors import SpecIssue, format_key_path
from ftc.spec.extends import merge
from ftc.spec.load import MAX_DEPTH, nesting_too_deep
from ftc.spec.paths import resolve_paths


def parse_overrides(texts) -> tuple[list[tuple[tuple, object, str]], list[SpecIssue]]:
    """Each `key.path=value` as (path, typed value, origin text); issues for those that fail."""
    parsed, issues = [], []
    for text in texts:
        origin = f"--set {text}"
        key, sep, raw = text.partition("=")
        key = key.strip()
        if not sep or not key:
            issues.append(SpecIssue(origin, 0, 0, "", "expected KEY=VALUE, e.g. training.learning_rate=1e-4"))
            continue
        path = tuple(key.split("."))
        problem = _unknown_key(path)
        if problem:
            issues.append(SpecIssue(origin, 0, 0, key, problem))
            continue
        value, problem = _typed(schema_walk.node_at(path), raw.strip())
        if problem:
            issues.append(SpecIssue(origin, 0, 0, key, problem))
            continue
        parsed.append((path, value, origin))
    return parsed, issues


def apply_overrides(data: dict, locs: dict, parsed) -> tuple[dict, dict]:
    """Set each override into `data` (tables merge, other values replace), paths resolved
    against the working directory; `locs` records the override as the key's origin."""
    for path, value, origin in parsed:
        nested = value
        for part in reversed(path):
            nested = {part: nested}
        nested = resolve_paths(nested, os.getcwd())
        top_locs = {path[:n]: (origin, 0, 0) for n in range(1, len(path) + 1) if path[:n] not in locs}
        top_locs[path] = (origin, 0, 0)
        data, locs = merge(data, locs, nested, top_locs)
    return data, locs


def _unknown_key(path: tuple) -> str | None:
    if path == ("extends",):
        return "extends cannot be overridden"
    for n in range(len(path)):
        parent = schema_walk.node_at(path[:n])
        if parent is None or parent.get("type") != "object":
            return f"{format_key_path(path[:n])} is not a table"
        keys = [k for k in parent.get("properties", {}) if k != "$schema"]
        if path[n] not in keys:
            where = format_key_path(path[:n]) or "the top level"
            return f"unknown key {path[n]!r} in {where}{did_you_mean(path[n], keys) or home_hint(path[n], path[:n])}"
    return None


def home_hint(key: str, path: tuple) -> str:
    """Where `key`, unknown at `path`, lives when one other table of the schema has it."""
    homes = [p for p, node in schema_walk.object_paths().items() if key in node.get("properties", {}) and p != path]
    return f"; it belongs in [{format_key_path(homes[0])}]" if len(homes) == 1 and homes[0] else ""


def did_you_mean(word: str, choices) -> str:
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _typed(node: dict, raw: str) -> tuple[object, str | None]:
    types = schema_walk.types_of(node)
    if raw[:1] in "[{" and ({"array", "object"} & set(types)):
        if nesting_too_deep(raw, toml=True) is not None:
            return None, f"nested more than {MAX_DEPTH} levels deep"
        try:
            return tomllib.loads(f"v = {raw}")["v"], None
        except (tomllib.TOMLDecodeError, ValueError, RecursionError) as e:  # ValueError: over-long integers
            return None, f"cannot read {raw[:80]!r} as a TOML value: {e}"
    if "boolean" in types and raw.lower() in ("true", "false"):
        return raw.lower() == "true", None
    if "integer" in types:
        try:
            return int(raw), None
        except ValueError:
            pass
        try:  # 8.0 and 1e3 are integers to the schema, in a file as here
            value = float(raw)
            if value.is_integer() and "number" not in types:
                return int(value), None
        except (ValueError, OverflowError):
            pass
    if "number" in types:
        try:
            value = float(raw)
            if value == value and abs(value) != float("inf"):
                return value, None
        except ValueError:
            pass
    if "string" in types:
        return raw, None
    expected = " or ".join(_TYPE_WORDS.get(t, t) for t in types)
    return None, f"expected {expected}, got {raw!r}"


_TYPE_WORDS = {
    "integer": "an integer",
    "number": "a number",
    "boolean": "true or false",
    "string": "a string",
    "array": "a list",
    "object": "a table",
}
