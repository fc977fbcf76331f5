"""Per-device memory estimate of a plan: parameters, gradients, optimizer state, activations and
an objective's frozen reference copy, from the planned parameters' shapes and partitions; for an
online RL objective also what one rollout holds (`RolloutShape` -> `RolloutMemory`)."""

from __future__ import annotations

import dataclasses
import math

from ftc.compiler import sharding_rules

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1, "uint8": 1, "int32": 4, "int4": 0.5}


@dataclasses.dataclass(frozen=True)
class RolloutShape:
    """What one rollout of an online RL objective holds, as the backend lays it out (the sampler's
    buckets applied: backends/jax/rl/shape.py). Per-token arrays of the update rows are float32
    [scored_rows, seq_len]: old log-probs always, reference log-probs with a KL term, and
    `per_token_arrays` more (PPO: values, returns, advantages)."""

    sample_rows: int  # rows the sampler decodes at once (the batch bucket)
    cache_slots: int  # prompt bucket + new-token bucket: the KV cache's length
    scored_rows: int  # rollout rows scored and trained on (completions of one rollout)
    seq_len: int  # positions of one scored row: prompt + completion
    reference: bool  # reference log-probs are computed (a KL term)
    per_token_arrays: int = 0  # more float32 [scored_rows, seq_len] arrays (PPO: values, returns, advantages)


@dataclasses.dataclass(frozen=True)
class RolloutMemory:
    """Bytes per device of one rollout (see rollout_memory)."""

    kv_cache: int
    sampler_logits: int
    scoring_logits: int
    per_token: int

    @property
    def total(self) -> int:
        return self.kv_cache + self.sampler_logits + self.scoring_logits + self.per_token


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per device. Activations are an estimate for one micro-batch (see activation_bytes).
    `reference`: an objective that keeps a frozen copy of the starting parameters (DPO of a full
    fine-tune). `rollout`: an online RL objective's rollout, which runs between updates: the peak
    is the parameters, optimizer state and reference plus the larger of update and rollout."""

    params: int
    grads: int
    optimizer: int
    activations: int
    reference: int = 0
    rollout: RolloutMemory | None = None

    @property
    def update(self) -> int:
        return self.grads + self.activations

    @property
    def total(self) -> int:
        held = self.params + self.optimizer + self.reference
        return held + max(self.update, self.rollout.total if self.rollout else 0)


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
        rollout=None if objective.rollout is None else rollout_memory(model, objective.rollout, spec, mesh_shape),
    )


def rollout_memory(model, shape: RolloutShape, spec, mesh_shape) -> RolloutMemory:
    """Bytes per device of one rollout of `shape` (a RolloutShape) for the ModelSummary `model`:

    kv_cache        2 (keys, values) x layers x sample_rows x cache_slots x kv_heads x head_dim
                    in the compute dtype; rows split over data x fsdp and kv heads over tensor
                    where they divide (as the sampler shards its cache)
    sampler_logits  one decode step's logits [sample_rows, vocab]: compute dtype + a float32 copy
    scoring_logits  the pass that scores the rollout (old, and reference, log-probs): logits of
                    every position [scored_rows, seq_len, vocab] in the compute dtype, their float32
                    log-softmax and its exp (entropy); counted whole on each device (its rows
                    arrive unsharded)
    per_token       float32 [scored_rows, seq_len] arrays: old log-probs, reference log-probs (with
                    a KL term) and `per_token_arrays` more
    """
    c = DTYPE_BYTES[spec.model.dtype]
    rows_split = sharding_rules.batch_shards(mesh_shape)
    rows = shape.sample_rows / (rows_split if shape.sample_rows % rows_split == 0 else 1)
    t = mesh_shape.get("tensor", 1)
    kv_heads = model.kv_heads / (t if model.kv_heads % t == 0 else 1)
    kv = 2 * model.layers * rows * shape.cache_slots * kv_heads * model.head_dim * c
    sampler_logits = rows * model.vocab * (c + 4)
    positions = shape.scored_rows * shape.seq_len
    scoring = positions * model.vocab * (c + 4 + 4)
    arrays = 1 + int(shape.reference) + shape.per_token_arrays
    return RolloutMemory(int(kv), int(sampler_logits), int(scoring), int(positions * 4 * arrays))


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


# Rows a token's top-k experts compute, per routed (token, expert) pair: on CPU the experts run on
# blocks of about half an expert's average share, one expert each (models/moe.py), so up to half a
# block of padding per expert: about 1.5 rows a pair. ragged_dot (GPU/TPU) pads none: an over-count there.
MOE_ROWS_PER_PAIR = 1.5


def _moe_mlp(model, t: int) -> tuple[float, float]:
    """(none, dots) elements kept per token per layer by an MoE block (routed experts, the shared
    expert, float32 router probabilities). Per routed row: the gathered input and the output rows
    2h, and 8F of the expert's gate, up, product and their cotangents live in the backward pass at
    once: fitted to XLA's compiled figure on Mixtral / Qwen2-MoE / Qwen3-MoE shapes (bench/README.md,
    "MoE activation estimate"); with dots remat, the rows' matmul outputs 3F."""
    rows = MOE_ROWS_PER_PAIR * model.experts_per_token
    f, fs = model.expert_intermediate or model.intermediate, model.shared_intermediate
    router = 2 * model.experts  # logits and probabilities
    none = rows * (2 * model.hidden + 8 * f / t) + 3 * fs / t + router
    dots = rows * 3 * f / t + 3 * fs / t + router
    return none, dots


def activation_bytes(model, batch, spec, mesh_shape) -> float:
    """Rough bytes kept for the backward pass of one micro-batch on one device.

    Per token per layer, in compute-dtype elements (t = tensor-parallel size):
      none: the block's input and norm outputs and the mid-block residual 4h, q/k/v h+2kv,
      attention's output 2h (the kernel's and o_proj's input), its log-sum-exp N/t (float32), the
      MLP's gate, up and their product 3I/t (norm statistics and activation intermediates are
      recomputed, models/layers.py `recomputed`);  dots: only matmul outputs (2h + 2kv + 3I/t);
      full: only the layer input h, plus one layer's worth recomputed during the backward pass.
    Attention keeps no [T, T] probabilities: every kernel a training step runs (blockwise, cuDNN;
    models/attention.py) recomputes them from the log-sum-exp in the backward pass. Logits (and
    their float32 log-softmax) dominate at large vocabularies and are counted once.
    """
    t = mesh_shape["tensor"]
    tokens = batch.micro_batch_per_device * batch.seq_len
    h, kv, inter = model.hidden, model.kv_heads * model.head_dim, model.intermediate
    c = DTYPE_BYTES[spec.model.dtype]
    lse = model.heads / t * 4 / c  # float32, in compute-dtype elements
    mlp_none, mlp_dots = 3 * inter / t, 3 * inter / t
    if model.experts:
        mlp_none, mlp_dots = _moe_mlp(model, t)
    per_layer_none = 4 * h + (3 * h + 2 * kv) / t + lse + mlp_none
    remat = spec.training.remat
    if remat == "full":
        per_token = h * model.layers + per_layer_none
    elif remat == "dots":
        per_token = (2 * h + 2 * kv / t + mlp_dots) * model.layers
    else:
        per_token = per_layer_none * model.layers
    logits = tokens * model.vocab / t * (c + 4 + 4)  # logits, float32 copy, its gradient
    return tokens * per_token * c + logits
