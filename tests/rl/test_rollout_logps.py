"""The rollout's log-probs and values (the importance ratio's denominator, PPO's old values) are
the sampling policy's: the method's module without training-only noise, as the sampler runs it.
With the train module, a LoRA dropout drew one fixed mask (key 0) into every rollout's old
log-probs and values, so the ratio compared the update against a policy nobody sampled from."""

from __future__ import annotations

import pytest
import rl_testlib as rl

SPEC = (
    rl.SPEC_HEAD
    + """[method]
kind = "lora"
rank = 4
alpha = 8
dropout = 0.5
[training]
objective = "{objective}"
steps = 1
batch_size = 8
micro_batch_size = 8
{keys}
[mesh]
fsdp = 8
[logging]
progress = false
"""
)
KEYS = {
    "grpo": "grpo_group_size = 4\ngrpo_max_new_tokens = 4\ngrpo_beta = 0.04\n"
    'grpo_rewards = [{ kind = "regex", pattern = "a" }]',
    "ppo": 'ppo_max_new_tokens = 4\nppo_rewards = [{ kind = "regex", pattern = "a" }]',
}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return rl.make_root(tmp_path_factory.mktemp("rollout-logps"))


@pytest.mark.parametrize("objective", ["grpo", "ppo"])
def test_rollout_log_probs_and_values_come_from_the_module_without_dropout(root, objective, monkeypatch):
    from ftc.backends.jax import pipeline as run_lib
    from ftc.backends.jax.rl import loop

    scored = []
    for name in ("logps_function", "policy_function"):
        made = getattr(loop, name)
        monkeypatch.setattr(loop, name, lambda module, t, made=made: scored.append(module) or made(module, t))
    spec = rl.load(root, SPEC, objective, objective=objective, keys=KEYS[objective])
    assert run_lib.run(spec, echo=lambda s: None)["step"] == 1
    assert len(scored) == (2 if objective == "ppo" else 1)
    for module in scored:
        lora = getattr(module, "inner", module)  # PPO: the value head's wrapper around the method's module
        assert lora.deterministic, f"{objective}: the rollout is scored with LoRA dropout on"
