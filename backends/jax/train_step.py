"""The jitted train and eval steps.

Train state is a plain dict pytree: {"step": int32[], "params": tree, "opt_state": tree,
"rng": uint32[2]}. A batch for one optimizer step is a dict of [accum, micro, T] arrays
(input_ids, targets, weights, segment_ids, positions); micro-batches are scanned.

The loss is token-weighted over the whole optimizer step: sum(weight * token loss) over every
micro-batch, divided once by the total weight. So a batch split into 4 micro-batches, packed
or spread over data-parallel devices gives the same loss and gradient as one full batch (up to
float reassociation) -- unlike averaging per micro-batch.
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

from ftc.backends.jax import mesh as mesh_lib
from ftc.backends.jax.optimizer import merge_params, split_params
from ftc.backends.jax.shapes import path_str

BATCH_KEYS = ("input_ids", "targets", "weights", "segment_ids", "positions")
SUM_KEYS = ("loss_sum", "weight_sum", "correct_sum", "tokens")


class NonFiniteLossError(RuntimeError):
    pass


# ------------------------------------------------------------------ loss


def causal_lm_sums(model: nn.Module, params: Any, batch: Mapping[str, jax.Array], rng: jax.Array
                   ) -> dict[str, jax.Array]:
    """Sums over one micro-batch: weighted token cross-entropy (float32), total weight, weighted
    correct next-token predictions, and real (non-padding) tokens."""
    logits_BTV = model.apply(
        {"params": params}, batch["input_ids"], segment_ids=batch["segment_ids"],
        positions=batch["positions"], output="logits", rngs={"dropout": rng},
    )
    logits_BTV = logits_BTV.astype(jnp.float32)
    targets_BT = batch["targets"]
    weights_BT = batch["weights"].astype(jnp.float32)
    losses_BT = optax.softmax_cross_entropy_with_integer_labels(logits_BTV, targets_BT)
    correct_BT = (jnp.argmax(logits_BTV, axis=-1) == targets_BT).astype(jnp.float32)
    return {
        "loss_sum": jnp.sum(losses_BT * weights_BT),
        "weight_sum": jnp.sum(weights_BT),
        "correct_sum": jnp.sum(correct_BT * weights_BT),
        "tokens": jnp.sum(batch["segment_ids"] > 0).astype(jnp.float32),
    }


LossSums = Callable[[nn.Module, Any, Mapping[str, jax.Array], jax.Array], dict]


# ------------------------------------------------------------------ state


def init_state(params: Any, tx: optax.GradientTransformation, mask: Any, seed: int) -> dict:
    trainable, _ = split_params(params, mask)
    return {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "opt_state": tx.init(trainable),
        "rng": jax.random.PRNGKey(seed),
    }


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

    return {
        "step": mesh_lib.replicated(mesh),
        "params": params_sh,
        "opt_state": jax.tree_util.tree_map_with_path(opt_leaf, abstract_state["opt_state"]),
        "rng": mesh_lib.replicated(mesh),
    }


def abstract_state(abstract_params: Any, tx: optax.GradientTransformation, mask: Any, shardings: dict | None = None
                   ) -> dict:
    """The train state as ShapeDtypeStructs (with shardings when given): a restore target."""
    shapes = jax.eval_shape(lambda p: init_state(p, tx, mask, 0), abstract_params)
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

    def put_train_batch(self, batch: Mapping[str, np.ndarray]) -> dict:
        """[B, T] host arrays -> [accum, B / accum, T] device arrays."""
        a = self.accum_steps
        shaped = {k: np.asarray(v).reshape((a, v.shape[0] // a) + v.shape[1:]) for k, v in batch.items()
                  if k in BATCH_KEYS}
        return mesh_lib.put_batch(shaped, self.train_batch_sharding)

    def put_eval_batch(self, batch: Mapping[str, np.ndarray]) -> dict:
        return mesh_lib.put_batch({k: v for k, v in batch.items() if k in BATCH_KEYS}, self.eval_batch_sharding)


def build_steps(
    model: nn.Module,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    mask: Any,
    mesh: Mesh,
    state_sh: dict,
    *,
    accum_steps: int,
    loss_sums: LossSums = causal_lm_sums,
) -> Steps:
    """Jit the train step (state donated, explicit in/out shardings) and the eval step."""
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
                sums = loss_sums(model, merge_params(tr, frozen, mask), micro_batch, jax.random.fold_in(rng, i))
                return sums["loss_sum"], sums

            (_, sums), grads = jax.value_and_grad(loss, has_aux=True)(trainable)
            grads_acc = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grads_acc, grads)
            sums_acc = {k: sums_acc[k] + sums[k] for k in SUM_KEYS}
            return (grads_acc, sums_acc), None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), trainable)
        sums0 = {k: jnp.zeros((), jnp.float32) for k in SUM_KEYS}
        (grads, sums), _ = jax.lax.scan(micro, (zeros, sums0), (batch, jnp.arange(accum_steps)))
        denom = jnp.maximum(sums["weight_sum"], 1e-8)
        grads = jax.tree.map(lambda g: g / denom, grads)
        grad_norm = optax.global_norm(grads)
        updates, opt_state = tx.update(grads, state["opt_state"], trainable)
        new_trainable = optax.apply_updates(trainable, updates)
        # Frozen leaves are passed through untouched, so they stay bitwise equal.
        new_params = merge_params(new_trainable, frozen, mask)
        metrics = {
            "loss": sums["loss_sum"] / denom,
            "token_accuracy": sums["correct_sum"] / denom,
            "tokens": sums["tokens"],
            "loss_weight": sums["weight_sum"],
            "grad_norm": grad_norm,
            "learning_rate": jnp.asarray(schedule(state["step"]), jnp.float32),
        }
        new_state = {"step": state["step"] + 1, "params": new_params, "opt_state": opt_state, "rng": state["rng"]}
        return new_state, metrics

    def eval_step(state: dict, batch: dict) -> dict:
        return loss_sums(model, state["params"], batch, state["rng"])

    train_batch_tree = {k: train_batch_sh for k in BATCH_KEYS}
    eval_batch_tree = {k: eval_batch_sh for k in BATCH_KEYS}
    train = jax.jit(train_step, in_shardings=(state_sh, train_batch_tree),
                    out_shardings=(state_sh, replicated), donate_argnums=(0,))
    evaluate = jax.jit(eval_step, in_shardings=(state_sh, eval_batch_tree), out_shardings=replicated)
    return Steps(train, evaluate, state_sh, train_batch_sh, eval_batch_sh, accum_steps)


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


def eval_summary(sums: Mapping[str, float]) -> dict[str, float]:
    """Token-weighted validation metrics from summed eval-step outputs."""
    w = max(sums["weight_sum"], 1e-8)
    loss = sums["loss_sum"] / w
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),
        "token_accuracy": sums["correct_sum"] / w,
        "tokens": sums["tokens"],
        "loss_weight": sums["weight_sum"],
    }


def evaluate(steps: Steps, state: dict, batches) -> dict[str, float]:
    """Run the eval step over an iterable of host batches and return token-weighted metrics."""
    total = {k: 0.0 for k in SUM_KEYS}
    for batch in batches:
        out = host_metrics(steps.eval(state, steps.put_eval_batch(batch)))
        for k in SUM_KEYS:
            total[k] += out[k]
    return eval_summary(total)
