"""Spec + model facts + device count -> Plan: what a run will do, as pure data.

A Plan holds no arrays and no JAX objects: shapes, counts, byte estimates, batch geometry,
steps, schedule, mesh and one partition per parameter. It serialises to JSON (`to_dict`), prints
(compiler/report.py), and its `fingerprint` names the training program it describes: resume
checks it (with the spec's own keys, RESUMABLE_CHANGES below is the one rule of what may change).

The compiler imports no backend. What it needs of the model, the method and the objective comes
in as data, computed by the backend that runs the plan (backends/jax/pipeline.py `plan_for`):
the parameters' shapes and logical axes (from `jax.eval_shape`, so planning a 70B model
allocates nothing), the family's name, the method's counts, the FLOP count's matmul weights and
what the objective costs. Nothing patches a Plan afterwards.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Callable, Sequence

from ftc.compiler import flops as flops_lib
from ftc.compiler import memory as memory_lib
from ftc.compiler import sharding_rules
from ftc.compiler.memory import MemoryEstimate
from ftc.compiler.model_summary import ModelSummary, model_summary  # part of this module's API
from ftc.compiler.sharding_rules import PlanError

# Spec keys (dotted prefixes) that may change between a checkpoint and the run resuming it:
# they change how long, how often, where to and on what devices, not what the optimizer computes.
# training.micro_batch_size and remat only change memory use: the loss is token-weighted over
# the whole batch. Everything else is training-relevant, and so is everything Plan.fingerprint
# covers (none of it depends on these keys).
RESUMABLE_CHANGES = (
    *("description", "output_dir", "name", "data.validation", "model.init_from"),
    *("training.steps", "training.epochs", "training.eval_every", "training.log_every"),
    *("training.micro_batch_size", "training.remat"),
    *("mesh", "checkpoint", "logging", "export", "eval"),
)


@dataclasses.dataclass(frozen=True)
class ParamInfo:
    """One parameter as the compiler sees it: "/"-joined path, shape, dtype, logical axes."""

    path: str
    shape: tuple[int, ...]
    dtype: str
    axes: tuple[str | None, ...]


@dataclasses.dataclass(frozen=True)
class ParamPlan:
    path: str
    shape: tuple[int, ...]
    dtype: str
    axes: tuple[str | None, ...]
    partition: tuple[str | None, ...]  # mesh axis per dim (None = replicated)
    trainable: bool


@dataclasses.dataclass(frozen=True)
class Counts:
    """What a method counts of its model: the weights it trains, every weight of the model (an NF4
    kernel counts its logical weights), and notes on its settings for the plan to print."""

    total: int
    trainable: int
    notes: tuple[str, ...] = ()
    active: int | None = None  # weights one token runs through (MoE: top-k of the experts); None: total


@dataclasses.dataclass(frozen=True)
class ObjectiveCost:
    """What an objective adds to a step: model rows per example (DPO: chosen and rejected), a
    frozen reference model's forward pass, a frozen reference copy of the parameters (DPO of a
    full fine-tune; a method that can be disabled needs none), and an online RL objective's
    rollout (sampled between updates: its memory is the plan's `memory.rollout`)."""

    sequences_per_example: int = 1
    reference_forward: bool = False
    reference_copy: bool = False
    rollout: memory_lib.RolloutShape | None = None  # online RL: what one rollout holds


@dataclasses.dataclass(frozen=True)
class BatchGeometry:
    global_batch: int  # sequences per optimizer step
    micro_batch: int  # sequences per forward/backward
    accum_steps: int
    seq_len: int
    tokens_per_step: int  # global_batch * seq_len (token slots, padding included)
    micro_batch_per_device: int


@dataclasses.dataclass(frozen=True)
class StepPlan:
    total_steps: int | None  # None: epochs given and the data size is not known yet
    steps_per_epoch: int | None
    epochs: int | None
    note: str


@dataclasses.dataclass(frozen=True)
class SchedulePlan:
    kind: str
    learning_rate: float
    warmup_steps: int | None  # None until total steps are known (warmup_ratio)
    warmup_ratio: float | None
    min_lr_ratio: float


@dataclasses.dataclass(frozen=True)
class OptimizerPlan:
    kind: str
    weight_decay: float
    beta1: float | None
    beta2: float | None
    eps: float | None
    momentum: float | None
    grad_clip: float


@dataclasses.dataclass(frozen=True)
class MeshPlan:
    data: int
    fsdp: int
    tensor: int
    device_count: int
    expert: int = 1

    @property
    def shape(self) -> dict[str, int]:
        return {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor, "expert": self.expert}


@dataclasses.dataclass(frozen=True)
class Plan:
    name: str
    model: ModelSummary
    compute_dtype: str
    param_dtype: str
    remat: str
    method: str
    objective: str
    params: tuple[ParamPlan, ...]
    param_count: int
    trainable_count: int
    memory: MemoryEstimate  # per device
    batch: BatchGeometry
    steps: StepPlan
    schedule: SchedulePlan
    optimizer: OptimizerPlan
    mesh: MeshPlan
    notes: tuple[str, ...]  # parameters left replicated, and other things worth knowing
    flops_per_token: float = 0.0  # model FLOPs to train one token (compiler/flops.py), for MFU
    active_param_count: int | None = None  # MoE: weights one token runs through; None for dense models

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["memory"]["total"] = self.memory.total
        out["fingerprint"] = self.fingerprint()
        return json.loads(json.dumps(out))  # tuples -> lists: plain JSON data

    def fingerprint(self) -> str:
        """sha256 over what a checkpoint's arrays and the step's arithmetic depend on: parameter
        paths/shapes/dtypes/trainability, dtypes, method, objective, global batch and sequence
        length, optimizer. Nothing a RESUMABLE_CHANGES key sets: not the mesh, the step count, the
        micro-batch split nor remat (a run may resume with any of them changed)."""
        b = self.batch
        key = {
            "params": [(p.path, p.shape, p.dtype, p.trainable) for p in self.params],
            "compute_dtype": self.compute_dtype,
            "param_dtype": self.param_dtype,
            "method": self.method,
            "objective": self.objective,
            "batch": {"global_batch": b.global_batch, "seq_len": b.seq_len, "tokens_per_step": b.tokens_per_step},
            "optimizer": dataclasses.asdict(self.optimizer),
        }
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]

    def partitions(self) -> dict[str, tuple[str | None, ...]]:
        return {p.path: p.partition for p in self.params}


