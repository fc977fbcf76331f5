"""Odds-ratio preference optimisation (ORPO, Hong et al. 2024) as an `Objective`: reference-free.

The batch is DPO's (preference data, data_pack.pad_pairs). Per pair i, with p = the mean
log-probability of a side's response tokens (TRL's `average_log_prob=True`):

    log odds(y) = p(y) - log(1 - exp(p(y)))
    ratio_i     = log sigmoid(log odds(chosen) - log odds(rejected))
    nll_i       = mean negative log-likelihood of the chosen row's tokens, prompt included
                  (TRL's ORPOTrainer labels every attended token of the chosen row)
    loss_i      = nll_i - beta * ratio_i

and the step's loss is sum_i w_i loss_i / sum_i w_i (padding pairs have w_i = 0), so micro-batching
changes nothing. This equals TRL's `ORPOTrainer` (trl.experimental.orpo, TRL 1.16) pair by pair;
over a batch TRL pools the NLL over all chosen tokens of the batch while ftc averages it per pair
(the paper's per-example L_SFT), which agree whenever the chosen rows have equal lengths.
Metrics follow TRL: rewards are beta * p, the log odds ratio and the chosen NLL are logged.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from ftc.backends.jax.objectives.contract import Built, Objective, Registered, nonzero

SUM_KEYS = (
    "loss_sum",
    "weight_sum",
    "nll_sum",
    "log_odds_ratio_sum",
    "log_odds_chosen_sum",
    "accuracy_sum",
    "chosen_reward_sum",
    "rejected_reward_sum",
    "tokens",
)
BATCH_KEYS = ("chosen", "rejected", "weights")
_LOG_HALF = -0.6931471805599453


def log1mexp(x):
    """log(1 - exp(x)) for x < 0, branching at -log 2 to avoid cancellation (as TRL does)."""
    safe_low = jnp.minimum(x, _LOG_HALF)
    safe_high = jnp.clip(x, _LOG_HALF, -1e-30)
    return jnp.where(x < _LOG_HALF, jnp.log1p(-jnp.exp(safe_low)), jnp.log(-jnp.expm1(safe_high)))


def odds_ratio(chosen_mean_logp_B: jax.Array, rejected_mean_logp_B: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(log sigmoid(log odds ratio), log odds ratio) per pair."""
    log_odds_B = (chosen_mean_logp_B - rejected_mean_logp_B) - (
        log1mexp(chosen_mean_logp_B) - log1mexp(rejected_mean_logp_B)
    )
    return jax.nn.log_sigmoid(log_odds_B), log_odds_B


def orpo_sums(model, params: Any, batch: Mapping[str, Any], rng: jax.Array, reference: Any = None, *, beta: float):
    """Pair-weighted sums over one micro-batch (module docstring); `reference` is unused."""
    del reference
    n = batch["weights"].shape[0]
    both = jax.tree.map(lambda c, r: jnp.concatenate([c, r]), dict(batch["chosen"]), dict(batch["rejected"]))
    logits_BTV = model.apply(
        {"params": params},
        both["input_ids"],
        segment_ids=both["segment_ids"],
        positions=both["positions"],
        output="logits",
        rngs={"dropout": rng},
    ).astype(jnp.float32)
    logps_BT = -optax.softmax_cross_entropy_with_integer_labels(logits_BTV, both["targets"])
    response_BT = both["weights"].astype(jnp.float32)
    mean_logp_2B = jnp.sum(logps_BT * response_BT, -1) / nonzero(jnp.sum(response_BT, -1))
    attended_BT = (both["segment_ids"][:n] > 0).astype(jnp.float32)
    nll_B = -jnp.sum(logps_BT[:n] * attended_BT, -1) / nonzero(jnp.sum(attended_BT, -1))
    ratio_B, log_odds_B = odds_ratio(mean_logp_2B[:n], mean_logp_2B[n:])
    losses_B = nll_B - beta * ratio_B
    w_B = batch["weights"].astype(jnp.float32)

    def wsum(x_B):
        return jnp.sum(w_B * jax.lax.stop_gradient(x_B))

    chosen_reward_B, rejected_reward_B = beta * mean_logp_2B[:n], beta * mean_logp_2B[n:]
    return {
        "loss_sum": jnp.sum(w_B * losses_B),
        "weight_sum": jnp.sum(w_B),
        "nll_sum": wsum(nll_B),
        "log_odds_ratio_sum": wsum(ratio_B),
        "log_odds_chosen_sum": wsum(log_odds_B),
        "accuracy_sum": wsum((chosen_reward_B > rejected_reward_B).astype(jnp.float32)),
        "chosen_reward_sum": wsum(chosen_reward_B),
        "rejected_reward_sum": wsum(rejected_reward_B),
        "tokens": jnp.sum(both["segment_ids"] > 0).astype(jnp.float32),
    }


def summarize(totals: Mapping[str, Any]) -> dict[str, Any]:
    """Pair-weighted means, named as TRL's ORPOTrainer logs them (without its prefixes)."""
    pairs = nonzero(totals["weight_sum"])
    return {
        "loss": totals["loss_sum"] / pairs,
        "nll_loss": totals["nll_sum"] / pairs,
        "log_odds_ratio": totals["log_odds_ratio_sum"] / pairs,
        "log_odds_chosen": totals["log_odds_chosen_sum"] / pairs,
        "reward_accuracy": totals["accuracy_sum"] / pairs,
        "chosen_reward": totals["chosen_reward_sum"] / pairs,
        "rejected_reward": totals["rejected_reward_sum"] / pairs,
        "reward_margin": (totals["chosen_reward_sum"] - totals["rejected_reward_sum"]) / pairs,
        "pairs": totals["weight_sum"],
        "tokens": totals["tokens"],
    }


def objective(beta: float) -> Objective:
    """ORPO with odds-ratio weight `beta` (TRL's `beta`, the paper's lambda)."""
    if not beta > 0:
        raise ValueError(f"training.orpo_beta must be > 0, got {beta}")

    def sums(model, params, batch, rng, reference=None):
        return orpo_sums(model, params, batch, rng, reference, beta=beta)

    return Objective("orpo", sums, summarize, SUM_KEYS, BATCH_KEYS)


def build(spec, model) -> Built:
    """ORPO for a run: beta from `training.orpo_beta`; no reference model, so no copy for any method."""
    del model
    return Built(objective(spec.training.orpo_beta))


RECORD = Registered("orpo", build, sequences_per_example=2)
