"""Proximal policy optimisation (PPO, Schulman et al. 2017) for language models, as in Ouyang et
al. 2022 and TRL's PPOTrainer, as an `Objective` over a rollout batch.

A rollout batch holds one completion per prompt, as the causal-LM rows of rl/batch.py (`weights`
1 on the completion's targets: the token mask m_t). The policy carries a value head
(methods/value_head.py: V(s_t) from the final hidden state at the position that predicts token
t). Computed once per rollout, on the host, with the rollout policy's log-probs `old_t`, its
values `v_t` and the reference's log-probs `ref_t` (the starting model; for LoRA the base with the
adapter off):

    r_t  = -kl_coef * (old_t - ref_t)  +  [t = last completion token] * score   (score: the weighted
                                                                                   rewards, rl/rewards.py)
    d_t  = r_t + gamma * v_{t+1} - v_t            (v after the last token = 0: the episode ends)
    A_t  = d_t + gamma * lambda * A_{t+1}         (GAE, Schulman et al. 2016)
    R_t  = A_t + v_t                              (the value target: returns before whitening)
    A_t <- (A_t - mean) / sqrt(var + 1e-8)        (whitened over the rollout's completion tokens,
                                                   var with Bessel's correction: TRL's masked_whiten)

Per token, at each update (`sums`), with the current policy's log-prob l_t and value u_t:

    ratio_t  = exp(l_t - old_t)
    pg_t     = max(-A_t ratio_t, -A_t clip(ratio_t, 1 - epsilon, 1 + epsilon))
    vf_t     = 0.5 * max((u_t - R_t)^2, (clip(u_t, v_t - value_clip, v_t + value_clip) - R_t)^2)
    loss     = sum_t m_t (pg_t + vf_coef * vf_t) / sum_t m_t     over the optimizer step's tokens

(TRL's loss, whose means are over its micro-batch; here one step-wide denominator keeps
accumulation exact, and values are masked to the completion tokens where TRL's value mask reaches
one position further.) Log-probabilities are of logits / temperature, the sampler's temperature.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ftc.backends.jax.methods.value_head import OUTPUT
from ftc.backends.jax.objectives.contract import ROLLOUTS, Built, Objective, Registered, nonzero
from ftc.backends.jax.objectives.grpo import logps_and_entropy
from ftc.backends.jax.rl.shape import rollout_shape
from ftc.compiler.memory import RolloutShape

SUM_KEYS = (
    "loss_sum",
    "weight_sum",
    "policy_loss_sum",
    "value_loss_sum",
    "clip_sum",
    "value_clip_sum",
    "approxkl_sum",
    "ratio_sum",
    "entropy_sum",
    "completions",
)
BATCH_KEYS = ("rows", "old_logps", "old_values", "advantages", "returns", "row_weights")


# ------------------------------------------------------------ once per rollout (host, numpy)


def penalised_rewards(
    scores_N: np.ndarray, old_NT: np.ndarray, ref_NT: np.ndarray | None, mask_NT: np.ndarray, kl_coef: float
) -> tuple[np.ndarray, np.ndarray]:
    """([N, T] per-token rewards r_t, [N, T] per-token k1 KL old_t - ref_t on the mask): each row's
    score at its last masked position, minus kl_coef x KL on every masked position."""
    mask = np.asarray(mask_NT, np.float32)
    kl = np.zeros_like(mask) if ref_NT is None else (np.asarray(old_NT) - np.asarray(ref_NT)) * mask
    rewards = -np.float32(kl_coef) * kl
    for i in range(mask.shape[0]):
        masked = np.flatnonzero(mask[i])
        if masked.size:  # an empty completion has no token to reward
            rewards[i, masked[-1]] += np.float32(scores_N[i])
    return rewards.astype(np.float32), kl.astype(np.float32)


def gae(
    rewards_NT: np.ndarray, values_NT: np.ndarray, mask_NT: np.ndarray, gamma: float, lam: float
) -> tuple[np.ndarray, np.ndarray]:
    """([N, T] advantages, [N, T] returns = advantages + values), both 0 off the mask. A row's
    masked positions are one contiguous completion; v beyond its last token is 0."""
    mask = np.asarray(mask_NT, np.float32)
    r, v = np.asarray(rewards_NT, np.float32) * mask, np.asarray(values_NT, np.float32) * mask
    adv = np.zeros_like(r)
    last = np.zeros(r.shape[0], np.float32)
    next_v = np.zeros(r.shape[0], np.float32)
    for t in range(r.shape[1] - 1, -1, -1):
        delta = r[:, t] + np.float32(gamma) * next_v - v[:, t]
        last = (delta + np.float32(gamma * lam) * last) * mask[:, t]
        adv[:, t] = last
        next_v = v[:, t]
    return adv, (adv + v) * mask


def whiten(x_NT: np.ndarray, mask_NT: np.ndarray, eps: float = 1e-8) -> np.ndarray:
    """(x - mean) / sqrt(var + eps) over the masked entries, var Bessel-corrected (TRL's
    masked_whiten with shift_mean); 0 off the mask."""
    mask = np.asarray(mask_NT, np.float64)
    x = np.asarray(x_NT, np.float64)
    n = mask.sum()
    if n < 2:
        return np.zeros_like(x_NT, np.float32)
    mean = (x * mask).sum() / n
    var = (((x - mean) ** 2) * mask).sum() / n * (n / (n - 1))
    return (((x - mean) / np.sqrt(var + eps)) * mask).astype(np.float32)


# ------------------------------------------------------------ each update (jitted)


def logps_values_entropy(model, params: Any, rows: Mapping[str, jax.Array], rng: jax.Array, temperature: float):
    """([B, T] log-prob of each target under logits / temperature, [B, T] value, [B, T] entropy),
    float32, from one forward pass of the policy with its value head."""
    logits_BTV, values_BT = model.apply(
        {"params": params},
        rows["input_ids"],
        segment_ids=rows["segment_ids"],
        positions=rows["positions"],
        output=OUTPUT,
        rngs={"dropout": rng},
    )
    logps_BT, entropy_BT = logps_and_entropy(logits_BTV, rows["targets"], temperature)
    return logps_BT, values_BT.astype(jnp.float32), entropy_BT


def ppo_sums(
    model,
    params: Any,
    batch: Mapping[str, Any],
    rng: jax.Array,
    reference: Any = None,
    *,
    epsilon: float,
    value_clip: float,
    vf_coef: float,
    temperature: float = 1.0,
) -> dict[str, jax.Array]:
    """Sums over one micro-batch (module docstring). `batch`: rows, old_logps, old_values,
    advantages (whitened), returns [B, T], row_weights [B] (0 for a padding row). `reference` is
    unused: the KL penalty is in the rewards, computed once per rollout."""
    del reference
    rows = batch["rows"]
    logps_BT, values_BT, entropy_BT = logps_values_entropy(model, params, rows, rng, temperature)
    row_w_B = batch["row_weights"].astype(jnp.float32)
    mask_BT = rows["weights"].astype(jnp.float32) * row_w_B[:, None]
    adv_BT, ret_BT, old_v_BT = batch["advantages"], batch["returns"], batch["old_values"]

    diff_BT = logps_BT - batch["old_logps"]
    ratio_BT = jnp.exp(diff_BT)
    pg1_BT = -adv_BT * ratio_BT
    pg2_BT = -adv_BT * jnp.clip(ratio_BT, 1.0 - epsilon, 1.0 + epsilon)
    pg_BT = jnp.maximum(pg1_BT, pg2_BT)
    clipped_v_BT = jnp.clip(values_BT, old_v_BT - value_clip, old_v_BT + value_clip)
    vf1_BT = jnp.square(values_BT - ret_BT)
    vf2_BT = jnp.square(clipped_v_BT - ret_BT)
    vf_BT = 0.5 * jnp.maximum(vf1_BT, vf2_BT)

    def tsum(x_BT):
        return jnp.sum(x_BT * mask_BT)

    def metric(x_BT):
        return tsum(jax.lax.stop_gradient(x_BT).astype(jnp.float32))

    return {
        "loss_sum": tsum(pg_BT + vf_coef * vf_BT),
        "weight_sum": jnp.sum(mask_BT),
        "policy_loss_sum": metric(pg_BT),
        "value_loss_sum": metric(vf_BT),
        "clip_sum": metric(pg2_BT > pg1_BT),
        "value_clip_sum": metric(vf2_BT > vf1_BT),
        "approxkl_sum": metric(0.5 * jnp.square(diff_BT)),
        "ratio_sum": metric(ratio_BT),
        "entropy_sum": metric(entropy_BT),
        "completions": jnp.sum(row_w_B),
    }


def summarize(totals: Mapping[str, Any]) -> dict[str, Any]:
    """The step's loss and token means under TRL's PPO names (loss/policy_avg, loss/value_avg,
    policy/clipfrac_avg, val/clipfrac_avg, policy/approxkl_avg, val/ratio, policy/entropy_avg),
    with the names GRPO logs too (clip_ratio, entropy, completions/mean_length)."""
    tokens = nonzero(totals["weight_sum"])
    clip = totals["clip_sum"] / tokens
    entropy = totals["entropy_sum"] / tokens
    return {
        "loss": totals["loss_sum"] / tokens,
        "loss/policy_avg": totals["policy_loss_sum"] / tokens,
        "loss/value_avg": totals["value_loss_sum"] / tokens,
        "policy/clipfrac_avg": clip,
        "clip_ratio": clip,
        "val/clipfrac_avg": totals["value_clip_sum"] / tokens,
        "policy/approxkl_avg": totals["approxkl_sum"] / tokens,
        "val/ratio": totals["ratio_sum"] / tokens,
        "policy/entropy_avg": entropy,
        "entropy": entropy,
        "completions/mean_length": totals["weight_sum"] / nonzero(totals["completions"]),
        "completions": totals["completions"],
        "tokens": totals["weight_sum"],
    }


def objective(*, epsilon: float = 0.2, value_clip: float = 0.2, vf_coef: float = 0.1, temperature: float = 1.0):
    """The PPO objective (module docstring); TRL's PPOConfig defaults (cliprange, cliprange_value,
    vf_coef)."""
    if not (epsilon > 0 and value_clip > 0 and vf_coef >= 0 and temperature > 0):
        raise ValueError(
            f"PPO needs epsilon, value_clip, temperature > 0 and vf_coef >= 0; got "
            f"{epsilon}, {value_clip}, {temperature}, {vf_coef}"
        )
    options = dict(epsilon=epsilon, value_clip=value_clip, vf_coef=vf_coef, temperature=temperature)

    def sums(model, params, batch, rng, reference=None):
        return ppo_sums(model, params, batch, rng, reference, **options)

    return Objective("ppo", sums, summarize, SUM_KEYS, BATCH_KEYS)


def build(spec, model) -> Built:
    """PPO for a run from the training.ppo_* keys. The reference policy (ppo_kl_coef > 0) is the
    starting model, as GRPO's: for lora / qlora / adapter the same parameters with the method
    disabled, for a full fine-tune or a method starting from trained weights a frozen copy."""
    from ftc.backends.jax.state.init_from import reference_copy_needed  # state imports train, which imports us

    t = spec.training
    built = objective(
        epsilon=t.ppo_epsilon, value_clip=t.ppo_value_clip, vf_coef=t.ppo_vf_coef, temperature=t.ppo_temperature
    )
    return Built(built, reference_copy=bool(t.ppo_kl_coef) and reference_copy_needed(spec, model))


def rollout(spec) -> RolloutShape:
    """One round's rollout for the plan's memory: batch_size completions, one per prompt, with the
    old values, advantages and returns as per-token arrays beside the old log-probs."""
    t = spec.training
    return rollout_shape(
        completions=t.batch_size,
        max_new_tokens=t.ppo_max_new_tokens,
        max_seq_len=spec.model.max_seq_len,
        reference=bool(t.ppo_kl_coef),
        per_token_arrays=3,
    )


RECORD = Registered("ppo", build, trainer=ROLLOUTS, reference_forward=False, rollout=rollout)
