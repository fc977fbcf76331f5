"""Supervised fine-tuning: weighted next-token cross-entropy over a causal LM's packed rows.

A batch is the data pipeline's packed layout (data/pack.py): input_ids, targets, weights,
segment_ids, positions, each [B, T]. The step's loss is sum(weight * token loss) / sum(weight)
over every token of the optimizer step.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ftc.backends.jax.objectives.contract import Built, Objective, Registered, nonzero

BATCH_KEYS = ("input_ids", "targets", "weights", "segment_ids", "positions")
SUM_KEYS = ("loss_sum", "weight_sum", "correct_sum", "tokens")


def cross_entropy_and_hits(logits_BTV: jax.Array, targets_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Token cross-entropy (optax's formula: log-sum-exp minus the target's logit) and whether the
    target is the top prediction (1.0 / 0.0). Both read one max over the vocabulary: an argmax is
    a second full pass over [tokens, vocab] logits (about 4% of a CPU step in bench/). A target tied
    with another token for the top logit counts as a hit."""
    max_BT = jax.lax.stop_gradient(jnp.max(logits_BTV, axis=-1))
    target_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
    lse_BT = jnp.log(jnp.sum(jnp.exp(logits_BTV - max_BT[..., None]), axis=-1)) + max_BT
    return lse_BT - target_BT, (target_BT >= max_BT).astype(jnp.float32)


def causal_lm_sums(
    model: nn.Module, params: Any, batch: Mapping[str, jax.Array], rng: jax.Array, reference: Any = None
) -> dict[str, jax.Array]:
    """Sums over one micro-batch: weighted token cross-entropy (float32), total weight, weighted
    correct next-token predictions, and real (non-padding) tokens. (`reference` is unused.)"""
    logits_BTV = model.apply(
        {"params": params},
        batch["input_ids"],
        segment_ids=batch["segment_ids"],
        positions=batch["positions"],
        output="logits",
        rngs={"dropout": rng},
    )
    return lm_sums(logits_BTV, batch)


def lm_sums(logits_BTV: jax.Array, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """`causal_lm_sums` from the logits of the batch's rows."""
    logits_BTV = logits_BTV.astype(jnp.float32)
    targets_BT = batch["targets"]
    weights_BT = batch["weights"].astype(jnp.float32)
    losses_BT, correct_BT = cross_entropy_and_hits(logits_BTV, targets_BT)
    return {
        "loss_sum": jnp.sum(losses_BT * weights_BT),
        "weight_sum": jnp.sum(weights_BT),
        "correct_sum": jnp.sum(correct_BT * weights_BT),
        "tokens": jnp.sum(batch["segment_ids"] > 0).astype(jnp.float32),
    }


def causal_lm_summary(totals: Mapping[str, Any]) -> dict[str, Any]:
    w = totals["weight_sum"]
    return {
        "loss": totals["loss_sum"] / nonzero(w),
        "token_accuracy": totals["correct_sum"] / nonzero(w),
        "tokens": totals["tokens"],
        "loss_weight": w,
    }


CAUSAL_LM = Objective("sft", causal_lm_sums, causal_lm_summary, SUM_KEYS, BATCH_KEYS, perplexity=True)


def build(spec, model) -> Built:
    moe = getattr(model.arch, "moe", None)
    if moe is None:
        return Built(CAUSAL_LM)
    from ftc.backends.jax.objectives import router_aux  # imports this module

    return Built(router_aux.causal_lm_with_router_aux(router_aux.coefficient(spec, moe)))


RECORD = Registered("sft", build)
