"""Group relative policy optimisation (GRPO, Shao et al. 2024) as an `Objective` over a rollout batch.

A rollout batch holds G completions for each prompt. Each completion is a causal-LM row
(`rows`: input_ids / targets / segment_ids / positions of prompt + completion, `weights` 1 on the
completion's targets: the token mask m_t) with, per row, its advantage A (`group_advantages`), and
per token the log-probabilities at rollout time of the policy (`old_logps`, the importance
ratio's denominator) and of the reference (`ref_logps`, only when beta > 0). Per token:

    r_t    = exp(log pi(y_t) - log pi_old(y_t))                      (1 at the first update)
    l_t    = -min(r_t A, clip(r_t, 1 - eps_low, 1 + eps_high) A) + beta * k3_t
    k3_t   = exp(ref_t - log pi(y_t)) - (ref_t - log pi(y_t)) - 1     (Schulman's k3 KL estimator)
             times r_t when kl_correction (TRL's use_bias_correction_kl, on by default: the k3
             of tokens sampled from pi_old, reweighted to pi)

and the aggregations TRL's GRPOTrainer (1.16) names `loss_type`:
    grpo     mean over completions of each completion's token mean           (the paper)
    bnpo     sum of l_t m_t / sum of m_t over the optimizer step's tokens
    dr_grpo  sum of l_t m_t / (completions x max_completion_length)          (Dr. GRPO: no length bias)
    dapo     sum of l_t m_t / (the rollout's completion tokens x the share of its completions in the step)

Each is a per-micro-batch sum over one step-wide denominator (`weight_sum`), so accumulation is
exact. TRL averages bnpo per micro-batch instead (same value with one micro-batch per step).
Log-probabilities are of logits / temperature, the sampler's temperature, as TRL computes them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ftc.backends.jax.objectives.contract import ROLLOUTS, Built, Objective, Registered, nonzero
from ftc.backends.jax.rl.shape import rollout_shape
from ftc.compiler.memory import RolloutShape

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
SCALES = ("group", "batch", "none")
SUM_KEYS = (
    "loss_sum",
    "weight_sum",
    "completions",
    "completion_tokens",
    "kl_sum",
    "entropy_sum",
    "clip_low_sum",
    "clip_high_sum",
    "clip_region_sum",
)


def group_advantages(rewards: np.ndarray, group_size: int, scale: str = "group") -> np.ndarray:
    """[N] advantages of N = prompts x group_size rewards (a prompt's completions adjacent): reward
    minus its group's mean, divided (scale = group) by the group's std or (batch) the batch's std,
    Bessel-corrected, + 1e-4 (TRL's scale_rewards); scale = none leaves the std out (Dr. GRPO)."""
    if scale not in SCALES:
        raise ValueError(f"scale_rewards={scale!r}: expected one of {', '.join(SCALES)}")
    if group_size < 2:
        raise ValueError(f"a group needs at least 2 completions to compare, got group_size={group_size}")
    # float64 inside: float32 rewards near its range (a weight of 1e38) overflow a group's sum to
    # inf and every advantage to nan; the advantages themselves are float32.
    r = np.asarray(rewards, np.float32).astype(np.float64)
    if r.ndim != 1 or r.size % group_size:
        raise ValueError(f"{r.size} rewards do not split into groups of {group_size}")
    grouped = r.reshape(-1, group_size)
    centred = (grouped - grouped.mean(axis=1, keepdims=True)).reshape(-1)
    if scale == "none":
        return centred.astype(np.float32)
    std = grouped.std(axis=1, ddof=1).repeat(group_size) if scale == "group" else r.std(ddof=1)
    return (centred / (std + 1e-4)).astype(np.float32)


def token_logps_and_entropy(model, params: Any, rows: Mapping[str, jax.Array], rng: jax.Array, temperature: float):
    """([B, T] log-probability of each target, [B, T] entropy of each position's distribution) of
    the model's logits / temperature, in float32."""
    logits_BTV = model.apply(
        {"params": params},
        rows["input_ids"],
        segment_ids=rows["segment_ids"],
        positions=rows["positions"],
        output="logits",
        rngs={"dropout": rng},
    )
    return logps_and_entropy(logits_BTV, rows["targets"], temperature)


def logps_and_entropy(logits_BTV: jax.Array, targets_BT: jax.Array, temperature: float):
    """([B, T] log-probability of each target, [B, T] entropy) of logits / temperature, in float32
    (shared with objectives/ppo.py)."""
    logits_BTV = logits_BTV.astype(jnp.float32) / temperature
    logps_BT = -optax.softmax_cross_entropy_with_integer_labels(logits_BTV, targets_BT)
    logp_all_BTV = jax.nn.log_softmax(logits_BTV, axis=-1)
    entropy_BT = -jnp.sum(jnp.exp(logp_all_BTV) * logp_all_BTV, axis=-1)
    return logps_BT, entropy_BT


def grpo_sums(
    model,
    params: Any,
    batch: Mapping[str, Any],
    rng: jax.Array,
    reference: Any = None,
    *,
    loss_type: str,
    beta: float,
    epsilon_low: float,
    epsilon_high: float,
    max_completion_length: int,
    temperature: float = 1.0,
    kl_correction: bool = True,
) -> dict[str, jax.Array]:
    """Sums over one micro-batch of a rollout batch (module docstring). `batch`: rows, advantages
    [B], old_logps [B, T], ref_logps [B, T] (beta > 0), row_weights [B] (0 for a padding row) and
    token_share [B] (dapo: the rollout's completion tokens / its completions, so a step on 1/s of
    the rollout's rows is normalised by 1/s of its tokens, TRL's num_items_in_batch /
    steps_per_generation). `reference` is unused: reference log-probs are computed once per rollout."""
    del reference
    rows = batch["rows"]
    logps_BT, entropy_BT = token_logps_and_entropy(model, params, rows, rng, temperature)
    row_w_B = batch["row_weights"].astype(jnp.float32)
    mask_BT = rows["weights"].astype(jnp.float32) * row_w_B[:, None]
    adv_B1 = batch["advantages"].astype(jnp.float32)[:, None]
    ratio_BT = jnp.exp(logps_BT - batch["old_logps"])
    clipped_BT = jnp.clip(ratio_BT, 1.0 - epsilon_low, 1.0 + epsilon_high)
    per_token_BT = -jnp.minimum(ratio_BT * adv_B1, clipped_BT * adv_B1)
    kl_BT = jnp.zeros_like(logps_BT)
    if beta != 0.0:
        # ref_logps is 0 off the completion tokens, so there ref - log pi is -log pi, and exp of it
        # overflows to inf once a prompt or padding target is below -88 (low temperatures make
        # that common); inf * mask 0 is nan, in the loss and its gradient. Zero it there first.
        diff_BT = jnp.where(mask_BT > 0, batch["ref_logps"] - logps_BT, 0.0)
        kl_BT = jnp.exp(diff_BT) - diff_BT - 1.0
        if kl_correction:
            kl_BT = kl_BT * ratio_BT
        per_token_BT = per_token_BT + beta * kl_BT
    masked_BT = per_token_BT * mask_BT
    tokens_B = jnp.sum(mask_BT, axis=-1)
    if loss_type == "grpo":
        loss_sum, weight_sum = jnp.sum(jnp.sum(masked_BT, -1) / jnp.maximum(tokens_B, 1.0)), jnp.sum(row_w_B)
    elif loss_type == "bnpo":
        loss_sum, weight_sum = jnp.sum(masked_BT), jnp.sum(tokens_B)
    elif loss_type == "dr_grpo":
        loss_sum, weight_sum = jnp.sum(masked_BT), jnp.sum(row_w_B) * float(max_completion_length)
    elif loss_type == "dapo":
        loss_sum, weight_sum = jnp.sum(masked_BT), jnp.sum(row_w_B * batch["token_share"].astype(jnp.float32))
    else:
        raise ValueError(f"loss_type={loss_type!r}: expected one of {', '.join(LOSS_TYPES)}")

    def tsum(x_BT):
        return jnp.sum(jax.lax.stop_gradient(x_BT) * mask_BT)

    low_BT = ((ratio_BT < 1.0 - epsilon_low) & (adv_B1 < 0)).astype(jnp.float32)
    high_BT = ((ratio_BT > 1.0 + epsilon_high) & (adv_B1 > 0)).astype(jnp.float32)
    return {
        "loss_sum": loss_sum,
        "weight_sum": weight_sum,
        "completions": jnp.sum(row_w_B),
        "completion_tokens": jnp.sum(tokens_B),
        "kl_sum": tsum(kl_BT),
        "entropy_sum": tsum(entropy_BT),
        "clip_low_sum": tsum(low_BT),
        "clip_high_sum": tsum(high_BT),
        "clip_region_sum": tsum(jnp.maximum(low_BT, high_BT)),
    }


def summarize(totals: Mapping[str, Any]) -> dict[str, Any]:
    """The step's loss and TRL's metric names (kl, entropy, clip_ratio/*, completions/mean_length)
    as token- or completion-weighted means over the step."""
    tokens = nonzero(totals["completion_tokens"])
    return {
        "loss": totals["loss_sum"] / nonzero(totals["weight_sum"]),
        "kl": totals["kl_sum"] / tokens,
        "entropy": totals["entropy_sum"] / tokens,
        "clip_ratio/low_mean": totals["clip_low_sum"] / tokens,
        "clip_ratio/high_mean": totals["clip_high_sum"] / tokens,
        "clip_ratio/region_mean": totals["clip_region_sum"] / tokens,
        "completions/mean_length": totals["completion_tokens"] / nonzero(totals["completions"]),
        "completions": totals["completions"],
        "tokens": totals["completion_tokens"],
    }


def objective(
    *,
    loss_type: str = "dapo",
    beta: float = 0.0,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    max_completion_length: int,
    temperature: float = 1.0,
    kl_correction: bool = True,
) -> Objective:
    """The GRPO objective (module docstring); TRL's defaults for the clip range."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r}: expected one of {', '.join(LOSS_TYPES)}")
    if beta < 0 or epsilon_low <= 0 or epsilon_high <= 0 or temperature <= 0 or max_completion_length < 1:
        raise ValueError(
            f"GRPO needs beta >= 0, epsilon_low, epsilon_high, temperature > 0 and max_completion_length >= 1; got "
            f"{beta}, {epsilon_low}, {epsilon_high}, {temperature}, {max_completion_length}"
        )
    options = dict(
        loss_type=loss_type,
        beta=beta,
        epsilon_low=epsilon_low,
        epsilon_high=epsilon_high,
        max_completion_length=max_completion_length,
        temperature=temperature,
        kl_correction=kl_correction,
    )

    def sums(model, params, batch, rng, reference=None):
        return grpo_sums(model, params, batch, rng, reference, **options)

    keys = ("rows", "advantages", "old_logps", "row_weights", "token_share") + (("ref_logps",) if beta else ())
    return Objective("grpo", sums, summarize, SUM_KEYS, keys)


def build(spec, model) -> Built:
    """GRPO for a run from the training.grpo_* keys. The reference policy (grpo_beta > 0) is the
    starting model: for lora / qlora / adapter the same parameters with the method disabled (no
    second copy, rl/loop.py computes its log-probs once per rollout), for a full fine-tune or a
    method starting from trained weights a frozen copy in the train state (dpo.build)."""
    from ftc.backends.jax.state.init_from import reference_copy_needed  # state imports train, which imports us

    t = spec.training
    built = objective(
        loss_type=t.grpo_loss_type,
        beta=t.grpo_beta,
        epsilon_low=t.grpo_epsilon,
        epsilon_high=t.grpo_epsilon_high,
        max_completion_length=t.grpo_max_new_tokens,
        temperature=t.grpo_temperature,
    )
    return Built(built, reference_copy=bool(t.grpo_beta) and reference_copy_needed(spec, model))


def rollout(spec) -> RolloutShape:
    """One round's rollout: batch_size completions (compiler/memory.py counts its memory)."""
    t = spec.training
    return rollout_shape(
        completions=t.batch_size,
        max_new_tokens=t.grpo_max_new_tokens,
        max_seq_len=spec.model.max_seq_len,
        reference=bool(t.grpo_beta),
    )


RECORD = Registered("grpo", build, trainer=ROLLOUTS, reference_forward=False, rollout=rollout)
