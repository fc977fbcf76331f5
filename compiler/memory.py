"""Per-device memory estimate of a plan: parameters, gradients, optimizer state, activations and
an objective's frozen reference copy, from the planned parameters' shapes and partitions."""

from __future__ import annotations

import dataclasses
import math

from ftc.compiler import sharding_rules

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1, "uint8": 1, "int32": 4, "int4": 0.5}


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per device. Activations are an estimate for one micro-batch (see activation_bytes).
    `reference`: an objective that keeps a frozen copy of the starting parameters (DPO of a full
    fine-tune)."""

    params: int
    grads: int
    optimizer: int
    activations: int
    reference: int = 0

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.activations + self.reference


def _nbytes(p, mesh_shape, dtype: str | None = None) -> float:
    return math.prod(p.shape) * DTYPE_BYTES[dtype or p.dtype] / sharding_rules.shard_factor(p.partition, mesh_shape)


def estimate(params, model, batch, spec, mesh_shape, objective) -> MemoryEstimate:
    """`params`: the plan's ParamPlans; `model`: its ModelSummary; `batch`: its BatchGeometry;
    `objective`: the plan.ObjectiveCost of the spec's objective."""
    param_bytes = sum(_nbytes(p, mesh_shape) for p in params)
    trainable = [p for p in params if p.trainable]
    grad_bytes = sum(_nbytes(p, mesh_shape) for p in trainable)
    if batch.accum_steps > 1:
        grad_bytes *= 2  # the running sum over micro-batches and one micro-batch's gradient
    # DPO runs a pair's chosen and rejected rows as one batch: twice the sequences per micro-batch.
    activations = activation_bytes(model, batch, spec, mesh_shape) * objective.sequences_per_example
    return MemoryEstimate(
        params=int(param_bytes),
        grads=int(grad_bytes),
        optimizer=int(sum(_optimizer_bytes(p, spec.training.optimizer, mesh_shape) for p in trainable)),
        activations=int(activations),
        reference=int(param_bytes) if objective.reference_copy else 0,
    )


def _optimizer_bytes(p, opt, mesh_shape) -> float:
    full = _nbytes(p, mesh_shape, "float32")
    if opt.kind == "adamw":
        return 2 * full
    if opt.kind == "sgd":
        return full if opt.momentum else 0.0
    # adafactor (optax defaults): the two largest dims factored when both are >= 128, no momentum.
    dims = sorted(p.shape)[-2:]
    if len(dims) == 2 and dims[0] >= 128:
        return full / dims[1] + full / dims[0]
    return full


def activation_bytes(model, batch, spec, mesh_shape) -> float:
    """Rough bytes kept for the backward pass of one micro-batch on one device.

    Per token per layer, in compute-dtype elements (t = tensor-parallel size):
      none: norms and residuals 4h, q/k/v/o h+2kv+h, attention's log-sum-exp N/t (float32), mlp
      4I/t;  dots: only matmul outputs (2h + 2kv + 3I/t);  full: only the layer input h, plus
      one layer's worth recomputed during the backward pass.
    Attention keeps no [T, T] probabilities: every kernel a training step runs (blockwise, cuDNN;
    models/attention.py) recomputes them from the log-sum-exp in the backward pass. Logits (and
    their float32 log-softmax) dominate at large vocabularies and are counted once.
    """
    t = mesh_shape["tensor"]
    tokens = batch.micro_batch_per_device * batch.seq_len
    h, kv, inter = model.hidden, model.kv_heads * model.head_dim, model.intermediate
    c = DTYPE_BYTES[spec.model.dtype]
    lse = model.heads / t * 4 / c  # float32, in compute-dtype elements
    per_layer_none = 4 * h + (2 * h + 2 * kv) / t + lse + 4 * inter / t
    remat = spec.training.remat
    if remat == "full":
        per_token = h * model.layers + per_layer_none
    elif remat == "dots":
        per_token = (2 * h + (2 * kv + 3 * inter) / t) * model.layers
    else:
        per_token = per_layer_none * model.layers
    logits = tokens * model.vocab / t * (c + 4 + 4)  # logits, float32 copy, its gradient
    return tokens * per_token * c + logits
