"""The MoE router's load-balancing loss as an extra *sum* of the causal-LM objective.

transformers' `load_balancing_loss_func` (Switch Transformer eqs. 4-6) over the layers of one
forward pass:
    aux = E * sum_e (top-k assignments to e / real tokens) * (routing probability of e / real tokens)
with both sums taken over every layer and real (non-padding) token. models/moe.py sows each
layer's sums; `load_balancing_loss` reads them. With `coef` (training.router_aux_loss_coef, or
config.json's router_aux_loss_coef when its output_router_logits is set, transformers' rule) the
objective trains on
    cross-entropy + coef * aux
which is transformers' `outputs.loss` for the same batch. The aux loss is a product of two means,
so it cannot be split into per-token sums: each micro-batch contributes aux * (its loss weight),
and the step divides by the step's total weight like every other sum. One micro-batch per step
gives transformers' loss exactly, at any data/expert parallelism (the forward pass sees the whole
micro-batch); with gradient accumulation the step's aux is the weight-weighted mean of the
micro-batches' (transformers' Trainer also computes it per micro-batch).

Metrics: `loss` stays the language-model cross-entropy (perplexity is computed from it, and it
compares with a dense model's loss), `aux_loss` is the load-balancing loss as transformers reports
it (unscaled), `loss_with_aux` = loss + coef * aux_loss, the quantity that is differentiated.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from ftc.backends.jax.models import moe
from ftc.backends.jax.objectives import sft
from ftc.backends.jax.objectives.contract import Objective, nonzero

SUM_KEYS = sft.SUM_KEYS + ("lm_loss_sum", "aux_loss_sum")


def router_totals(intermediates: Mapping) -> dict[str, jax.Array] | None:
    """The sown router statistics added over every layer (None when the model sowed none)."""
    found = []

    def walk(tree):
        for key, value in tree.items():
            if key == moe.STATS:
                found.extend(value)  # sow keeps a tuple of values; scanned stacks are [L, ...]
            elif isinstance(value, Mapping):
                walk(value)

    walk(intermediates)
    if not found:
        return None
    return {
        "counts": sum(jnp.sum(s["counts"].reshape(-1, s["counts"].shape[-1]), axis=0) for s in found),
        "probs": sum(jnp.sum(s["probs"].reshape(-1, s["probs"].shape[-1]), axis=0) for s in found),
        "tokens": sum(jnp.sum(s["tokens"]) for s in found),
    }


def load_balancing_loss(totals: Mapping[str, jax.Array]) -> jax.Array:
    """transformers' load_balancing_loss_func from the per-layer sums (0 when no real token)."""
    tokens = nonzero(totals["tokens"])
    num_experts = totals["probs"].shape[-1]
    return num_experts * jnp.sum((totals["counts"] / tokens) * (totals["probs"] / tokens))


def coefficient(spec, moe_arch) -> float:
    """training.router_aux_loss_coef, else transformers' rule: config.json's router_aux_loss_coef
    when output_router_logits is set, else 0 (the loss is then only logged)."""
    given = spec.training.router_aux_loss_coef
    if given is not None:
        return float(given)
    return moe_arch.router_aux_loss_coef if moe_arch.output_router_logits else 0.0


def causal_lm_with_router_aux(coef: float) -> Objective:
    """sft's causal-LM objective plus coef * the router's load-balancing loss (module docstring)."""

    def sums(model, params, batch: Mapping[str, jax.Array], rng: jax.Array, reference: Any = None):
        logits_BTV, state = model.apply(
            {"params": params},
            batch["input_ids"],
            segment_ids=batch["segment_ids"],
            positions=batch["positions"],
            output="logits",
            rngs={"dropout": rng},
            mutable=["intermediates"],
        )
        out = sft.lm_sums(logits_BTV, batch)
        totals = router_totals(state.get("intermediates", {}))
        if totals is None:
            raise ValueError("the model sowed no router statistics: not a mixture-of-experts model")
        aux_weighted = load_balancing_loss(totals) * out["weight_sum"]
        return {
            **out,
            "loss_sum": out["loss_sum"] + coef * aux_weighted,
            "lm_loss_sum": out["loss_sum"],
            "aux_loss_sum": aux_weighted,
        }

    def summarize(totals: Mapping[str, Any]) -> dict[str, Any]:
        w = nonzero(totals["weight_sum"])
        return {
            **sft.causal_lm_summary(totals),
            "loss": totals["lm_loss_sum"] / w,
            "aux_loss": totals["aux_loss_sum"] / w,
            "loss_with_aux": totals["loss_sum"] / w,
        }

    return Objective("sft", sums, summarize, SUM_KEYS, sft.BATCH_KEYS, perplexity=True)
