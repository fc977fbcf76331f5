"""The jitted train and eval steps.

Train state is a plain dict pytree: {"step": int32[], "params": tree, "opt_state": tree,
"rng": uint32[2]} plus, for objectives that compare against a frozen copy of the starting
parameters (DPO of a full fine-tune), "reference": tree. A batch for one optimizer step is a
tree of [accum, micro, ...] arrays (the data pipeline's batch, see data.py); micro-batches are
scanned.

What is computed is an `Objective`: per micro-batch *sums* (e.g. weighted token loss and total
weight), added over every micro-batch of the step, and metrics that are ratios of those totals.
The loss is divided once by the total weight of the whole optimizer step. So a batch split into 4
micro-batches, packed or spread over data-parallel devices gives the same loss and gradient as one
full batch (up to float reassociation) -- unlike averaging per micro-batch.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding

from ftc.backends.jax.train import mesh as mesh_lib
from ftc.backends.jax.train.optimizer import merge_params, split_params
from ftc.backends.jax.models.shapes import path_str

BATCH_KEYS = ("input_ids", "targets", "weights", "segment_ids", "positions")
SUM_KEYS = ("loss_sum", "weight_sum", "correct_sum", "tokens")
REFERENCE = "reference"  # the train-state key of a frozen reference copy of the parameters


class NonFiniteLossError(RuntimeError):
    pass


# ------------------------------------------------------------------ loss


def cross_entropy_and_hits(logits_BTV: jax.Array, targets_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Token cross-entropy (optax's formula: log-sum-exp minus the target's logit) and whether the
    target is the top prediction (1.0 / 0.0). Both read one max over the vocabulary: an argmax is
    a second full pass over [tokens, vocab] logits (about 4% of a CPU step in bench/). A target tied
    with another token for the top logit counts as a hit."""
    max_BT = jax.lax.stop_gradient(jnp.max(logits_BTV, axis=-1))
    target_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
    lse_BT = jnp.log(jnp.sum(jnp.exp(logits_BTV - max_BT[..., None]), axis=-1)) + max_BT
    return lse_BT - target_BT, (target_BT >= max_BT).astype(jnp.float32)


def causal_lm_sums(model: nn.Module, params: Any, batch: Mapping[str, jax.Array], rng: jax.Array,
                   reference: Any = None) -> dict[str, jax.Array]:
    """Sums over one micro-batch: weighted token cross-entropy (float32), total weight, weighted
    correct next-token predictions, and real (non-padding) tokens. (`reference` is unused.)"""
    logits_BTV = model.apply(
        {"params": params}, batch["input_ids"], segment_ids=batch["segment_ids"],
        positions=batch["positions"], output="logits", rngs={"dropout": rng},
    )
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


def nonzero(w):
    """`w`, or 1 where `w` is 0 (a sum over no examples is 0, so the ratio reads 0): arithmetic
    only, so it works on traced arrays and on host floats alike."""
    return w + (w == 0)


def causal_lm_summary(totals: Mapping[str, Any]) -> dict[str, Any]:
    w = totals["weight_sum"]
    return {"loss": totals["loss_sum"] / nonzero(w), "token_accuracy": totals["correct_sum"] / nonzero(w),
            "tokens": totals["tokens"], "loss_weight": w}


LossSums = Callable[..., dict]


@dataclasses.dataclass(frozen=True)
class Objective:
    """What the train and eval steps compute.

    sums(model, params, micro_batch, rng, reference) -> float32 scalar sums over the micro-batch,
        keyed by `sum_keys`; "loss_sum" (the objective summed over examples or tokens) and
        "weight_sum" (what the step's loss is divided by) are required. `reference` is the state's
        frozen reference parameters, or None when the state has none.
    summarize(totals) -> metrics, from the sums added over a whole step or validation pass. Only
        arithmetic, so the same function runs in the jitted step and on host floats.
    batch_keys: the top-level batch keys the steps take (anything else in a host batch is left out).
    """

    name: str
    sums: LossSums
    summarize: Callable[[Mapping[str, Any]], dict]
    sum_keys: tuple[str, ...]
    batch_keys: tuple[str, ...]
    perplexity: bool = False  # validation also reports exp(loss)


CAUSAL_LM = Objective("sft", causal_lm_sums, causal_lm_summary, SUM_KEYS, BATCH_KEYS, perplexity=True)


# ------------------------------------------------------------------ state


