"""The JSON Schema of the spec format: the single source of truth."""

import functools
import json
import pathlib

SCHEMA_PATH = pathlib.Path(__file__).with_name("ftc.schema.json")


@functools.cache
def schema_text() -> str:
    return SCHEMA_PATH.read_text(encoding="utf-8")


def load_schema() -> dict:
    """The spec schema as a dict (a fresh copy: callers may not change the cached one)."""
    return json.loads(schema_text())
