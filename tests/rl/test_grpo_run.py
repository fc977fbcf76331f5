"""`ftc run` with training.objective = "grpo" on a tiny random Llama: rollout -> score -> update
rounds in the training loop, TRL's metric names in metrics.jsonl, and a run stopped between two
updates of one rollout resumes to the same parameters, bit for bit, as an uninterrupted run."""

from __future__ import annotations

import os

import numpy as np
import pytest
import rl_testlib as rl

SPEC = (
    rl.SPEC_HEAD
    + """{method}[training]
objective = "grpo"
steps = {steps}
batch_size = 8
micro_batch_size = 4
learning_rate = 3e-2
log_every = 1
grpo_group_size = 4
grpo_updates_per_rollout = 2
grpo_max_new_tokens = 6
grpo_beta = {beta}
grpo_rewards = [{{ kind = "regex", pattern = "[aeiou]" }}, {{ kind = "numeric", weight = 0.5 }}]
schedule = {{ kind = "constant", warmup_steps = 0 }}
[mesh]
fsdp = 4
tensor = 2
[checkpoint]
every = {checkpoint_every}
[logging]
progress = false
"""
)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return rl.make_root(tmp_path_factory.mktemp("grpo-run"))


def _spec(root, name: str, beta: float = 0.0, steps: int = 6, method: str = "", checkpoint_every: int = 100):
    return rl.load(root, SPEC, name, beta=beta, steps=steps, method=method, checkpoint_every=checkpoint_every)


_metrics = rl.train_metrics


def test_ftc_run_trains_grpo_rounds_and_logs_trls_metrics(root):
    from ftc.backends.jax import pipeline as run_lib

    spec = _spec(root, "grpo", beta=0.04)
    lines = []
    assert run_lib.run(spec, echo=lines.append)["step"] == 6
    assert any("5 prompts (5 with an answer)" in line for line in lines)  # the data summary
    rows = _metrics(spec)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    for r in rows:
        assert {
            "loss",
            "reward",
            "reward_std",
            "frac_reward_zero_std",
            "rewards/regex/mean",
            "rewards/numeric/mean",
            "kl",
            "entropy",
            "clip_ratio/region_mean",
            "completions/mean_length",
            "completions/clipped_ratio",
            "time/rollout_seconds",
            "time/update_seconds",
        } <= set(r)
        assert 0.0 <= r["reward"] <= 1.5 and r["completions"] == 8
    # Two updates per rollout: a round's two steps log the same rollout; the first update of each
    # rollout is at ratio 1 (nothing clipped) and the reference is the policy then (kl 0 at step 1).
    assert rows[0]["reward"] == rows[1]["reward"] and rows[2]["reward"] == rows[3]["reward"]
    assert rows[0]["clip_ratio/region_mean"] == 0.0 and rows[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert rows[-1]["kl"] > 0.0  # the policy moved from the reference


def test_a_grpo_run_stopped_between_two_updates_of_a_rollout_resumes_bitwise(root):
    rl.stopped_and_resumed_equals_whole(lambda name: _spec(root, name), stop_after=3, steps=6)


@pytest.mark.slow  # ~60 s: two runs and a child process
def test_a_grpo_run_killed_with_sigkill_mid_rollout_resumes_bitwise(root):
    """Killed after step 3 with a checkpoint every step (Orbax saves asynchronously, so the newest
    committed one may be step 1, 2 or 3). Each rollout has two updates: a resume from step 1 or 3
    re-enters a rollout from the saved feed state (its batch, old log-probs, the sampler key), one
    from step 2 starts the next rollout with the checkpointed key."""
    every = lambda name: _spec(root, name, steps=6, checkpoint_every=1)  # noqa: E731
    assert rl.killed_and_resumed_equals_whole(every, kill_at=3, steps=6) in (1, 2, 3)


def test_ftc_run_trains_grpo_with_lora_against_its_disabled_base(root):
    from ftc.backends.jax import pipeline as run_lib

    spec = _spec(root, "grpo-lora", beta=0.04, steps=4, method='[method]\nkind = "lora"\nrank = 4\nalpha = 8\n')
    lines = []
    assert run_lib.run(spec, echo=lines.append)["step"] == 4
    rows = _metrics(spec)
    # The reference is the base with the adapter off: the policy at step 1 (B = 0), so kl 0 there.
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-6) and rows[-1]["kl"] > 0.0
    assert all(np.isfinite(r["loss"]) and "reward" in r for r in rows)
    assert os.path.isdir(os.path.join(spec.run_dir, "export"))