def init_state(params: Any, tx: optax.GradientTransformation, mask: Any, seed: int, *,
               reference: bool = False) -> dict:
    """The step-0 state; with `reference`, also a frozen copy of `params` (an extra
    parameter-sized buffer, never updated) under "reference"."""
    trainable, _ = split_params(params, mask)
    state = {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "opt_state": tx.init(trainable),
        "rng": jax.random.PRNGKey(seed),
    }
    if reference:
        state[REFERENCE] = jax.tree.map(jnp.copy, params)
    return state


def state_shardings(mesh: Mesh, abstract_state: dict, partitions: Mapping[str, tuple]) -> dict:
    """NamedShardings for a train state: parameters by the plan; optimizer-state leaves that
    mirror a parameter (same shape, path ending in the parameter's path) like that parameter;
    everything else (counts, factored second moments, step, rng) replicated."""
    params_sh = mesh_lib.params_shardings(mesh, abstract_state["params"], partitions)
    shapes = {path_str(p): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(abstract_state["params"])[0]}

    def opt_leaf(path, leaf):
        name = path_str(path)
        best = None
        for p in partitions:
            if (name == p or name.endswith("/" + p)) and shapes.get(p) == tuple(leaf.shape):
                if best is None or len(p) > len(best):
                    best = p
        return mesh_lib.param_sharding(mesh, partitions[best]) if best else mesh_lib.replicated(mesh)

    out = {
        "step": mesh_lib.replicated(mesh),
        "params": params_sh,
        "opt_state": jax.tree_util.tree_map_with_path(opt_leaf, abstract_state["opt_state"]),
        "rng": mesh_lib.replicated(mesh),
    }
    if REFERENCE in abstract_state:
        out[REFERENCE] = params_sh
    return out


def abstract_state(abstract_params: Any, tx: optax.GradientTransformation, mask: Any, shardings: dict | None = None,
                   *, reference: bool = False) -> dict:
    """The train state as ShapeDtypeStructs (with shardings when given): a restore target."""
    shapes = jax.eval_shape(lambda p: init_state(p, tx, mask, 0, reference=reference), abstract_params)
    if shardings is None:
        return shapes
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


# ------------------------------------------------------------------ steps