# ------------------------------------------------------------------ compile


def compile_plan(
    spec,
    hf_config: dict,
    device_count: int,
    *,
    family: str,
    param_infos: Sequence[ParamInfo],
    trainable: Callable[[str], bool] | None = None,
    counts: Counts | None = None,
    matmul_weights: flops_lib.MatmulWeights | None = None,
    objective: ObjectiveCost = ObjectiveCost(),
    steps_per_epoch: int | None = None,
) -> Plan:
    """The Plan for `spec` (an ftc.spec.Spec) on `device_count` devices.

    hf_config: the base model's config.json as a dict (the architecture numbers the plan prints).
    family: the name of the model family that runs it.
    param_infos: the parameters (after any method transformation), as jax.eval_shape gives them.
    trainable: "/"-joined parameter path -> whether it is trained; default: all (full fine-tune).
    counts: the method's weight counts and notes; default: counted from `param_infos`.
    matmul_weights: what the FLOP count needs to know of the method's weights; default: read
        from `param_infos` (every "kernel" trains or not per `trainable`; no adapter weights).
    objective: what the spec's objective adds to a step (rows, reference forward, reference copy).
    steps_per_epoch: optimizer steps in one pass over the training data, once known.
    Raises ValueError with the spec key at fault when the spec cannot run on this mesh.
    """
    mesh_shape = _resolve_mesh(spec, device_count)
    trainable = trainable or (lambda path: True)
    model = model_summary(hf_config, family)
    sharding_rules.check_expert_axis(model.experts, model.model_type, mesh_shape)

    notes: list[str] = list(counts.notes) if counts else []
    params = []
    for info in param_infos:
        partition, why = sharding_rules.param_partition(info.axes, info.shape, mesh_shape)
        notes += [f"{info.path}: {w}" for w in why]
        params.append(
            ParamPlan(
                info.path,
                tuple(info.shape),
                spec.model.param_dtype if info.dtype in ("float32", "bfloat16", "float16") else info.dtype,
                tuple(info.axes),
                partition,
                bool(trainable(info.path)),
            )
        )
    params = tuple(params)
    if counts is None:
        total = sum(math.prod(p.shape) for p in params)
        inactive = sum(math.prod(p.shape) for p in params if "expert" in p.axes) * (1 - model.active_fraction)
        counts = Counts(total, sum(math.prod(p.shape) for p in params if p.trainable), (), round(total - inactive))
    batch = _batch_geometry(spec, mesh_shape)
    seq_len = batch.seq_len
    learned = [p.shape[p.axes.index("position")] for p in params if "position" in p.axes]
    if learned and seq_len > min(learned):  # a learned position table has no row past its end
        raise PlanError(
            f"model.max_seq_len={seq_len} exceeds the {min(learned)} positions the model's position "
            f"embeddings were trained for (config.json max_position_embeddings / n_positions); "
            f"set model.max_seq_len <= {min(learned)}"
        )
    if model.max_position_embeddings and seq_len > model.max_position_embeddings:  # rotary: it runs
        notes.append(
            f"model.max_seq_len={seq_len} exceeds the model's max_position_embeddings={model.max_position_embeddings}"
        )
    steps = step_plan(spec.training, steps_per_epoch)
    opt = spec.training.optimizer
    if matmul_weights is None:
        matmul_weights = _matmul_weights(params, model)
    flops_per_token = flops_lib.train_flops_per_token(
        matmul_weights,
        layers=model.layers,
        seq_len=seq_len,
        attention_width=model.heads * model.head_dim,
        reference_forward=objective.reference_forward,
    )
    return Plan(
        name=spec.name,
        model=model,
        compute_dtype=spec.model.dtype,
        param_dtype=spec.model.param_dtype,
        remat=spec.training.remat,
        method=spec.method.kind,
        objective=spec.training.objective,
        params=params,
        param_count=counts.total,
        trainable_count=counts.trainable,
        memory=memory_lib.estimate(params, model, batch, spec, mesh_shape, objective),
        batch=batch,
        steps=steps,
        schedule=schedule_plan(spec.training, steps.total_steps),
        optimizer=OptimizerPlan(opt.kind, opt.weight_decay, opt.beta1, opt.beta2, opt.eps, opt.momentum, opt.grad_clip),
        mesh=MeshPlan(**{a: mesh_shape[a] for a in sharding_rules.MESH_AXES}, device_count=device_count),
        notes=tuple(notes),
        flops_per_token=flops_per_token,
        active_param_count=counts.active if model.experts else None,
    )


