"""backends/jax/train/optimizer.py: schedules, optimizers, the trainable/frozen split."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ftc.backends.jax.train import optimizer as opt_lib
from ftc.compiler.plan import OptimizerPlan, SchedulePlan


def _lr(kind, total=10, warmup_steps=None, warmup_ratio=None, min_lr_ratio=0.0):
    sched = opt_lib.make_schedule(SchedulePlan(kind, 1.0, warmup_steps, warmup_ratio, min_lr_ratio), total)
    return np.array([float(sched(s)) for s in range(total + 1)])


def test_warmup_rises_linearly_from_zero_then_each_schedule_decays_to_min_lr():
    lr = _lr("cosine", warmup_steps=2, min_lr_ratio=0.1)
    np.testing.assert_allclose(lr[:3], [0.0, 0.5, 1.0], atol=1e-7)
    np.testing.assert_allclose(lr[10], 0.1, atol=1e-6)
    np.testing.assert_allclose(lr[6], 0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * 4 / 8)), atol=1e-6)  # cosine midpoint
    lin = _lr("linear", warmup_ratio=0.2, min_lr_ratio=0.0)
    np.testing.assert_allclose(lin[[0, 1, 2, 6, 10]], [0.0, 0.5, 1.0, 0.5, 0.0], atol=1e-6)
    np.testing.assert_allclose(_lr("constant", warmup_steps=0), 1.0)
    assert np.all(np.diff(_lr("cosine", warmup_ratio=0.0)) <= 1e-7)


def _params():
    return {"dense": {"kernel": jnp.ones((4, 3)), "bias": jnp.ones((3,))}, "norm": {"weight": jnp.ones((3,))}}


AXES = {"dense/kernel": ("embed", "mlp"), "dense/bias": ("mlp",), "norm/weight": ("norm",)}


@pytest.mark.parametrize("kind", ["adamw", "adafactor", "sgd"])
def test_weight_decay_skips_biases_and_norms(kind):
    opt = OptimizerPlan(kind, weight_decay=0.5, beta1=0.9, beta2=0.999, eps=1e-8, momentum=0.0, grad_clip=0.0)
    tx = opt_lib.make_optimizer(opt, optax.constant_schedule(0.1), AXES)
    params = _params()
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero_grads, tx.init(params), params)
    assert float(jnp.abs(updates["dense"]["kernel"]).max()) > 0  # decay alone moves the kernel
    assert float(jnp.abs(updates["dense"]["bias"]).max()) == 0.0
    assert float(jnp.abs(updates["norm"]["weight"]).max()) == 0.0


def test_grad_clip_bounds_the_global_norm_before_the_optimizer():
    opt = OptimizerPlan("sgd", weight_decay=0.0, beta1=None, beta2=None, eps=None, momentum=None, grad_clip=1.0)
    tx = opt_lib.make_optimizer(opt, optax.constant_schedule(1.0), AXES)
    params = _params()
    grads = jax.tree.map(lambda p: 10.0 * jnp.ones_like(p), params)
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(float(optax.global_norm(updates)), 1.0, rtol=1e-6)


def test_split_and_merge_round_trip_and_frozen_leaves_get_no_optimizer_state():
    params = _params()
    mask = opt_lib.trainable_mask(params, lambda path: path.startswith("dense/"))
    trainable, frozen = opt_lib.split_params(params, mask)
    assert trainable["norm"]["weight"] is None and frozen["dense"]["kernel"] is None
    merged = opt_lib.merge_params(trainable, frozen, mask)
    assert jax.tree.structure(merged) == jax.tree.structure(params)
    opt = OptimizerPlan("adamw", 0.0, 0.9, 0.999, 1e-8, None, 1.0)
    state = opt_lib.make_optimizer(opt, optax.constant_schedule(0.1), AXES).init(trainable)
    # Two moments for the 15 trained values, one step count per counter: nothing for the norm.
    moments = sum(x.size for x in jax.tree.leaves(state) if x.ndim > 0)
    assert moments == 2 * (12 + 3)
