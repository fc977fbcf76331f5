"""Reading the spec schema: which keys exist where, their defaults and conditions.

Besides standard JSON Schema the schema carries three annotations (unknown keywords, which
validators and editors ignore):
- `x-ftc-when: {sibling: [values]}` on a key: the key applies only when every named sibling
  has one of the values (`method.rank` only for lora/qlora). Its default is filled only then,
  and setting it otherwise is an error.
- `x-ftc-default-from: sibling`: the default is the sibling's value (micro_batch_size).
- `x-ftc-path: model|data|local`: the string is a path relative to the spec file (see paths.py).
- `x-ftc-starter: value`: what `ftc init`'s starter spec writes where the default would not lint
  (an RL objective's rewards).
Pairs of exclusive keys are plain JSON Schema: `allOf: [{not: {required: [a, b]}}]`.
What the schema says of each method kind, objective and format (`x-ftc-kinds`,
`x-ftc-objectives`, `x-ftc-comments`, `x-ftc-comment`) is read by choices.py.
"""

from __future__ import annotations

import functools
import json

from ftc.schemas import schema_text


@functools.cache
def schema() -> dict:
    # Shared and cached: never mutate it.
    return json.loads(schema_text())


def node_at(path: tuple) -> dict | None:
    """The schema of the value at `path` (keys only; list indices step into `items`)."""
    node = schema()
    for part in path:
        if isinstance(part, int):
            node = array_items(node)
        else:
            node = node.get("properties", {}).get(part) if node.get("type") == "object" else None
        if node is None:
            return None
    return node


def array_items(node: dict) -> dict | None:
    if node.get("type") == "array":
        return resolved(node.get("items"))
    for branch in node.get("anyOf", ()):
        if branch.get("type") == "array":
            return resolved(branch.get("items"))
    return None


def resolved(node: dict | None) -> dict | None:
    """`node`, or the `$defs` entry its local `$ref` ("#/$defs/NAME") names: one definition shared
    by several keys (the RL objectives' reward items)."""
    ref = (node or {}).get("$ref", "")
    return schema()["$defs"][ref.rsplit("/", 1)[-1]] if ref.startswith("#/$defs/") else node


def exclusive_pairs(node: dict) -> list[tuple[str, ...]]:
    pairs = []
    for sub in node.get("allOf", ()):
        required = sub.get("not", {}).get("required")
        if required:
            pairs.append(tuple(required))
    return pairs


def object_paths(node: dict | None = None, prefix: tuple = ()) -> dict[tuple, dict]:
    """Every object (section or inline table) in the schema by path, the root as ()."""
    node = schema() if node is None else node
    out = {prefix: node}
    for key, child in node.get("properties", {}).items():
        if child.get("type") == "object":
            out.update(object_paths(child, prefix + (key,)))
    return out


def types_of(node: dict) -> list[str]:
    """JSON types a value may have at this node."""
    if "type" in node:
        return [node["type"]] if isinstance(node["type"], str) else list(node["type"])
    out = []
    for branch in [*node.get("anyOf", ()), *node.get("oneOf", ())]:
        out += [t for t in types_of(branch) if t not in out]
    return out


def applies(node: dict, siblings: dict) -> bool:
    """Whether a key with this schema applies given its (default-filled) siblings."""
    when = node.get("x-ftc-when")
    return not when or all(siblings.get(k) in allowed for k, allowed in when.items())


def integral_ints(value, node: dict | None = None):
    """`value` (a spec dict by default from the root) with each integral float at a key the schema
    types integer made an int: JSON Schema accepts 8.0 as an integer, the Spec holds 8, and the
    rules that compare integers (batch_size a multiple of micro_batch_size, warmup within steps)
    had skipped 8.0 as not an int."""
    node = resolved(schema() if node is None else node)
    if node is None:
        return value
    if isinstance(value, dict):
        props = node.get("properties", {})
        return {key: integral_ints(child, props.get(key)) for key, child in value.items()}
    if isinstance(value, list):
        items = array_items(node)
        return [integral_ints(child, items) for child in value] if items else value
    types = types_of(node)
    if isinstance(value, float) and value.is_integer() and "integer" in types and "number" not in types:
        return int(value)
    return value
