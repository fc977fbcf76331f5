"""Optimizer and learning-rate schedule from a Plan (optax).

Frozen parameters never reach the optimizer: the train step differentiates and updates only
the trainable subtree (frozen leaves are None there, see `split_params`), so they get neither
gradients nor optimizer state, and stay bitwise unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from ftc.backends.jax.models.shapes import path_str
from ftc.compiler.plan import resolve_warmup


def make_schedule(schedule, total_steps: int) -> optax.Schedule:
    """`schedule` is a compiler.plan.SchedulePlan. Warmup rises linearly from 0 to the peak over
    the warmup steps; then constant, linear or cosine decay to peak * min_lr_ratio at
    `total_steps`. The value at step s is the rate of the s-th update (0-based)."""
    if total_steps < 1:
        raise ValueError(f"total steps must be >= 1, got {total_steps}")
    peak = float(schedule.learning_rate)
    warmup = min(int(resolve_warmup(schedule.warmup_steps, schedule.warmup_ratio, total_steps)), total_steps)
    end = peak * float(schedule.min_lr_ratio)
    decay_steps = max(total_steps - warmup, 1)
    if schedule.kind == "constant":
        after = optax.constant_schedule(peak)
    elif schedule.kind == "linear":
        after = optax.linear_schedule(peak, end, decay_steps)
    elif schedule.kind == "cosine":
        after = optax.cosine_decay_schedule(peak, decay_steps, alpha=float(schedule.min_lr_ratio))
    else:
        raise ValueError(f"training.schedule.kind={schedule.kind!r}: expected constant, linear or cosine")
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def decay_mask(params: Any, axes_by_path: dict[str, tuple]) -> Any:
    """True where weight decay applies: every parameter except biases and norm weights (as
    Hugging Face's Trainer does). `params` may hold None (frozen) leaves."""

    def one(path, leaf):
        name = path_str(path)
        axes = axes_by_path.get(name, ())
        return not (name.split("/")[-1] == "bias" or "norm" in axes)

    return jax.tree_util.tree_map_with_path(one, params)


def make_optimizer(
    opt, schedule: optax.Schedule, axes_by_path: dict[str, tuple] | None = None
) -> optax.GradientTransformation:
    """`opt` is a compiler.plan.OptimizerPlan (or the spec's OptimizerSpec), its values as the
    resolved spec gives them (the schema holds the defaults). Gradient clipping by global norm
    comes first (grad_clip 0 = off)."""
    axes_by_path = axes_by_path or {}
    mask: Callable[[Any], Any] = lambda params: decay_mask(params, axes_by_path)
    wd = float(opt.weight_decay)
    if opt.kind == "adamw":
        base = optax.adamw(schedule, b1=opt.beta1, b2=opt.beta2, eps=opt.eps, weight_decay=wd, mask=mask)
    elif opt.kind == "adafactor":
        base = optax.adafactor(schedule, weight_decay_rate=wd or None, weight_decay_mask=mask if wd else None)
    elif opt.kind == "sgd":
        parts = [optax.add_decayed_weights(wd, mask)] if wd else []
        # optax takes no momentum as None; the spec's 0 means none
        base = optax.chain(*parts, optax.sgd(schedule, momentum=opt.momentum or None))
    else:
        raise ValueError(f"training.optimizer.kind={opt.kind!r}: expected adamw, adafactor or sgd")
    if opt.grad_clip and opt.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(float(opt.grad_clip)), base)
    return base


# ------------------------------------------------------------------ trainable / frozen split


def trainable_mask(params: Any, trainable: Callable[[str], bool] | None) -> Any:
    """A tree of Python bools matching `params` ("/"-joined path -> trainable)."""
    trainable = trainable or (lambda path: True)
    return jax.tree_util.tree_map_with_path(lambda p, _: bool(trainable(path_str(p))), params)


def split_params(params: Any, mask: Any) -> tuple[Any, Any]:
    """(trainable, frozen): the same tree twice with None where a leaf belongs to the other."""
    trainable = jax.tree.map(lambda m, p: p if m else None, mask, params)
    frozen = jax.tree.map(lambda m, p: None if m else p, mask, params)
    return trainable, frozen


def merge_params(trainable: Any, frozen: Any, mask: Any) -> Any:
    # `mask` is a full tree of bools; trainable/frozen have None leaves where the other holds one.
    flat_mask, treedef = jax.tree.flatten(mask)
    flat_t = treedef.flatten_up_to(trainable)
    flat_f = treedef.flatten_up_to(frozen)
    return treedef.unflatten([t if m else f for m, t, f in zip(flat_mask, flat_t, flat_f)])


def count(tree: Any) -> int:
    return sum(int(jnp.size(x)) for x in jax.tree.leaves(tree))
