"""One GRPO round as library functions: rollout (the generate/ sampler, no gradients) -> score
(rewards.py) -> the update batch objectives/grpo.py trains on, for one or more optimizer steps.

    prompts, completions = sample_groups(sampler, params, prompts, key, config)
    total, parts = rewards.score(declared, texts, [len(c) for c in completions], answers)
    batch = update_batch(prompts, completions, total, config, seq_len, logps, params, reference)
    state, metrics = steps.train(state, steps.put_train_batch(batch))   # train/step.py

The old log-probs (the importance ratio's denominator) and the reference's are computed here
once per rollout, so every update on the batch compares against the same policy snapshot.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from ftc.backends.jax.generate.sampler import GenerateConfig, Sampler, generate
from ftc.backends.jax.generate.sampling import SamplingConfig
from ftc.backends.jax.objectives import grpo
from ftc.backends.jax.rl.batch import completion_rows


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    group_size: int  # completions per prompt (G >= 2: advantages compare within a group)
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    eos_ids: tuple[int, ...] = ()
    pad_id: int = 0
    scale_rewards: str = "group"  # grpo.SCALES

    def __post_init__(self):
        if self.group_size < 2:
            raise ValueError(f"group_size={self.group_size}: GRPO compares completions within a group, it needs >= 2")
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
