"""Paths in a spec are relative to the file that names them; resolve them to absolute paths.

Three kinds (the schema's `x-ftc-path` annotation says which a key is):
- model: a local directory or .gguf file, or a Hugging Face id. A value that exists as a path
  (relative to the spec file) is a path; one that does not and looks like `org/name` (or a bare
  `name`) is an id and stays as written. Write `./models/x` to insist on a local path.
- data: a file or glob; `tfds:name/config:split` stays as written.
- local: always a path.
"""

from __future__ import annotations

import os
import re

from ftc.spec import schema_walk

TFDS_PREFIX = "tfds:"
_HF_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def resolve(kind: str, value: str, base_dir: str) -> str:
    if kind == "data" and value.startswith(TFDS_PREFIX):
        return value
    local = os.path.abspath(os.path.join(base_dir, os.path.expanduser(value)))
    if kind == "model" and not _looks_local(value) and not os.path.exists(local) and _HF_ID.fullmatch(value):
        return value
    return local


def _looks_local(value: str) -> bool:
    return value.startswith(("./", "../", "/", "~")) or value.lower().endswith(".gguf")


def is_hub_id(value: str) -> bool:
    """After resolution: a model reference that is not a local path."""
    return not os.path.isabs(value)


def resolve_paths(data: dict, base_dir: str, prefix: tuple = ()) -> dict:
    """A copy of `data` (one file's, or one override's) with its path-valued keys resolved.
    Values of the wrong type are left alone for the schema check to report."""
    out = {}
    for key, value in data.items():
        node = schema_walk.node_at(prefix + (key,))
        kind = node.get("x-ftc-path") if node else None
        if kind and isinstance(value, str):
            value = resolve(kind, value, base_dir)
        elif kind and isinstance(value, list):
            value = [resolve(kind, v, base_dir) if isinstance(v, str) else v for v in value]
        elif isinstance(value, dict) and node is not None:
            value = resolve_paths(value, base_dir, prefix + (key,))
        out[key] = value
    return out
