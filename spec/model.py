"""The typed, frozen Spec: one dataclass per schema section, attribute names = schema keys.

Keys that do not apply (method.rank for a full fine-tune, optimizer.momentum for adamw,
training.steps when epochs is set) are None. Lists are tuples. `checkpoint.async` is
`checkpoint.async_` (a Python keyword). Build one with `ftc.spec.load_spec`, never by hand.
"""

from __future__ import annotations

import dataclasses
import keyword
import os
import typing

from ftc.spec.errors import SpecIssue


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    base: str  # an HF id as written, or an absolute path (directory or .gguf)
    tokenizer: str | None
    dtype: str
    param_dtype: str
    max_seq_len: int
    init_from: str | None


@dataclasses.dataclass(frozen=True)
class CleanSpec:
    dedupe: bool
    drop_empty: bool
    roles: tuple[str, ...]
    unknown_roles: str
    overlong: str


@dataclasses.dataclass(frozen=True)
class DataSpec:
    format: str
    train: str | tuple[str, ...]  # as written: one source or several; absolute paths or "tfds:..."
    validation: str | None
    validation_split: float
    packing: bool | None  # None for preference and classification data
    train_on: str | None  # None unless chat or completion
    shuffle: bool
    on_bad_row: str
    labels: tuple[str, ...] | None
    clean: CleanSpec

    @property
    def train_sources(self) -> tuple[str, ...]:
        """`train` as a tuple, whether one source or several was written."""
        return (self.train,) if isinstance(self.train, str) else self.train


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    kind: str
    rank: int | None = None
    alpha: float | None = None
    dropout: float | None = None
    rslora: bool | None = None
    targets: str | tuple[str, ...] | None = None  # "all-linear" or names/regexes
    quant_block_size: int | None = None
    double_quant: bool | None = None
    placement: str | None = None
    reduction_factor: int | None = None
    non_linearity: str | None = None
    pooling: str | None = None
    head: str | None = None
    head_hidden: int | None = None


@dataclasses.dataclass(frozen=True)
class ScheduleSpec:
    kind: str
    warmup_steps: int | None  # exactly one of warmup_steps and warmup_ratio is set
    warmup_ratio: float | None
    min_lr_ratio: float


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
    kind: str
    weight_decay: float
    beta1: float | None  # adamw only
    beta2: float | None
    eps: float | None
    momentum: float | None  # sgd only
    grad_clip: float  # 0 = off


@dataclasses.dataclass(frozen=True)
class TrainingSpec:
    objective: str
    epochs: int | None  # exactly one of epochs and steps is set
    steps: int | None
    batch_size: int
    micro_batch_size: int
    learning_rate: float
    seed: int
    eval_every: int
    log_every: int
    remat: str
    dpo_beta: float | None  # dpo only
    dpo_loss_type: str | None  # dpo only
    dpo_label_smoothing: float | None  # dpo with dpo_loss_type robust only
    orpo_beta: float | None  # orpo only
    grpo_group_size: int | None  # grpo only (this and the grpo_ keys below)
    grpo_rewards: tuple[dict, ...] | None
    grpo_loss_type: str | None
    grpo_beta: float | None
    grpo_epsilon: float | None
    grpo_epsilon_high: float | None
    grpo_updates_per_rollout: int | None
    grpo_max_new_tokens: int | None
    grpo_temperature: float | None
    ppo_rewards: tuple[dict, ...] | None  # ppo only (this and the ppo_ keys below)
    ppo_kl_coef: float | None
    ppo_epsilon: float | None
    ppo_value_clip: float | None
    ppo_vf_coef: float | None
    ppo_gamma: float | None
    ppo_lambda: float | None
    ppo_updates_per_rollout: int | None
    ppo_max_new_tokens: int | None
    ppo_temperature: float | None
    router_aux_loss_coef: float | None  # sft only; None: config.json decides (objectives/router_aux.py)
    schedule: ScheduleSpec
    optimizer: OptimizerSpec

    @property
    def grad_accum_steps(self) -> int:
        return self.batch_size // self.micro_batch_size


@dataclasses.dataclass(frozen=True)
class MeshSpec:
    data: int
    fsdp: int
    tensor: int
    expert: int


@dataclasses.dataclass(frozen=True)
class CheckpointSpec:
    every: int
    keep: int
    async_: bool


@dataclasses.dataclass(frozen=True)
class ExportSpec:
    format: str
    dtype: str
    verify: bool
    targets: tuple[str, ...] = ()  # serving targets `ftc lint` checks the spec against (spec/targets.py)


@dataclasses.dataclass(frozen=True)
class LoggingSpec:
    tensorboard: bool
    progress: bool
    peak_tflops: float | None
    report: bool


@dataclasses.dataclass(frozen=True)
class EvalSpec:
    samples: int
    max_new_tokens: int
    regex: str | None


@dataclasses.dataclass(frozen=True)
class Spec:
    ftc: int
    name: str
    description: str | None
    output_dir: str
    model: ModelSpec
    data: DataSpec
    method: MethodSpec
    training: TrainingSpec
    mesh: MeshSpec
    checkpoint: CheckpointSpec
    export: ExportSpec
    logging: LoggingSpec
    eval: EvalSpec
    # Not spec keys: where the spec came from.
    source: str = ""  # absolute path of the spec file ("" when built from a dict)
    extends: tuple[str, ...] = ()  # absolute paths of the files merged in, bases first
    warnings: tuple[SpecIssue, ...] = dataclasses.field(default=(), compare=False, repr=False)

    @property
    def run_dir(self) -> str:
        return os.path.join(self.output_dir, self.name)

    def to_dict(self) -> dict:
        """The fully resolved spec (extends merged, overrides and defaults applied, paths
        absolute) as plain JSON data: what `spec.resolved.json` holds. It loads back to an
        equal Spec. Keys that do not apply are left out."""
        return _to_dict(self)


_NOT_KEYS = ("source", "extends", "warnings")


def _key(field_name: str) -> str:
    bare = field_name.rstrip("_")
    return bare if field_name.endswith("_") and keyword.iskeyword(bare) else field_name


def _to_dict(obj) -> dict:
    out = {}
    for field in dataclasses.fields(obj):
        if field.name in _NOT_KEYS:
            continue
        value = getattr(obj, field.name)
        if value is None:
            continue
        if dataclasses.is_dataclass(value):
            value = _to_dict(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[_key(field.name)] = value
    return out


def build(cls, data: dict, **extra):
    """A `cls` from a validated, default-filled dict (schema keys); lists become tuples."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for field in dataclasses.fields(cls):
        if field.name in _NOT_KEYS:
            continue
        value = data.get(_key(field.name))
        hint = hints[field.name]
        if dataclasses.is_dataclass(hint):
            value = build(hint, value)
        elif isinstance(value, list):
            value = tuple(value)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            value = _numeric(hint, value)
        kwargs[field.name] = value
    return cls(**kwargs, **extra)


def _numeric(hint, value):
    # The schema accepts 8.0 as an integer and 1 as a number; give each field one Python type.
    args = typing.get_args(hint) or (hint,)
    if int in args:
        return int(value)
    if float in args:
        return float(value)
    return value
