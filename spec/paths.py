"""Paths in a spec are relative to the file that names them; resolve them to absolute paths.

Three kinds (the schema's `x-ftc-path` annotation says which a key is):
- model: a local directory or .gguf file, `package:IMPORT_NAME/rel/path`, or a Hugging Face id
  (`org/name`, `org/name@revision`, `org/name/file.gguf`). `package:` stays as written; a value
  that exists as a path (relative to the spec file) is a path; one that does not and looks like
  an id stays as written. Write `./models/x` to insist on a local path.
- data: a file, glob or directory; `tfds:name/config:split` and `hf:NAME[:SPLIT]` stay as written.
- local: always a path.
"""

from __future__ import annotations

import os
import re

from ftc.spec import schema_walk

TFDS_PREFIX = "tfds:"
# Data sources that name a dataset rather than a path (backends/jax/data/sources/ reads them).
NAMED_DATA_PREFIXES = (TFDS_PREFIX, "hf:")
PACKAGE_PREFIX = "package:"
# The forms backends/jax/model_source.py accepts as Hugging Face ids (kept in step with it; not
# imported from there because spec/ must not import the JAX backend package).
_HF_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(?:@[\w./-]+?)?(?:/[^@]+\.gguf)?")


def resolve(kind: str, value: str, base_dir: str) -> str:
    if not value.strip():
        return value  # not the spec's own directory: an empty path is refused by the schema
    if kind == "data" and value.startswith(NAMED_DATA_PREFIXES):
        return value
    if kind == "model" and value.startswith(PACKAGE_PREFIX):
        return value
    local = os.path.abspath(os.path.join(base_dir, os.path.expanduser(value)))
    if (
        kind == "model"
        and not value.startswith(("./", "../", "/", "~"))
        and not os.path.exists(local)
        and _HF_ID.fullmatch(value)
    ):
        return value
    return local


def is_hub_id(value: str) -> bool:
    """After resolution: a model reference that is a Hugging Face id (not a path, not package:)."""
    return not os.path.isabs(value) and not value.startswith(PACKAGE_PREFIX)


def package_problem(value: str) -> str | None:
    """Why a `package:NAME/rel/path` source cannot be found, without importing the package."""
    import importlib.util

    name, _, rel = value[len(PACKAGE_PREFIX) :].partition("/")
    if not name.isidentifier():
        return f"expected 'package:IMPORT_NAME/relative/path', got {value!r}"
    found = importlib.util.find_spec(name)  # a top-level name: reads the import path, runs no code
    if found is None:
        return f"no installed Python package {name!r}"
    roots = found.submodule_search_locations or []
    if not any(os.path.exists(os.path.join(root, rel)) for root in roots):
        return f"{rel!r} not found in package {name!r}"
    return None


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
        elif isinstance(value, list) and node is not None and schema_walk.array_items(node):
            # arrays of inline tables (training.grpo_rewards): their path-valued keys too
            value = [
                resolve_paths(v, base_dir, prefix + (key, i)) if isinstance(v, dict) else v for i, v in enumerate(value)
            ]
        elif isinstance(value, dict) and node is not None:
            value = resolve_paths(value, base_dir, prefix + (key,))
        out[key] = value
    return out