@dataclasses.dataclass(frozen=True)
class Steps:
    """The compiled program: jitted train/eval steps plus what feeding them needs."""

    train: Callable[[dict, dict], tuple[dict, dict]]
    eval: Callable[[dict, dict], dict]
    state_shardings: dict
    train_batch_sharding: NamedSharding
    eval_batch_sharding: NamedSharding
    accum_steps: int
    objective: Objective = CAUSAL_LM

    def put_train_batch(self, batch: Mapping[str, Any]) -> dict:
        """[B, ...] host arrays -> [accum, B / accum, ...] device arrays."""
        a = self.accum_steps
        shaped = jax.tree.map(lambda v: np.asarray(v).reshape((a, v.shape[0] // a) + v.shape[1:]),
                              self._keep(batch))
        return _put(shaped, self.train_batch_sharding)

    def put_eval_batch(self, batch: Mapping[str, Any]) -> dict:
        return _put(self._keep(batch), self.eval_batch_sharding)

    def _keep(self, batch: Mapping[str, Any]) -> dict:
        missing = [k for k in self.objective.batch_keys if k not in batch]
        if missing:
            raise KeyError(f"objective {self.objective.name!r} needs batch keys {missing}; the batch has "
                           f"{sorted(batch)}")
        return {k: batch[k] for k in self.objective.batch_keys}


def _put(batch: Any, sharding: NamedSharding) -> Any:
    """A tree of host numpy arrays (this process's rows) -> global jax arrays with `sharding`."""
    return jax.tree.map(lambda v: jax.make_array_from_process_local_data(sharding, np.asarray(v)), batch)


def real_tokens(batch: Any) -> int:
    """Real (non-padding) tokens in a host batch: non-zero `segment_ids` wherever they occur."""
    if isinstance(batch, Mapping):
        return sum(int(np.count_nonzero(v)) if k == "segment_ids" else real_tokens(v) for k, v in batch.items()
                   if k == "segment_ids" or isinstance(v, Mapping))
    return 0


def build_steps(
    model: nn.Module,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    mask: Any,
    mesh: Mesh,
    state_sh: dict,
    *,
    accum_steps: int,
    objective: Objective = CAUSAL_LM,
    eval_model: nn.Module | None = None,
) -> Steps:
    """Jit the train step (state donated, explicit in/out shardings) and the eval step.
    `eval_model` (default `model`) is what the eval step runs: the same parameters without
    training-only randomness (e.g. LoRA dropout: methods.MethodModel.eval_module)."""
    replicated = mesh_lib.replicated(mesh)
    train_batch_sh = mesh_lib.batch_sharding(mesh, leading=1)
    eval_batch_sh = mesh_lib.batch_sharding(mesh)

    def train_step(state: dict, batch: dict) -> tuple[dict, dict]:
        trainable, frozen = split_params(state["params"], mask)
        rng = jax.random.fold_in(state["rng"], state["step"])

        def micro(carry, xs):
            grads_acc, sums_acc = carry
            micro_batch, i = xs

            def loss(tr):
                sums = objective.sums(model, merge_params(tr, frozen, mask), micro_batch, jax.random.fold_in(rng, i),
                                      state.get(REFERENCE))
                return sums["loss_sum"], sums

            (_, sums), grads = jax.value_and_grad(loss, has_aux=True)(trainable)
            grads_acc = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grads_acc, grads)
            sums_acc = {k: sums_acc[k] + sums[k] for k in objective.sum_keys}
            return (grads_acc, sums_acc), None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), trainable)
        sums0 = {k: jnp.zeros((), jnp.float32) for k in objective.sum_keys}
        (grads, sums), _ = jax.lax.scan(micro, (zeros, sums0), (batch, jnp.arange(accum_steps)))
        denom = jnp.maximum(sums["weight_sum"], 1e-8)
        grads = jax.tree.map(lambda g: g / denom, grads)
        grad_norm = optax.global_norm(grads)
        updates, opt_state = tx.update(grads, state["opt_state"], trainable)
        new_trainable = optax.apply_updates(trainable, updates)
        # Frozen leaves are passed through untouched, so they stay bitwise equal.
        new_params = merge_params(new_trainable, frozen, mask)
        metrics = {
            **objective.summarize(sums),
            "grad_norm": grad_norm,
            "learning_rate": jnp.asarray(schedule(state["step"]), jnp.float32),
        }
        new_state = {**state, "step": state["step"] + 1, "params": new_params, "opt_state": opt_state}
        return new_state, metrics

    def eval_step(state: dict, batch: dict) -> dict:
        evaluated = model if eval_model is None else eval_model
        return objective.sums(evaluated, state["params"], batch, state["rng"], state.get(REFERENCE))

    # One sharding for the whole batch tree (a pytree prefix): every leaf splits its batch axis.
    train = jax.jit(train_step, in_shardings=(state_sh, train_batch_sh),
                    out_shardings=(state_sh, replicated), donate_argnums=(0,))
    evaluate = jax.jit(eval_step, in_shardings=(state_sh, eval_batch_sh), out_shardings=replicated)
    return Steps(train, evaluate, state_sh, train_batch_sh, eval_batch_sh, accum_steps, objective)


# ------------------------------------------------------------------ host-side helpers


def host_metrics(metrics: Mapping[str, jax.Array]) -> dict[str, float]:
    return {k: float(v) for k, v in jax.device_get(dict(metrics)).items()}


def check_finite(metrics: Mapping[str, float], step: int) -> None:
    """Stop the run at the first non-finite loss, saying where and what to try."""
    loss = metrics.get("loss")
    if loss is not None and not math.isfinite(loss):
        raise NonFiniteLossError(
            f"training loss is {loss} at step {step} (grad_norm {metrics.get('grad_norm')}, "
            f"learning_rate {metrics.get('learning_rate')}); the run stops here. Try a lower "
            f"training.learning_rate, training.optimizer.grad_clip > 0, or model.dtype = \"float32\"."
        )


def eval_summary(objective: Objective, totals: Mapping[str, float]) -> dict[str, float]:
    """Validation metrics from eval-step sums added over the whole pass (host floats)."""
    out = {k: float(v) for k, v in objective.summarize(totals).items()}
    if objective.perplexity:
        out["perplexity"] = math.exp(min(out["loss"], 700.0))
    return out


def evaluate(steps: Steps, state: dict, batches) -> dict[str, float]:
    """Run the eval step over an iterable of host batches; the metrics are ratios of sums over
    the whole pass (token- or pair-weighted, however the batches are cut)."""
    keys = steps.objective.sum_keys
    total = {k: 0.0 for k in keys}
    for batch in batches:
        out = host_metrics(steps.eval(state, steps.put_eval_batch(batch)))
        for k in keys:
            total[k] += out[k]
    return eval_summary(steps.objective, total)
