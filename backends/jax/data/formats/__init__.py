"""Data formats: one module per `data.format` value, each defining `FORMAT = Format(...)` (base.py).

Adding a format is a module here, one line in FORMAT_MODULES and the value in the schema's
`data.format` enum (schemas/ftc.schema.json). Modules are imported when first asked for; a name
without a leading dot is an absolute module name.
"""

from __future__ import annotations

import importlib

from ftc.backends.jax.data.formats.base import Format

FORMAT_MODULES = {
    "chat": ".chat",
    "completion": ".completion",
    "text": ".text",
    "preference": ".preference",
    "classification": ".classification",
    "sharegpt": ".sharegpt",
    "alpaca": ".alpaca",
}


def names() -> tuple[str, ...]:
    return tuple(FORMAT_MODULES)


def get(name: str) -> Format:
    """The Format registered as `name`, or a ValueError naming the registered ones."""
    if name not in FORMAT_MODULES:
        raise ValueError(f"data format {name!r} is not one of {', '.join(FORMAT_MODULES)}")
    return importlib.import_module(FORMAT_MODULES[name], __name__).FORMAT
