"""The jitted train and eval steps.

Train state is a plain dict pytree: {"step": int32[], "params": tree, "opt_state": tree,
"rng": uint32[2]} plus, for objectives that compare against a frozen copy of the starting
parameters (DPO of a full fine-tune), "reference": tree. A batch for one optimizer step is a
tree of [accum, micro, ...] arrays (the data pipeline's batch, see data/pack.py); micro-batches are
scanned.

What is computed is an `Objective` (objectives/contract.py): per micro-batch *sums*, added over
every micro-batch of the step, and metrics that are ratios of those totals; the loss is divided
once by the total weight of the whole optimizer step.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding

from ftc.backends.jax.models.shapes import path_str
from ftc.backends.jax.objectives.contract import Objective
from ftc.backends.jax.objectives.sft import CAUSAL_LM
from ftc.backends.jax.train import mesh as mesh_lib
from ftc.backends.jax.train.optimizer import merge_params, split_params

REFERENCE = "reference"  # the train-state key of a frozen reference copy of the parameters


class NonFiniteLossError(RuntimeError):
    pass


# ------------------------------------------------------------------ state


def init_state(params: Any, tx: optax.GradientTransformation, mask: Any, seed: int, *, reference: bool = False) -> dict:
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


def abstract_state(
    abstract_params: Any,
    tx: optax.GradientTransformation,
    mask: Any,
    shardings: dict | None = None,
    *,
    reference: bool = False,
) -> dict:
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
        shaped = jax.tree.map(lambda v: np.asarray(v).reshape((a, v.shape[0] // a) + v.shape[1:]), self._keep(batch))
        return _put(shaped, self.train_batch_sharding)

    def put_eval_batch(self, batch: Mapping[str, Any]) -> dict:
        return _put(self._keep(batch), self.eval_batch_sharding)

    def _keep(self, batch: Mapping[str, Any]) -> dict:
        missing = [k for k in self.objective.batch_keys if k not in batch]
        if missing:
            raise KeyError(
                f"objective {self.objective.name!r} needs batch keys {missing}; the batch has {sorted(batch)}"
            )
        return {k: batch[k] for k in self.objective.batch_keys}


def _put(batch: Any, sharding: NamedSharding) -> Any:
    """A tree of host numpy arrays (this process's rows) -> global jax arrays with `sharding`."""
    return jax.tree.map(lambda v: jax.make_array_from_process_local_data(sharding, np.asarray(v)), batch)


def real_tokens(batch: Any) -> int:
    """Real (non-padding) tokens in a host batch: non-zero `segment_ids` wherever they occur."""
    if isinstance(batch, Mapping):
        return sum(
            int(np.count_nonzero(v)) if k == "segment_ids" else real_tokens(v)
            for k, v in batch.items()
            if k == "segment_ids" or isinstance(v, Mapping)
        )
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
                sums = objective.sums(
                    model, merge_params(tr, frozen, mask), micro_batch, jax.random.fold_in(rng, i), state.get(REFERENCE)
                )
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
    train = jax.jit(
        _in_mesh(mesh, train_step),
        in_shardings=(state_sh, train_batch_sh),
        out_shardings=(state_sh, replicated),
        donate_argnums=(0,),
    )
    evaluate = jax.jit(_in_mesh(mesh, eval_step), in_shardings=(state_sh, eval_batch_sh), out_shardings=replicated)
    return Steps(train, evaluate, state_sh, train_batch_sh, eval_batch_sh, accum_steps, objective)


def _in_mesh(mesh: Mesh, fn: Callable) -> Callable:
    """`fn` traced with `mesh` as the context mesh: layers that place work on mesh axes themselves
    (the MoE experts' shard_map, models/moe.py) read it there."""

    def traced(*args):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args)

    traced.__name__ = traced.__qualname__ = fn.__name__  # jit(train_step) in logs, profiles and compile events
    return traced


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
            f'training.learning_rate, training.optimizer.grad_clip > 0, or model.dtype = "float32".'
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
