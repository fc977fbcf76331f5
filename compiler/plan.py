"""Spec + model config + device count -> Plan: what a run will do, as pure data.

A Plan holds no arrays and no JAX objects: shapes, counts, byte estimates, batch geometry,
steps, schedule, mesh and one partition per parameter. It serialises to JSON (`to_dict`), prints
(`format_plan`), and its `fingerprint` names the training program it describes.

Parameter shapes come from the model family through `jax.eval_shape` (see
backends/jax/shapes.py) unless given: planning a 70B model allocates nothing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from typing import Any, Callable, Sequence

from ftc.compiler import flops as flops_lib
from ftc.compiler import sharding_rules
from ftc.compiler.sharding_rules import PlanError

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1, "uint8": 1, "int32": 4, "int4": 0.5}


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
class ModelSummary:
    family: str
    model_type: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    max_position_embeddings: int | None
    tied_embeddings: bool


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per device. Activations are an estimate for one micro-batch (see _activation_bytes).
    `reference`: DPO of a full fine-tune keeps a frozen copy of the starting parameters."""

    params: int
    grads: int
    optimizer: int
    activations: int
    reference: int = 0

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.activations + self.reference


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

    @property
    def shape(self) -> dict[str, int]:
        return {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}


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

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["memory"]["total"] = self.memory.total
        out["fingerprint"] = self.fingerprint()
        return json.loads(json.dumps(out))  # tuples -> lists: plain JSON data

    def fingerprint(self) -> str:
        """sha256 over what determines the compiled training program's arithmetic: parameter
        shapes/dtypes/trainability, dtypes, batch geometry, optimizer. Not the mesh (a run may
        resume on another mesh) nor the step count (a run may be extended)."""
        key = {
            "params": [(p.path, p.shape, p.dtype, p.trainable) for p in self.params],
            "compute_dtype": self.compute_dtype, "param_dtype": self.param_dtype, "remat": self.remat,
            "method": self.method, "objective": self.objective,
            "batch": dataclasses.asdict(self.batch) | {"micro_batch_per_device": None},
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
    param_infos: Sequence[ParamInfo] | None = None,
    trainable: Callable[[str], bool] | None = None,
    steps_per_epoch: int | None = None,
    matmul_weights: flops_lib.MatmulWeights | None = None,
) -> Plan:
    """The Plan for `spec` (an ftc.spec.Spec) on `device_count` devices.

    hf_config: the base model's config.json as a dict.
    param_infos: the parameters (after any method transformation); by default read from the
        model family with `jax.eval_shape` (nothing is allocated).
    trainable: "/"-joined parameter path -> whether it is trained; default: all (full fine-tune).
    steps_per_epoch: optimizer steps in one pass over the training data, once known.
    matmul_weights: what the FLOP count needs to know of the method's weights; by default read
        from `param_infos` (every "kernel" trains or not per `trainable`; no adapter weights).
    Raises ValueError with the spec key at fault when the spec cannot run on this mesh.
    """
    mesh_shape = _resolve_mesh(spec, device_count)
    if param_infos is None:
        from ftc.backends.jax.models.shapes import param_infos_for_config

        param_infos = param_infos_for_config(hf_config, spec.model.param_dtype)
    trainable = trainable or (lambda path: True)

    notes: list[str] = []
    params = []
    for info in param_infos:
        partition, why = sharding_rules.param_partition(info.axes, info.shape, mesh_shape)
        notes += [f"{info.path}: {w}" for w in why]
        params.append(ParamPlan(info.path, tuple(info.shape), spec.model.param_dtype
                                if info.dtype in ("float32", "bfloat16", "float16") else info.dtype,
                                tuple(info.axes), partition, bool(trainable(info.path))))
    params = tuple(params)

    model = model_summary(hf_config)
    batch = _batch_geometry(spec, mesh_shape)
    seq_len = batch.seq_len
    if model.max_position_embeddings and seq_len > model.max_position_embeddings:
        notes.append(f"model.max_seq_len={seq_len} exceeds the model's max_position_embeddings="
                     f"{model.max_position_embeddings}")
    steps = _steps(spec, steps_per_epoch)
    sched = spec.training.schedule
    warmup = sched.warmup_steps
    if warmup is None and steps.total_steps is not None:
        warmup = int(round((sched.warmup_ratio or 0.0) * steps.total_steps))
    opt = spec.training.optimizer
    plan_mesh = sharding_rules.MESH_AXES
    if matmul_weights is None:
        matmul_weights = _matmul_weights(params, model)
    flops_per_token = flops_lib.train_flops_per_token(
        matmul_weights, layers=model.layers, seq_len=seq_len, attention_width=model.heads * model.head_dim,
        reference_forward=spec.training.objective == "dpo")
    return Plan(
        name=spec.name,
        model=model,
        compute_dtype=spec.model.dtype,
        param_dtype=spec.model.param_dtype,
        remat=spec.training.remat,
        method=spec.method.kind,
        objective=spec.training.objective,
        params=params,
        param_count=sum(math.prod(p.shape) for p in params),
        trainable_count=sum(math.prod(p.shape) for p in params if p.trainable),
        memory=_memory(params, model, batch, spec, mesh_shape),
        batch=batch,
        steps=steps,
        schedule=SchedulePlan(sched.kind, spec.training.learning_rate, warmup, sched.warmup_ratio,
                              sched.min_lr_ratio),
        optimizer=OptimizerPlan(opt.kind, opt.weight_decay, opt.beta1, opt.beta2, opt.eps, opt.momentum,
                                opt.grad_clip),
        mesh=MeshPlan(*(mesh_shape[a] for a in plan_mesh), device_count=device_count),
        notes=tuple(notes),
        flops_per_token=flops_per_token,
    )


