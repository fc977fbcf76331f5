"""Direct preference optimisation (Rafailov et al. 2023) as an `Objective` (objectives/contract.py).

A batch holds preference pairs (data_pack.pad_pairs): `chosen` and `rejected` are causal-LM rows
[B, T] (prompt with weight 0, response with weight 1) and `weights` [B] is 1 for a real pair, 0
for a padding row. Per pair i:

    log pi(y | x) = sum_t weights[t] * log p(targets[t] | input_ids[:t + 1])    (response tokens)
    chosen reward   c_i = beta * (log pi(chosen)   - log pi_ref(chosen))
    rejected reward r_i = beta * (log pi(rejected) - log pi_ref(rejected))
    d_i = (c_i - r_i) / beta                      (the log-ratio margin)

and `loss_type` (TRL's names and formulas, TRL 1.16 DPOTrainer):
    sigmoid  -log sigmoid(beta d_i)                                     (the paper; no smoothing)
    hinge    max(0, 1 - beta d_i)                                       (SLiC)
    ipo      (d_i' - 1 / (2 beta))^2, d_i' the margin of per-token means: each side's log-ratio
             divided by its response token count (TRL's length normalisation, from the IPO authors)
    robust   (-(1 - e) log sigmoid(beta d_i) + e log sigmoid(-beta d_i)) / (1 - 2e),
             e = label_smoothing in [0, 0.5): the share of pairs assumed flipped (Chowdhury et al.)

The step's loss is
sum_i w_i loss_i / sum_i w_i over every pair of the optimizer step, so splitting a batch into
micro-batches or over devices changes nothing. Metrics are pair-weighted means: reward accuracy
(c_i > r_i), reward margin (c_i - r_i), chosen / rejected rewards and policy log-probs.

The reference model pi_ref is either
  - `reference_params(params)`: for LoRA / QLoRA / adapters, the same parameters with the method
    disabled (methods.disabled_params: trainable leaves zeroed), so no second copy of the base; or
  - the train state's frozen copy of the starting parameters (train/step.py REFERENCE), for a full
    fine-tune: one extra parameter-sized buffer.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from ftc.backends.jax.methods import base as methods
from ftc.backends.jax.objectives.contract import Built, Objective, Registered, nonzero

SUM_KEYS = (
    "loss_sum",
    "weight_sum",
    "accuracy_sum",
    "margin_sum",
    "chosen_reward_sum",
    "rejected_reward_sum",
    "chosen_logp_sum",
    "rejected_logp_sum",
    "tokens",
)
BATCH_KEYS = ("chosen", "rejected", "weights")
LOSS_TYPES = ("sigmoid", "hinge", "ipo", "robust")


def pair_losses(
    chosen_ratio_B: jax.Array,
    rejected_ratio_B: jax.Array,
    chosen_tokens_B: jax.Array,
    rejected_tokens_B: jax.Array,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> jax.Array:
    """[B] per-pair losses from the policy-minus-reference log-ratios of each side (see module
    docstring); the token counts are each side's response tokens (ipo only)."""
    delta_B = chosen_ratio_B - rejected_ratio_B
    if loss_type == "sigmoid":
        return -jax.nn.log_sigmoid(beta * delta_B)
    if loss_type == "hinge":
        return jax.nn.relu(1.0 - beta * delta_B)
    if loss_type == "ipo":
        mean_delta_B = chosen_ratio_B / jnp.maximum(chosen_tokens_B, 1.0) - rejected_ratio_B / jnp.maximum(
            rejected_tokens_B, 1.0
        )
        return (mean_delta_B - 1.0 / (2.0 * beta)) ** 2
    if loss_type == "robust":
        e = label_smoothing
        clean_B = -(1.0 - e) * jax.nn.log_sigmoid(beta * delta_B)
        flipped_B = -e * jax.nn.log_sigmoid(-beta * delta_B)
        return (clean_B - flipped_B) / (1.0 - 2.0 * e)
    raise ValueError(f"training.dpo_loss_type={loss_type!r}: expected one of {', '.join(LOSS_TYPES)}")


def sequence_logps(model: nn.Module, params: Any, rows: Mapping[str, jax.Array], rng: jax.Array) -> jax.Array:
    """[B] summed log-probabilities of each row's weighted (response) targets, in float32."""
    logits_BTV = model.apply(
        {"params": params},
        rows["input_ids"],
        segment_ids=rows["segment_ids"],
        positions=rows["positions"],
        output="logits",
        rngs={"dropout": rng},
    ).astype(jnp.float32)
    logps_BT = -optax.softmax_cross_entropy_with_integer_labels(logits_BTV, rows["targets"])
    return jnp.sum(logps_BT * rows["weights"].astype(jnp.float32), axis=-1)