def step_plan(training, steps_per_epoch: int | None) -> StepPlan:
    """Optimizer steps of a run from the spec's [training] (`steps`, or `epochs` once the number of
    steps in one pass over the data is known): the one place a run's length is computed."""
    t = training
    if t.steps is not None:
        return StepPlan(t.steps, steps_per_epoch, None, "training.steps")
    if steps_per_epoch is not None:
        if t.epochs * steps_per_epoch > 2**31 - 1:  # the optimizer's step counter is int32
            raise sharding_rules.PlanError(
                f"training.epochs = {t.epochs} x {steps_per_epoch} steps per epoch is over 2**31 - 1 steps"
            )
        return StepPlan(
            t.epochs * steps_per_epoch, steps_per_epoch, t.epochs, f"{t.epochs} epochs x {steps_per_epoch} steps"
        )
    return StepPlan(None, None, t.epochs, f"{t.epochs} epochs; steps unknown until the data is read")


def schedule_plan(training, total_steps: int | None) -> SchedulePlan:
    """The learning-rate schedule of the spec's [training], its warmup resolved once the total
    steps are known."""
    sched = training.schedule
    warmup = sched.warmup_steps
    if warmup is None and total_steps is not None:
        warmup = resolve_warmup(None, sched.warmup_ratio, total_steps)
    return SchedulePlan(sched.kind, training.learning_rate, warmup, sched.warmup_ratio, sched.min_lr_ratio)


def resolve_warmup(warmup_steps: int | None, warmup_ratio: float, total_steps: int) -> int:
    """Warmup steps: as given, else `warmup_ratio` of the run's steps (rounded)."""
    if warmup_steps is not None:
        return warmup_steps
    return int(round(warmup_ratio * total_steps))


def _matmul_weights(params: Sequence[ParamPlan], model: ModelSummary) -> flops_lib.MatmulWeights:
    """Matmul weights of a plain family tree: its dense kernels, plus the LM head when it is the
    (tied) embedding table."""
    kernels = [p for p in params if p.path.rsplit("/", 1)[-1] == "kernel"]
    # An expert's weights run for the tokens routed to it: top-k of E of them per token.
    active = {p.path: model.active_fraction if "expert" in p.axes else 1.0 for p in kernels}
    base = round(sum(math.prod(p.shape) * active[p.path] for p in kernels))
    trained = round(sum(math.prod(p.shape) * active[p.path] for p in kernels if p.trainable))
    if model.tied_embeddings:
        table = model.vocab * model.hidden
        base += table
        trained += table if any(p.trainable and tuple(p.shape) == (model.vocab, model.hidden) for p in params) else 0
    return flops_lib.MatmulWeights(base, trained, 0)


def _resolve_mesh(spec, device_count: int) -> dict[str, int]:
    m = spec.mesh
    return sharding_rules.resolve_mesh(m.data, m.fsdp, m.tensor, device_count, expert=m.expert)


def _batch_geometry(spec, mesh_shape: dict[str, int]) -> BatchGeometry:
    t = spec.training
    if t.batch_size % t.micro_batch_size:
        raise PlanError(
            f"training.batch_size={t.batch_size} is not a multiple of training.micro_batch_size={t.micro_batch_size}"
        )
    shards = sharding_rules.batch_shards(mesh_shape)
    if t.micro_batch_size % shards:
        axes = [a for a in ("data", "fsdp") + (("expert",) if mesh_shape.get("expert", 1) > 1 else ())]
        raise PlanError(
            f"training.micro_batch_size={t.micro_batch_size} must be a multiple of mesh {'*'.join(axes)} = "
            f"{'*'.join(str(mesh_shape[a]) for a in axes)} = {shards} (the batch is split over them); "
            f"raise the micro-batch or move devices to mesh.tensor"
        )
    seq = spec.model.max_seq_len
    return BatchGeometry(
        t.batch_size,
        t.micro_batch_size,
        t.batch_size // t.micro_batch_size,
        seq,
        t.batch_size * seq,
        t.micro_batch_size // shards,
    )
