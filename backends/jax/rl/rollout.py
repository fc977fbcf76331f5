"""One RL round as library functions: rollout (the generate/ sampler, no gradients) -> score
(rewards.py) -> the update batch objectives/grpo.py (`update_batch`) or objectives/ppo.py
(`ppo_update_batch`) trains on, for one or more optimizer steps.

    prompts, completions = sample_groups(sampler, params, prompts, key, config)
    total, parts = rewards.score(declared, texts, [len(c) for c in completions], answers)
    batch = update_batch(prompts, completions, total, config, seq_len, logps, params, reference)
    state, metrics = steps.train(state, steps.put_train_batch(batch))   # train/step.py

The old log-probs (the importance ratio's denominator), the reference's and PPO's old values,
rewards and advantages are computed here once per rollout, so every update on the batch compares
against the same policy snapshot.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from ftc.backends.jax.generate.sampler import GenerateConfig, Sampler, generate
from ftc.backends.jax.generate.sampling import SamplingConfig
from ftc.backends.jax.objectives import grpo, ppo
from ftc.backends.jax.rl.batch import completion_rows


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    group_size: int  # completions per prompt (GRPO: G >= 2, advantages compare within a group; PPO: 1)
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    eos_ids: tuple[int, ...] = ()
    pad_id: int = 0
    scale_rewards: str = "group"  # grpo.SCALES

    def __post_init__(self):
        if self.group_size < 1:
            raise ValueError(f"group_size={self.group_size}: a rollout samples at least one completion per prompt")
        if not self.temperature > 0:
            raise ValueError(f"temperature={self.temperature}: RL rollouts sample, so it must be > 0")


def sample_groups(
    sampler: Sampler, params: Any, prompts: Sequence[Sequence[int]], key: jax.Array, config: RolloutConfig
) -> tuple[list[list[int]], list[list[int]]]:
    """(each prompt repeated group_size times, adjacent; its completion's tokens), sampled with
    `key`: the same key gives the same rollout."""
    repeated = [list(p) for p in prompts for _ in range(config.group_size)]
    gen = GenerateConfig(
        config.max_new_tokens,
        SamplingConfig(config.temperature, top_p=config.top_p),
        eos_ids=config.eos_ids,
        pad_id=config.pad_id,
    )
    return repeated, [list(c.tokens) for c in generate(sampler, params, repeated, key, gen)]


def logps_function(model, temperature: float) -> Callable[[Any, dict], jax.Array]:
    """Jitted (params, rows) -> [B, T] log-probabilities of the completion tokens (0 elsewhere)."""

    def logps(params, rows):
        values, _ = grpo.token_logps_and_entropy(model, params, rows, jax.random.key(0), temperature)
        return values * rows["weights"]

    return jax.jit(logps)


def update_batch(
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    rewards: np.ndarray,
    config: RolloutConfig,
    seq_len: int,
    logps: Callable[[Any, dict], jax.Array],
    params: Any,
    reference: Any = None,
) -> dict[str, Any]:
    """The objectives/grpo.py batch of one rollout: rows, group advantages of `rewards` (the
    weighted totals), old log-probs under `params`, reference log-probs under `reference` (given
    when beta > 0: for LoRA, the same params with the adapter disabled), row weights, dapo shares."""
    rows = completion_rows(prompts, completions, seq_len)
    n = len(prompts)
    tokens = float(rows["weights"].sum())
    batch = {
        "rows": rows,
        "advantages": grpo.group_advantages(rewards, config.group_size, config.scale_rewards),
        "old_logps": np.asarray(logps(params, rows)),
        "row_weights": np.ones(n, np.float32),
        "token_share": np.full(n, tokens / n, np.float32),
    }
    if reference is not None:
        batch["ref_logps"] = np.asarray(logps(reference, rows))
    return batch


def policy_function(model, temperature: float) -> Callable[[Any, dict], tuple[jax.Array, jax.Array]]:
    """Jitted (params, rows) -> ([B, T] log-probabilities, [B, T] values) of the completion tokens
    (0 elsewhere), for a model with a value head (methods/value_head.py)."""

    def both(params, rows):
        logps_BT, values_BT, _ = ppo.logps_values_entropy(model, params, rows, jax.random.key(0), temperature)
        return logps_BT * rows["weights"], values_BT * rows["weights"]

    return jax.jit(both)


def ppo_update_batch(
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    scores: np.ndarray,
    seq_len: int,
    policy: Callable[[Any, dict], tuple[jax.Array, jax.Array]],
    logps: Callable[[Any, dict], jax.Array],
    params: Any,
    reference: Any = None,
    *,
    kl_coef: float,
    gamma: float,
    lam: float,
) -> tuple[dict[str, Any], dict[str, float]]:
    """(the objectives/ppo.py batch of one rollout, its rollout metrics): rows, old log-probs and
    values under `params`, per-token rewards (the score `scores` at each completion's last token,
    minus kl_coef x (old - reference log-prob) when `reference` is given), GAE advantages
    (whitened) and returns. Metrics as TRL's PPOTrainer names them (objective/*), and kl: the
    per-token mean of old - reference log-prob."""
    rows = completion_rows(prompts, completions, seq_len)
    mask = rows["weights"]
    old, values = (np.asarray(x) for x in policy(params, rows))
    ref = None if reference is None else np.asarray(logps(reference, rows))
    rewards, kl = ppo.penalised_rewards(scores, old, ref, mask, kl_coef)
    advantages, returns = ppo.gae(rewards, values, mask, gamma, lam)
    batch = {
        "rows": rows,
        "old_logps": old,
        "old_values": values,
        "advantages": ppo.whiten(advantages, mask),
        "returns": returns,
        "row_weights": np.ones(len(prompts), np.float32),
    }
    per_row_kl = kl.sum(axis=1)
    non_score = -kl_coef * per_row_kl
    tokens = max(float(mask.sum()), 1.0)
    metrics = {
        "kl": float(kl.sum()) / tokens,
        "objective/kl": float(per_row_kl.mean()),
        "objective/non_score_reward": float(non_score.mean()),
        "objective/scores": float(np.mean(scores)),
        "objective/rlhf_reward": float(np.mean(np.asarray(scores) + non_score)),
        "val/mean": float(values.sum()) / tokens,
    }
    return batch, metrics
