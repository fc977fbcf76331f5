"""`ftc run` with training.objective = "ppo" on a tiny random Llama, full and LoRA: rollout ->
score -> update rounds with a value head in the trained tree, TRL's PPO metric names in
metrics.jsonl, an export without the value head, and a run stopped between two updates of one
rollout resumes to the same parameters (value head included), bit for bit."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import rl_testlib as rl
import train_testlib as tl

SPEC = (
    rl.SPEC_HEAD
    + """{method}[training]
objective = "ppo"
steps = {steps}
batch_size = 8
micro_batch_size = 4
learning_rate = 3e-2
log_every = 1
ppo_updates_per_rollout = 2
ppo_max_new_tokens = 6
ppo_kl_coef = {kl}
ppo_rewards = [{{ kind = "regex", pattern = "[aeiou]" }}, {{ kind = "numeric", weight = 0.5 }}]
schedule = {{ kind = "constant", warmup_steps = 0 }}
[mesh]
fsdp = 4
tensor = 2
[checkpoint]
every = 100
[logging]
progress = false
"""
)
HEAD = "ftc_value_head"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return rl.make_root(tmp_path_factory.mktemp("ppo-run"))


def _spec(root, name: str, kl: float = 0.05, steps: int = 6, method: str = ""):
    return rl.load(root, SPEC, name, kl=kl, steps=steps, method=method)


_metrics = rl.train_metrics


def _params(spec) -> dict[str, np.ndarray]:
    return tl.checkpoint_params(spec.run_dir)


def _export_has_no_value_head(spec) -> None:
    from safetensors.numpy import load_file

    out = os.path.join(spec.run_dir, "export")
    names = [n for f in os.listdir(out) if f.endswith(".safetensors") for n in load_file(os.path.join(out, f))]
    assert names and not any("value" in n for n in names), names
    with open(os.path.join(out, "ftc_export.json")) as f:
        assert HEAD in json.load(f)["left_out"]


def test_ftc_run_trains_ppo_with_a_value_head_and_logs_trls_metrics(root):
    from ftc.backends.jax import pipeline as run_lib

    spec = _spec(root, "ppo")
    lines = []
    assert run_lib.run(spec, echo=lines.append)["step"] == 6
    assert any("a value head (PPO) trains beside it" in line for line in lines)  # the plan's method line
    rows = _metrics(spec)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    for r in rows:
        assert {
            "loss",
            "loss/policy_avg",
            "loss/value_avg",
            "reward",
            "reward_std",
            "rewards/regex/mean",
            "rewards/numeric/mean",
            "kl",
            "objective/kl",
            "objective/non_score_reward",
            "objective/rlhf_reward",
            "entropy",
            "clip_ratio",
            "val/clipfrac_avg",
            "policy/approxkl_avg",
            "completions/mean_length",
            "time/rollout_seconds",
            "time/update_seconds",
        } <= set(r), sorted(r)
        assert np.isfinite(r["loss"]) and r["completions"] == 8 and 0.0 <= r["reward"] <= 1.5
    # A rollout's first update is at ratio 1 (nothing clipped, approx KL 0); the reference is the
    # policy at step 1 (kl 0 there), then the policy moves away from it.
    assert rows[0]["reward"] == rows[1]["reward"] and rows[2]["reward"] == rows[3]["reward"]
    assert rows[0]["clip_ratio"] == 0.0 and rows[0]["policy/approxkl_avg"] == pytest.approx(0.0, abs=1e-7)
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-6) and rows[-1]["kl"] != 0.0
    kernel = _params(spec)[f"{HEAD}/kernel"]  # trained (it starts at zero)
    assert kernel.shape == (32,) and np.any(kernel != 0)
    _export_has_no_value_head(spec)


def test_a_ppo_run_stopped_between_two_updates_of_a_rollout_resumes_bitwise(root):
    params = rl.stopped_and_resumed_equals_whole(
        lambda name: _spec(root, name), stop_after=3, steps=6, keys=("reward", "loss", "loss/value_avg")
    )
    assert f"{HEAD}/kernel" in params  # the value head is in the checkpoint, and equal


def test_ftc_run_trains_ppo_with_lora_and_its_value_head_against_the_disabled_base(root):
    from ftc.backends.jax import pipeline as run_lib

    spec = _spec(root, "ppo-lora", steps=4, method='[method]\nkind = "lora"\nrank = 4\nalpha = 8\n')
    assert run_lib.run(spec, echo=lambda s: None)["step"] == 4
    rows = _metrics(spec)
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-6) and rows[-1]["kl"] != 0.0
    assert all(np.isfinite(r["loss"]) and np.isfinite(r["loss/value_avg"]) for r in rows)
    saved = _params(spec)  # a LoRA checkpoint holds what trains: the factors and the value head
    assert np.any(saved[f"{HEAD}/kernel"] != 0)
    assert all("ftc_lora" in k or HEAD in k for k in saved), sorted(saved)
    assert os.path.isdir(os.path.join(spec.run_dir, "export"))