def _matmul_weights(params: Sequence[ParamPlan], model: ModelSummary) -> flops_lib.MatmulWeights:
    """Matmul weights of a plain family tree: its dense kernels, plus the LM head when it is the
    (tied) embedding table."""
    kernels = [p for p in params if p.path.rsplit("/", 1)[-1] == "kernel"]
    base = sum(math.prod(p.shape) for p in kernels)
    trained = sum(math.prod(p.shape) for p in kernels if p.trainable)
    if model.tied_embeddings:
        table = model.vocab * model.hidden
        base += table
        trained += table if any(p.trainable and tuple(p.shape) == (model.vocab, model.hidden) for p in params) else 0
    return flops_lib.MatmulWeights(base, trained, 0)


def _resolve_mesh(spec, device_count: int) -> dict[str, int]:
    m = spec.mesh
    return sharding_rules.resolve_mesh(m.data, m.fsdp, m.tensor, device_count)


def _first(cfg: dict, *keys, default=None):
    for key in keys:
        if cfg.get(key) is not None:
            return cfg[key]
    return default


def model_summary(hf_config: dict) -> ModelSummary:
    """The architecture numbers the plan prints, read from config.json (HF key aliases)."""
    text = hf_config.get("text_config") or {}
    cfg = {**text, **hf_config}
    hidden = int(_first(cfg, "hidden_size", "n_embd", "d_model", default=0))
    heads = int(_first(cfg, "num_attention_heads", "n_head", default=1))
    try:
        from ftc.backends.jax.models import family_for

        family = family_for(hf_config).name
    except Exception:  # noqa: BLE001 - family modules may be absent; the summary is still useful
        family = str(hf_config.get("model_type"))
    return ModelSummary(
        family=family,
        model_type=str(hf_config.get("model_type")),
        layers=int(_first(cfg, "num_hidden_layers", "n_layer", "num_layers", default=0)),
        hidden=hidden,
        heads=heads,
        kv_heads=int(_first(cfg, "num_key_value_heads", default=heads)),
        head_dim=int(_first(cfg, "head_dim", default=hidden // max(heads, 1))),
        intermediate=int(_first(cfg, "intermediate_size", "n_inner", default=4 * hidden)),
        vocab=int(_first(cfg, "vocab_size", default=0)),
        max_position_embeddings=_first(cfg, "max_position_embeddings", "n_positions"),
        tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
    )


def _batch_geometry(spec, mesh_shape: dict[str, int]) -> BatchGeometry:
    t = spec.training
    if t.batch_size % t.micro_batch_size:
        raise PlanError(f"training.batch_size={t.batch_size} is not a multiple of "
                         f"training.micro_batch_size={t.micro_batch_size}")
    shards = sharding_rules.batch_shards(mesh_shape)
    if t.micro_batch_size % shards:
        raise PlanError(
            f"training.micro_batch_size={t.micro_batch_size} must be a multiple of mesh data*fsdp = "
            f"{mesh_shape['data']}*{mesh_shape['fsdp']} = {shards} (the batch is split over them); "
            f"raise the micro-batch or move devices to mesh.tensor"
        )
    seq = spec.model.max_seq_len
    return BatchGeometry(t.batch_size, t.micro_batch_size, t.batch_size // t.micro_batch_size, seq,
                         t.batch_size * seq, t.micro_batch_size // shards)


def _steps(spec, steps_per_epoch: int | None) -> StepPlan:
    t = spec.training
    if t.steps is not None:
        return StepPlan(t.steps, steps_per_epoch, None, "training.steps")
    if steps_per_epoch is not None:
        return StepPlan(t.epochs * steps_per_epoch, steps_per_epoch, t.epochs,
                        f"{t.epochs} epochs x {steps_per_epoch} steps")
    return StepPlan(None, None, t.epochs, f"{t.epochs} epochs; steps unknown until the data is read")


# ------------------------------------------------------------------ memory


def _nbytes(p: ParamPlan, mesh_shape, dtype: str | None = None) -> float:
    return math.prod(p.shape) * DTYPE_BYTES[dtype or p.dtype] / sharding_rules.shard_factor(p.partition, mesh_shape)


def _memory(params, model: ModelSummary, batch: BatchGeometry, spec, mesh_shape) -> MemoryEstimate:
    param_bytes = sum(_nbytes(p, mesh_shape) for p in params)
    trainable = [p for p in params if p.trainable]
    grad_bytes = sum(_nbytes(p, mesh_shape) for p in trainable)
    if batch.accum_steps > 1:
        grad_bytes *= 2  # the running sum over micro-batches and one micro-batch's gradient
    dpo = spec.training.objective == "dpo"
    # DPO runs a pair's chosen and rejected rows as one batch: twice the sequences per micro-batch.
    activations = _activation_bytes(model, batch, spec, mesh_shape) * (2 if dpo else 1)
    return MemoryEstimate(
        params=int(param_bytes),
        grads=int(grad_bytes),
        optimizer=int(sum(_optimizer_bytes(p, spec.training.optimizer, mesh_shape) for p in trainable)),
        activations=int(activations),
        reference=int(param_bytes) if dpo and spec.method.kind == "full" else 0,
    )


def _optimizer_bytes(p: ParamPlan, opt, mesh_shape) -> float:
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


def _activation_bytes(model: ModelSummary, batch: BatchGeometry, spec, mesh_shape) -> float:
    """Rough bytes kept for the backward pass of one micro-batch on one device.

    Per token per layer, in compute-dtype elements (t = tensor-parallel size):
      none: norms and residuals 4h, q/k/v/o h+2kv+h, attention probabilities N*T/t, mlp 4I/t;
      dots: only matmul outputs (2h + 2kv + 3I/t);  full: only the layer input h, plus one
      layer's worth recomputed during the backward pass.
    Logits (and their float32 log-softmax) dominate at large vocabularies and are counted once.
    """
    t = mesh_shape["tensor"]
    tokens = batch.micro_batch_per_device * batch.seq_len
    h, kv, inter = model.hidden, model.kv_heads * model.head_dim, model.intermediate
    per_layer_none = 4 * h + (2 * h + 2 * kv) / t + model.heads * batch.seq_len / t + 4 * inter / t
    c = DTYPE_BYTES[spec.model.dtype]
    remat = spec.training.remat
    if remat == "full":
        per_token = h * model.layers + per_layer_none
    elif remat == "dots":
        per_token = (2 * h + (2 * kv + 3 * inter) / t) * model.layers
    else:
        per_token = per_layer_none * model.layers
    logits = tokens * model.vocab / t * (c + 4 + 4)  # logits, float32 copy, its gradient
    return tokens * per_token * c + logits


# ------------------------------------------------------------------ printing


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n} B"


def human_count(n: int) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def format_plan(plan: Plan, *, max_params: int = 40) -> str:
    """A readable summary (what `ftc plan` prints)."""
    m, b, s, mem, mesh = plan.model, plan.batch, plan.steps, plan.memory, plan.mesh
    pct = 100.0 * plan.trainable_count / max(plan.param_count, 1)
    lines = [
        f"plan for {plan.name}   (fingerprint {plan.fingerprint()})",
        f"model     {m.family} ({m.model_type}): {m.layers} layers, hidden {m.hidden}, heads {m.heads}"
        f" (kv {m.kv_heads}, dim {m.head_dim}), mlp {m.intermediate}, vocab {m.vocab}"
        + (", tied embeddings" if m.tied_embeddings else ""),
        f"params    {plan.param_count:,} total ({human_count(plan.param_count)}), "
        f"{plan.trainable_count:,} trainable ({pct:.2f}%)   method {plan.method}, objective {plan.objective}",
        f"dtypes    compute {plan.compute_dtype}, params {plan.param_dtype}, remat {plan.remat}",
        f"mesh      data={mesh.data} fsdp={mesh.fsdp} tensor={mesh.tensor} on {mesh.device_count} device(s)",
        f"batch     {b.global_batch} sequences x {b.seq_len} tokens = {b.tokens_per_step:,} tokens/step; "
        f"micro-batch {b.micro_batch} ({b.micro_batch_per_device}/device) x {b.accum_steps} accumulation step(s)",
        f"steps     {s.total_steps if s.total_steps is not None else 'unknown'}   ({s.note})",
        f"schedule  {plan.schedule.kind}, lr {plan.schedule.learning_rate:g}, warmup "
        + (f"{plan.schedule.warmup_steps} steps" if plan.schedule.warmup_steps is not None
           else f"ratio {plan.schedule.warmup_ratio}")
        + f", min_lr_ratio {plan.schedule.min_lr_ratio:g}",
        f"optimizer {plan.optimizer.kind}, weight decay {plan.optimizer.weight_decay:g}, "
        f"grad clip {plan.optimizer.grad_clip:g}",
        f"memory/device  params {human_bytes(mem.params)} + grads {human_bytes(mem.grads)} + optimizer "
        f"{human_bytes(mem.optimizer)} + activations ~{human_bytes(mem.activations)}"
        + (f" + DPO reference copy {human_bytes(mem.reference)}" if mem.reference else "")
        + f" = {human_bytes(mem.total)}",
        f"compute   {plan.flops_per_token / 1e9:,.3f} GFLOP per trained token (model FLOPs, the MFU numerator), "
        f"{plan.flops_per_token * b.tokens_per_step / 1e12:,.3f} TFLOP per step",
    ]
    if max_params > 0:
        lines.append("parameters (path  shape  logical axes -> partition):")
    for p in plan.params[:max_params]:
        mark = "" if p.trainable else "  [frozen]"
        lines.append(f"  {p.path}  {list(p.shape)}  {_axes(p.axes)} -> {_axes(p.partition)}{mark}")
    if 0 < max_params < len(plan.params):
        lines.append(f"  ... {len(plan.params) - max_params} more (--json lists all)")
    if plan.notes:
        lines.append("notes:")
        lines += [f"  {n}" for n in plan.notes]
    return "\n".join(lines)


def _axes(axes: Sequence[Any]) -> str:
    return "(" + ", ".join("-" if a is None else str(a) for a in axes) + ")"
