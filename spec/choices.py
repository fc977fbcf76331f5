"""What the schema says of each method kind, objective, data format and export format: the
registry that `ftc init`, the CLI's choices and the semantic checks read (no lists of their own).

The choices are the schema's enums; per-choice facts are annotations on the enum's key:
- `method.kind` `x-ftc-kinds: {kind: {...}}`: `comment` (what it trains, for `ftc init`),
  `learning_rate` (the starter spec's), `export_formats` (those it writes, the starter's first),
  `starter_keys` (its keys the starter spec shows), and only where they restrict:
  `objectives` (the only ones it trains) with `objectives_why`, and `single_process` (why it runs
  in one process).
- `training.objective` `x-ftc-objectives: {objective: {...}}`: `data_formats` (those it trains
  on, the starter's first), `starter_base` / `starter_max_seq_len` (the starter's, when not the
  usual causal LM).
- `x-ftc-comments: {value: comment}` on `data.format` and `export.format`, and `x-ftc-comment` on
  a key: the starter spec's line comments.
"""

from __future__ import annotations

from ftc.spec import schema_walk


def _node(*path: str) -> dict:
    return schema_walk.node_at(path)


def method_kinds() -> tuple[str, ...]:
    return tuple(_node("method", "kind")["enum"])


def method_info(kind: str) -> dict:
    """The schema's facts on method.kind `kind` (empty for a kind it does not know)."""
    return _node("method", "kind").get("x-ftc-kinds", {}).get(kind, {})


def objectives() -> tuple[str, ...]:
    return tuple(_node("training", "objective")["enum"])


def objective_info(objective: str) -> dict:
    return _node("training", "objective").get("x-ftc-objectives", {}).get(objective, {})


def objectives_for(kind: str) -> tuple[str, ...]:
    """The objectives a method kind trains, the first its starter's."""
    return tuple(method_info(kind).get("objectives", objectives()))


def data_formats() -> tuple[str, ...]:
    return tuple(_node("data", "format")["enum"])


def data_formats_for(objective: str) -> tuple[str, ...]:
    return tuple(objective_info(objective).get("data_formats", ()))


def export_formats() -> tuple[str, ...]:
    return tuple(_node("export", "format")["enum"])


def export_formats_for(kind: str) -> tuple[str, ...]:
    """The export formats a method kind writes, the first its starter's."""
    return tuple(method_info(kind).get("export_formats", ()))


def default(*path: str):
    return _node(*path)["default"]


def comment(path: tuple[str, ...], value: str | None = None) -> str:
    """The starter's line comment for the key at `path` (for `value` of an enum key), or ""."""
    node = _node(*path)
    if value is not None:
        return node.get("x-ftc-comments", {}).get(value, "")
    return node.get("x-ftc-comment", "")
