"""One way to transform a family's model without editing it: run it under an interceptor.

`Intercepted(base, plan, interceptor)` shares the base module's scope (same parameter paths) and
runs it under `nn.intercept_methods(interceptor(plan, deterministic))`. The interceptor changes
what planned sub-modules compute and creates the method's own weights as children of them, in
the ordinary "params" collection (`<dense>/ftc_lora/...`, `<proj>/ftc_adapter/...`), so the
family's `nn.scan` stacks them per layer and the training core needs no method-specific code.
LoRA, QLoRA (lora.py) and bottleneck adapters (adapter.py) are this wrapper with their own
interceptor.

The tree helpers below work on the nested-dict params trees those methods produce.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn


class Intercepted(nn.Module):
    """`base` under `interceptor(plan, deterministic)`: same call signature, same parameter paths
    plus the children the interceptor creates. `deterministic` turns off training-only noise."""

    base: nn.Module
    plan: Any
    interceptor: Callable[[Any, bool], Callable]
    deterministic: bool = False

    def setup(self):
        nn.share_scope(self, self.base)  # no extra "base/" level in parameter paths

    def __call__(self, *args, **kwargs):
        with nn.intercept_methods(self.interceptor(self.plan, self.deterministic)):
            return self.base(*args, **kwargs)


def deterministic_clone(module: Intercepted) -> Intercepted:
    """The same model without training-only noise: what evaluation, export checks and reference models run."""
    return module.clone(deterministic=True)


# ---------------------------------------------------------------- params trees (nested dicts)


def node(tree: Mapping, path: tuple[str, ...]):
    for name in path:
        tree = tree[name]
    return tree


def set_node(tree: dict, path: tuple[str, ...], value) -> None:
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value


def copy_tree(tree):
    """Fresh dicts all the way down; leaves shared."""
    return {k: copy_tree(v) for k, v in tree.items()} if isinstance(tree, Mapping) else tree


def merge(a: dict, b: dict) -> dict:
    """`a` with `b`'s leaves added (or replacing `a`'s)."""
    out = dict(a)
    for key, value in b.items():
        out[key] = merge(a[key], value) if key in a and isinstance(value, dict) else value
    return out


def without_child(params, child: str) -> Any:
    """`params` without the subtrees named `child` (a method's own weights)."""
    if isinstance(params, Mapping):
        return {k: without_child(v, child) for k, v in params.items() if k != child}
    return params


def only_child(tree, child: str) -> dict:
    """Only the subtrees named `child` (and the path down to them)."""
    out = {}
    for key, value in tree.items():
        if key == child:
            out[key] = value
        elif isinstance(value, dict):
            sub = only_child(value, child)
            if sub:
                out[key] = sub
    return out


def layer_count(sites) -> int:
    """Layers a method's sites span (a scanned stack's site names one HF module per layer)."""
    return max((len(s.hf_modules) for s in sites), default=0)
