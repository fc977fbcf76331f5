"""backends/jax/train/step.py on ftc's tiny Llama, on meshes of the 8 fake CPU devices."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import train_testlib as tl

from ftc.backends.jax.train import step as ts

CFG = tl.tiny_llama_config()
STEPS = 3


@pytest.fixture(scope="module")
def params():
    from ftc.backends.jax.models import family_for

    family = family_for(CFG)
    module = family.build(family.config_from_hf(CFG))
    init = jax.jit(lambda: nn.unbox(module.init(jax.random.key(0), jnp.zeros((1, tl.SEQ), jnp.int32))["params"]))
    return jax.device_get(init())


def _train(spec, params, n_devices, batches, trainable=None):
    p = tl.program(spec, CFG, n_devices, params=params, trainable=trainable)
    state, history = p.state, []
    for batch in batches:
        state, metrics = p.steps.train(state, p.steps.put_train_batch(batch))
        history.append(ts.host_metrics(metrics))
    return p, state, history


def _batches(n=STEPS, batch=8, seed=0):
    rng = np.random.default_rng(seed)
    return [tl.random_batch(rng, batch) for _ in range(n)]


MESHES = [(8, 1, 1), (2, 2, 2), (1, 4, 2)]
ADAMW = {"training": {"learning_rate": 1e-3, "optimizer": {"kind": "adamw", "weight_decay": 0.01}}}


@pytest.fixture(scope="module")
def single_device_run(params):
    spec = tl.spec({**ADAMW, "mesh": {"data": 1, "fsdp": 1, "tensor": 1}})
    _, state, history = _train(spec, params, 1, _batches())
    return tl.flat(state["params"]), history


@pytest.mark.parametrize("mesh", MESHES, ids=lambda m: "x".join(map(str, m)))
def test_same_losses_and_params_on_every_mesh_as_on_one_device(params, single_device_run, mesh):
    ref_params, ref_history = single_device_run
    spec = tl.spec({**ADAMW, "mesh": dict(zip(("data", "fsdp", "tensor"), mesh))})
    p, state, history = _train(spec, params, 8, _batches())
    # The shardings really are the plan's: the mlp kernel is split over fsdp and tensor.
    sharding = state["params"]["layers"]["mlp"]["up_proj"]["kernel"].sharding
    assert tuple(sharding.spec) == tuple(p.plan.partitions()["layers/mlp/up_proj/kernel"])
    for got, want in zip(history, ref_history):
        for key in ("loss", "token_accuracy", "tokens", "loss_weight", "grad_norm", "learning_rate"):
            assert got[key] == pytest.approx(want[key], rel=1e-5), key
    # Adam's first steps move each weight by about +-lr whatever its gradient's size, so a weight
    # whose gradient is ~0 amplifies reassociation noise: compare at 1% of one step (lr 1e-3).
    got_params = tl.flat(state["params"])
    for name, want in ref_params.items():
        np.testing.assert_allclose(got_params[name], want, rtol=0, atol=1e-5, err_msg=name)
    assert ref_history[-1]["loss"] < ref_history[0]["loss"] + 1.0  # it trains, not diverges


def test_four_micro_batches_equal_one_full_batch(params):
    sgd = {
        "training": {"learning_rate": 0.5, "optimizer": {"kind": "sgd", "grad_clip": 0.0}},
        "mesh": {"data": 1, "fsdp": 2, "tensor": 1},
    }
    batches = _batches(n=2)
    _, full_state, full = _train(
        tl.spec(sgd | {"training": sgd["training"] | {"micro_batch_size": 8}}), params, 2, batches
    )
    p4, acc_state, acc = _train(
        tl.spec(sgd | {"training": sgd["training"] | {"micro_batch_size": 2}}), params, 2, batches
    )
    assert p4.plan.batch.accum_steps == 4
    for a, f in zip(acc, full):
        for key in ("loss", "token_accuracy", "grad_norm", "loss_weight", "tokens"):
            assert a[key] == pytest.approx(f[key], rel=2e-6), key
    got, want = tl.flat(acc_state["params"]), tl.flat(full_state["params"])
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-6, atol=1e-7, err_msg=name)
    # The batch is one where averaging per micro-batch would be wrong: the micro-batches carry
    # different loss weights, so the mean of their means differs from the token-weighted mean.
    b = batches[0]
    w = b["weights"].reshape(4, 2, -1).sum(axis=(1, 2))
    assert w.max() - w.min() >= 2.0


def test_frozen_params_stay_bitwise_equal_and_get_no_optimizer_state(params):
    spec = tl.spec(
        {
            "training": {"learning_rate": 1e-2, "optimizer": {"kind": "adamw", "weight_decay": 0.1}},
            "mesh": {"data": 1, "fsdp": 2, "tensor": 2},
        }
    )
    trainable = lambda path: "/mlp/" in path
    _, state, history = _train(spec, params, 4, _batches(n=2), trainable=trainable)
    before, after = tl.flat(params), tl.flat(state["params"])
    for name in before:
        if trainable(name):
            assert not np.array_equal(after[name], before[name]), name
        else:
            assert after[name].tobytes() == before[name].tobytes(), name
    opt_leaves = tl.flat(state["opt_state"])
    assert opt_leaves and all("/mlp/" in n for n in opt_leaves if opt_leaves[n].ndim > 0)
    assert all(math.isfinite(h["loss"]) for h in history)


def test_non_finite_loss_stops_with_the_step_and_what_to_try(params):
    spec = tl.spec({"mesh": {"data": 1, "fsdp": 1, "tensor": 1}})
    broken = jax.tree.map(np.array, params)
    broken["norm"]["weight"][:] = np.inf
    _, _, history = _train(spec, broken, 1, _batches(n=1))
    with pytest.raises(ts.NonFiniteLossError, match=r"training loss is nan at step 1 .*learning_rate"):
        ts.check_finite(history[0], 1)


def test_eval_is_token_weighted_over_batches(params):
    spec = tl.spec({"mesh": {"data": 1, "fsdp": 2, "tensor": 1}})
    p = tl.program(spec, CFG, 2, params=params)
    rng = np.random.default_rng(3)
    a, b = tl.random_batch(rng, 2), tl.random_batch(rng, 6)
    b["weights"][:, :8] = 0.0  # very different weights per batch
    split = ts.evaluate(p.steps, p.state, [a, b])
    joined = ts.evaluate(p.steps, p.state, [{k: np.concatenate([a[k], b[k]]) for k in a}])
    for key in ("loss", "perplexity", "token_accuracy", "loss_weight", "tokens"):
        assert split[key] == pytest.approx(joined[key], rel=1e-6), key
    assert split["perplexity"] == pytest.approx(math.exp(split["loss"]))


def test_remat_changes_memory_not_arithmetic_and_bf16_compute_keeps_float32_master_params(params):
    base = {"mesh": {"data": 1, "fsdp": 2, "tensor": 1}}
    batches = _batches(n=1)
    _, _, plain = _train(tl.spec(base), params, 2, batches)
    _, _, full = _train(tl.spec(base | {"training": {"remat": "full"}}), params, 2, batches)
    for key in ("loss", "grad_norm"):
        assert full[0][key] == pytest.approx(plain[0][key], rel=1e-6), key
    _, state, bf16 = _train(tl.spec(base | {"model": {"dtype": "bfloat16"}}), params, 2, batches)
    assert {x.dtype for x in jax.tree.leaves(state["params"])} == {jnp.dtype("float32")}
    assert {x.dtype for x in jax.tree.leaves(state["opt_state"]) if x.ndim} == {jnp.dtype("float32")}
    assert bf16[0]["loss"] == pytest.approx(plain[0]["loss"], rel=2e-2)  # bfloat16 logits, float32 loss
    assert bf16[0]["loss"] != plain[0]["loss"]  # the forward really ran in bfloat16