def dpo_sums(
    model: nn.Module,
    params: Any,
    batch: Mapping[str, Any],
    rng: jax.Array,
    reference: Any = None,
    *,
    beta: float,
    reference_params: Callable[[Any], Any] | None = None,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> dict[str, jax.Array]:
    """Pair-weighted sums over one micro-batch (see module docstring). `reference` is the state's
    frozen copy, used when `reference_params` is None."""
    if reference_params is not None:
        reference = reference_params(params)
    if reference is None:
        raise ValueError(
            "DPO needs a reference model: give reference_params, or a train state built with "
            "init_state(..., reference=True)"
        )
    n = batch["weights"].shape[0]
    # Chosen and rejected rows go through the model as one [2B, T] batch.
    both = jax.tree.map(lambda c, r: jnp.concatenate([c, r]), dict(batch["chosen"]), dict(batch["rejected"]))
    policy_2B = sequence_logps(model, params, both, rng)
    ref_2B = jax.lax.stop_gradient(sequence_logps(model, jax.lax.stop_gradient(reference), both, rng))
    chosen_B, rejected_B = policy_2B[:n], policy_2B[n:]
    chosen_reward_B = beta * (chosen_B - ref_2B[:n])
    rejected_reward_B = beta * (rejected_B - ref_2B[n:])
    margin_B = chosen_reward_B - rejected_reward_B
    tokens_2B = jnp.sum(both["weights"].astype(jnp.float32), axis=-1)
    losses_B = pair_losses(
        chosen_B - ref_2B[:n],
        rejected_B - ref_2B[n:],
        tokens_2B[:n],
        tokens_2B[n:],
        beta=beta,
        loss_type=loss_type,
        label_smoothing=label_smoothing,
    )
    w_B = batch["weights"].astype(jnp.float32)

    def wsum(x_B):
        return jnp.sum(w_B * x_B)

    return {
        "loss_sum": wsum(losses_B),
        "weight_sum": jnp.sum(w_B),
        "accuracy_sum": wsum((chosen_reward_B > rejected_reward_B).astype(jnp.float32)),
        "margin_sum": wsum(jax.lax.stop_gradient(margin_B)),
        "chosen_reward_sum": wsum(jax.lax.stop_gradient(chosen_reward_B)),
        "rejected_reward_sum": wsum(jax.lax.stop_gradient(rejected_reward_B)),
        "chosen_logp_sum": wsum(jax.lax.stop_gradient(chosen_B)),
        "rejected_logp_sum": wsum(jax.lax.stop_gradient(rejected_B)),
        "tokens": (jnp.sum(both["segment_ids"] > 0)).astype(jnp.float32),
    }


def summarize(totals: Mapping[str, Any]) -> dict[str, Any]:
    """Pair-weighted means from sums over a step or a validation pass."""
    pairs = nonzero(totals["weight_sum"])
    return {
        "loss": totals["loss_sum"] / pairs,
        "reward_accuracy": totals["accuracy_sum"] / pairs,
        "reward_margin": totals["margin_sum"] / pairs,
        "chosen_reward": totals["chosen_reward_sum"] / pairs,
        "rejected_reward": totals["rejected_reward_sum"] / pairs,
        "chosen_logp": totals["chosen_logp_sum"] / pairs,
        "rejected_logp": totals["rejected_logp_sum"] / pairs,
        "pairs": totals["weight_sum"],
        "tokens": totals["tokens"],
    }


def objective(
    beta: float,
    reference_params: Callable[[Any], Any] | None = None,
    *,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> Objective:
    """The DPO objective with temperature `beta` and `loss_type`. Without `reference_params` the
    train state must carry the frozen reference (train/step.py `init_state(..., reference=True)`)."""
    if not beta > 0:
        raise ValueError(f"training.dpo_beta must be > 0, got {beta}")
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"training.dpo_loss_type={loss_type!r}: expected one of {', '.join(LOSS_TYPES)}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"training.dpo_label_smoothing must be in [0, 0.5), got {label_smoothing}")

    def sums(model, params, batch, rng, reference=None):
        return dpo_sums(
            model,
            params,
            batch,
            rng,
            reference,
            beta=beta,
            reference_params=reference_params,
            loss_type=loss_type,
            label_smoothing=label_smoothing,
        )

    return Objective("dpo", sums, summarize, SUM_KEYS, BATCH_KEYS)


def build(spec, model) -> Built:
    """DPO for a run: beta from `training.dpo_beta`; the reference is the starting model. For lora /
    qlora / adapter with fresh weights the same parameters with the method disabled (no second copy
    of the base); for a full fine-tune, or a method starting from trained weights (`init_from` an
    adapter or a run of the method: TRL copies the adapter as its reference), a frozen copy of the
    starting parameters, one extra parameter-sized buffer (the plan counts it)."""
    from ftc.backends.jax.state.init_from import reference_copy_needed  # state imports train, which imports us

    t = spec.training
    options = {"loss_type": t.dpo_loss_type or "sigmoid", "label_smoothing": t.dpo_label_smoothing or 0.0}
    if reference_copy_needed(spec, model):
        return Built(objective(t.dpo_beta, **options), reference_copy=True)
    disabled = lambda params: methods.disabled_params(model, params)  # noqa: E731
    return Built(objective(t.dpo_beta, reference_params=disabled, **options))


RECORD = Registered("dpo", build, sequences_per_example=2, reference_forward=True)
