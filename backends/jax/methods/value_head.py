"""PPO's value head: a linear map of the policy's final hidden states to one value per position,
trained in the same params tree as the policy, whatever the method.

An objective whose schema entry says `value_head: true` (training.objective = "ppo") gets a
`MethodModel` with `value_head=True`; its module is `WithValueHead(the method's module)`, which
shares that module's scope, so the params tree is the method's own (same paths, LoRA factors, NF4
storage) plus one top-level child

    ftc_value_head/kernel [embed]   (zero at the start: every state's value is 0)
    ftc_value_head/bias   []

and its method record is the method's, `wrap`ped: the head trains for every method (a LoRA run
trains the adapter and the head), its leaves are checkpointed, counted in the plan, zero in a
disabled (reference) tree. It is not part of a causal LM: `strip` drops it before an export.

    logits_BTV, values_BT = module.apply({"params": params}, ids, ..., output="logits_and_values")

Any other `output` is the wrapped module's own (the sampler's "last_logits" with a kv cache).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ftc.backends.jax.methods.contract import Method
from ftc.backends.jax.models.layers import param_with_axes

CHILD = "ftc_value_head"
OUTPUT = "logits_and_values"


class ValueHead(nn.Module):
    """v = h . kernel + bias, in float32 (a regression target: no low-precision rounding)."""

    @nn.compact
    def __call__(self, hidden_BTD: jax.Array) -> jax.Array:
        d = hidden_BTD.shape[-1]
        kernel_D = param_with_axes(self, "kernel", nn.initializers.zeros, (d,), ("embed",), jnp.float32)
        bias = param_with_axes(self, "bias", nn.initializers.zeros, (), (), jnp.float32)
        return hidden_BTD.astype(jnp.float32) @ kernel_D.astype(jnp.float32) + bias.astype(jnp.float32)


class WithValueHead(nn.Module):
    """`inner` (a family's or a method's module) plus a value head on its final hidden states."""

    inner: nn.Module  # not "base": it shares a scope with Intercepted, whose child is named so

    def setup(self):
        nn.share_scope(self, self.inner)  # the inner module's parameter paths stay as they are
        self.head = ValueHead(name=CHILD)

    @property
    def plan(self):
        return getattr(self.inner, "plan", None)

    def __call__(self, *args, output: str = "logits", **kwargs):
        # Init creates the head too (a decode step with a kv cache is never an init of the params).
        if output != OUTPUT and not (self.is_initializing() and kwargs.get("kv_cache") is None):
            return self.inner(*args, output=output, **kwargs)
        # One forward pass gives both (family.py's "logits_and_hidden").
        logits_BTV, hidden_BTD = self.inner(*args, output="logits_and_hidden", **kwargs)
        values_BT = self.head(hidden_BTD)
        if output == OUTPUT:
            return logits_BTV, values_BT
        return hidden_BTD if output == "hidden" else logits_BTV


def is_head(path: str) -> bool:
    return path == CHILD or path.startswith(CHILD + "/")


def without_head(params) -> Any:
    return {k: v for k, v in params.items() if k != CHILD}


def wrap(method: Method) -> Method:
    """`method`'s record for a model with a value head: the head trains, is saved, and its fresh
    leaves are added by `init_params`; everything else is asked of `method`."""

    def transform(family, arch, base, config):
        inner = base if method.transform is None else method.transform(family, arch, base, config)
        return WithValueHead(inner)

    def init_params(module, base_params, rng, *, shardings=None, param_dtype=jnp.float32):
        inner_sh = None if shardings is None else without_head(shardings)
        if method.init_params is None:
            params = dict(nn.unbox(base_params))
        else:
            made = method.init_params(module.inner, base_params, rng, shardings=inner_sh, param_dtype=param_dtype)
            params = dict(made)
        d = _hidden_size(module)
        head = {"kernel": jnp.zeros((d,), param_dtype), "bias": jnp.zeros((), param_dtype)}
        if shardings is not None:
            head = jax.device_put(head, shardings[CHILD])
        params[CHILD] = head
        return params

    def summary(params):
        counts = method.summary(without_head(params))
        extra = sum(x.size for x in jax.tree.leaves(params.get(CHILD, {})))
        return dataclasses.replace(counts, trainable=counts.trainable + extra, total=counts.total + extra)

    return dataclasses.replace(
        method,
        trainable=lambda path: is_head(path) or method.trainable(path),
        detail=lambda model: method.detail(model) + "; a value head (PPO) trains beside it",
        transform=transform,
        init_params=init_params,
        base_params=lambda params: method.base_params(without_head(params)),
        eval_module=lambda module: WithValueHead(method.eval_module(module.inner)),
        summary=None if method.summary is None else summary,
    )


def _hidden_size(module: WithValueHead) -> int:
    """The head's input width, from the abstract init of `module` (no arrays)."""
    ids = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    shapes = jax.eval_shape(lambda i: module.init(jax.random.key(0), i), ids)
    return int(nn.unbox(shapes["params"])[CHILD]["kernel"].shape[0])


def strip(model, params) -> tuple[Any, Any]:
    """(the MethodModel without its value head, `params` without the head's leaves): what an
    export writes (a causal LM has no value head). Unchanged when the model has none."""
    if not getattr(model, "value_head", False):
        return model, params
    return dataclasses.replace(model, value_head=False, module=model.module.inner), without_head(params)
