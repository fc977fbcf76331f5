"""Method configs for tests that build them by hand: the keys a test sets, the rest as spec
validation fills them (the schema's defaults, which are the only defaults a config has)."""

from __future__ import annotations

from ftc.spec import schema_walk
from ftc.spec.model import MethodSpec, build
from ftc.spec.validate import fill_defaults


def method_spec(kind: str, **keys) -> MethodSpec:
    """The resolved spec's MethodSpec for `[method] kind = ...` with `keys` set."""
    return build(MethodSpec, fill_defaults({"kind": kind, **keys}, schema_walk.node_at(("method",)), ("method",)))


def config(cls, kind: str, **keys):
    """`cls.from_spec(method_spec(kind, **keys))`, e.g. config(lora.LoraConfig, "lora", rank=4)."""
    return cls.from_spec(method_spec(kind, **keys))
