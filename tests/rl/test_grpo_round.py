"""rl/rollout.py with the real sampler and train/step.py: rollout -> score -> update rounds on a
tiny Llama. The first update of a rollout has importance ratio 1 (nothing clipped), later updates
on the same rollout move it, the same sampler key gives the same rollout, and the mean reward of
a learnable reward rises over the rounds."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import train_testlib as tl

from ftc.backends.jax.generate.sampler import make_sampler
from ftc.backends.jax.io import hf_checkpoint
from ftc.backends.jax.objectives import grpo
from ftc.backends.jax.rl import rewards as rw
from ftc.backends.jax.rl.rollout import RolloutConfig, logps_function, sample_groups, update_batch
from ftc.backends.jax.train import mesh as mesh_lib
from ftc.backends.jax.train import step as ts

NEW = 6
SEQ = 4 + NEW
# 64 of the 320 ids end a completion, so lengths vary from the start; the reward wants 1-2 tokens.
CONFIG = RolloutConfig(group_size=8, max_new_tokens=NEW, temperature=1.0, eos_ids=tuple(range(100, 164)))
REWARDS = rw.parse([{"kind": "length", "min_tokens": 1, "max_tokens": 2}])


@pytest.fixture(scope="module")
def program(tmp_path_factory):
    path = tmp_path_factory.mktemp("grpo-round") / "model"
    tl.make_model_dir(path)
    loaded = hf_checkpoint.load_model(path)
    module = loaded.family.build(loaded.arch, jnp.float32)
    sampler = make_sampler(loaded.family, loaded.arch, module, context=64)
    mesh = mesh_lib.make_mesh(1, 1, 1, jax.devices()[:1])
    mask = jax.tree.map(lambda _: True, loaded.params)
    tx = optax.adam(3e-2)
    state_abs = ts.abstract_state(jax.eval_shape(lambda: loaded.params), tx, mask)
    replicated = {p: (None,) * np.ndim(x) for p, x in tl.flat(loaded.params).items()}
    state_sh = ts.state_shardings(mesh, state_abs, replicated)
    objective = grpo.objective(loss_type="dapo", max_completion_length=NEW)
    steps = ts.build_steps(
        module, tx, optax.constant_schedule(3e-2), mask, mesh, state_sh, accum_steps=1, objective=objective
    )
    # A fresh state per call: the train step donates (consumes) the state it is given.
    fresh = lambda: jax.jit(lambda p: ts.init_state(p, tx, mask, 0), out_shardings=state_sh)(loaded.params)  # noqa: E731
    return sampler, module, steps, fresh


def _round(program, state, prompts, key, updates: int = 1):
    sampler, module, steps, _ = program
    repeated, completions = sample_groups(sampler, state["params"], prompts, key, CONFIG)
    total, parts = rw.score(REWARDS, [""] * len(completions), [len(c) for c in completions], [None] * len(completions))
    batch = update_batch(repeated, completions, total, CONFIG, SEQ, logps_function(module, 1.0), state["params"])
    metrics = []
    for _ in range(updates):
        state, m = steps.train(state, steps.put_train_batch(batch))
        metrics.append(ts.host_metrics(m))
    return state, completions, rw.metrics(total, parts, CONFIG.group_size), metrics


def test_grpo_rounds_raise_the_mean_reward_and_the_ratio_is_one_at_each_rollouts_first_update(program):
    state = program[3]()
    prompts = [[5, 6, 7, 8], [9, 10, 11, 12]]
    key = jax.random.key(0)
    rewards = []
    for r in range(12):
        state, _, reward_metrics, updates = _round(program, state, prompts, jax.random.fold_in(key, r), updates=2)
        rewards.append(reward_metrics["reward"])
        assert updates[0]["clip_ratio/region_mean"] == 0.0  # pi == pi_old at a rollout's first update
        assert np.isfinite(updates[1]["loss"])
    # Measured: 0.375, 0.4375, 0.375 in the first rounds, 0.875, 1.0, 1.0 in the last.
    assert np.mean(rewards[-3:]) > np.mean(rewards[:3]) + 0.3, rewards


def test_the_same_sampler_key_gives_the_same_rollout(program):
    sampler, _, _, fresh = program
    state = fresh()
    prompts = [[5, 6, 7, 8]]
    a = sample_groups(sampler, state["params"], prompts, jax.random.key(3), CONFIG)[1]
    b = sample_groups(sampler, state["params"], prompts, jax.random.key(3), CONFIG)[1]
    c = sample_groups(sampler, state["params"], prompts, jax.random.key(4), CONFIG)[1]
    assert a == b and a != c
    assert len({tuple(x) for x in a}) > 1  # a group's completions differ


def test_a_group_of_one_is_refused():
    # A rollout may sample one completion per prompt (PPO); GRPO's advantages need a group.
    with pytest.raises(ValueError, match="group_size=1"):
        grpo.group_advantages(np.zeros(4, np.float32), 1)
    with pytest.raises(ValueError, match="group_size=0"):
        RolloutConfig(group_size=0, max_new_tokens=4)
