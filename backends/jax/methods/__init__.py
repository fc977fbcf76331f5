"""Methods: what trains, as a transformation of the model. The registry of method kinds.

Each kind's module defines one `METHOD = contract.Method(...)`; `get(kind)` imports it on first
use, so importing this package imports no jax. Adding a method: a module in this package with
its `METHOD`, one line in MODULES, and its kind (and keys) in schemas/ftc.schema.json's `method`.
"""

from __future__ import annotations

import importlib

MODULES = {  # kind -> the module that defines its METHOD; the schema's method.kind enum, in order
    "full": "ftc.backends.jax.methods.full",
    "lora": "ftc.backends.jax.methods.lora",
    "qlora": "ftc.backends.jax.methods.qlora",
    "adapter": "ftc.backends.jax.methods.adapter",
    "probe": "ftc.backends.jax.methods.probe",
}


def kinds() -> tuple[str, ...]:
    return tuple(MODULES)


def get(kind: str):
    """The `contract.Method` record of `kind`."""
    module = MODULES.get(kind)
    if module is None:
        raise ValueError(f"method.kind={kind!r}: expected one of {', '.join(MODULES)}")
    return importlib.import_module(module).METHOD
