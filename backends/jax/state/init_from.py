"""Where a run's starting weights come from: `model.base`, or `model.init_from` when set.

`resolve` is the one place that decides what a `model.init_from` path is:

    RUN             a run directory (with checkpoints/): its checkpoint at a step (default the latest)
    METHOD_DIR      a directory of trained method weights (adapter_config.json: a PEFT LoRA adapter,
                    an ftc adapter export); the methods whose records read it load them over a base
                    from model.base
    HF_DIR          a Hugging Face directory (config.json): the base; an export that keeps a method's
                    weights beside its base (a method record's `init_subdir`, e.g. ftc_adapters/) has
                    them as `method_dir`
    UNKNOWN         anything else (a fresh run refuses it; a rebuild finds its files gone)
    BASE            no model.init_from: model.base's own weights

frozen_base.initial_params builds a run's starting parameters from it, and frozen_base's record
names the files it reads; io/export.py can ask it where the frozen base of a run came from.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from ftc.backends.jax import methods as method_registry
from ftc.backends.jax.io.hf_checkpoint import read_hf_config
from ftc.backends.jax.io.model_source import resolve_model_source
from ftc.backends.jax.methods import base as methods
from ftc.backends.jax.state import checkpoint as ckpt_lib

BASE, RUN, METHOD_DIR, HF_DIR, UNKNOWN = ("base", "run", "method weights", "hf directory", "unknown")


@dataclasses.dataclass(frozen=True)
class InitSource:
    """What a run starts from. `base_dir`: the HF directory its base weights are read from (None
    for RUN: the run's checkpoint holds them); `method_dir`: trained method weights to load over
    the fresh method params (METHOD_DIR, or an HF_DIR export holding a method's weights)."""

    kind: str
    path: str | None  # model.init_from as written (None for BASE)
    base_dir: Path | None
    method_dir: Path | None = None
    step: int | None = None  # RUN: the checkpoint step it starts from
    adapter_config: dict | None = None  # METHOD_DIR: its adapter_config.json

    @property
    def what(self) -> str:
        """How records and refusals name the base weights' source."""
        if self.kind == RUN:
            return f"model.init_from {self.path} (its checkpoint at step {self.step})"
        return f"model.init_from {self.path}"


def read_model_config(base: str) -> tuple[Path | None, dict]:
    """(model directory, config.json) for `model.base`. A local directory with only a
    config.json plans fine (no weights needed); anything else goes through model_source."""
    local = Path(base).expanduser()
    if local.is_dir() and (local / "config.json").is_file() and not any(local.glob("*.safetensors")):
        return None, read_hf_config(local)
    model_dir = resolve_model_source(base)
    return model_dir, read_hf_config(model_dir)


def init_from_run(spec) -> str | None:
    """`model.init_from` when it names a run directory (one with checkpoints/), else None."""
    init = spec.model.init_from
    return init if init and os.path.isdir(ckpt_lib.checkpoint_dir(init)) else None


def init_from_step(spec) -> int | None:
    """The checkpoint step of a `model.init_from` run a fresh run starts from (its latest)."""
    run = init_from_run(spec)
    return ckpt_lib.latest_step(run) if run else None


def resolve(spec, model_dir: str | os.PathLike | None, init_step: int | None = None) -> InitSource:
    """What `spec`'s starting weights are (see the module docstring). `model_dir`: model.base's
    HF directory; `init_step`: the step of an init_from run (default its latest)."""
    init = spec.model.init_from
    base_dir = Path(model_dir) if model_dir is not None else None
    if not init:
        return InitSource(BASE, None, base_dir)
    path = Path(init)
    if init_from_run(spec):
        return InitSource(RUN, init, None, step=ckpt_lib.latest_step(init) if init_step is None else init_step)
    config = path / "adapter_config.json"
    if config.is_file():
        found = json.loads(config.read_text())
        kind = METHOD_DIR if methods.kinds_reading(found) else UNKNOWN
        return InitSource(kind, init, base_dir, method_dir=path, adapter_config=found)
    if (path / "config.json").is_file():
        return InitSource(HF_DIR, init, path, method_dir=_nested_method_dir(path))
    return InitSource(UNKNOWN, init, base_dir)


def starts_from_method_weights(spec) -> bool:
    """Whether the run's method starts from trained weights of its own (a PEFT adapter, an adapter
    export or one an export keeps beside its base, an earlier run of the same method) rather than
    fresh ones: then zeroing them computes the base, not the starting model, and a reference
    policy (DPO, GRPO's and PPO's KL) must be a copy of the starting parameters, as TRL's is."""
    if not spec.model.init_from:
        return False
    source = resolve(spec, None)
    if source.kind == RUN:
        try:
            earlier = json.loads((Path(source.path) / "spec.resolved.json").read_text())["method"]["kind"]
        except (OSError, ValueError, KeyError, TypeError):
            return False  # the run start reads its checkpoint and says what is wrong
        return earlier == spec.method.kind
    return source.method_dir is not None


def reference_copy_needed(spec, model) -> bool:
    """Whether a reference policy must be a frozen copy of the starting parameters: a full
    fine-tune's, or a method's whose zeroed weights do not compute the starting model."""
    return not model.method.zero_is_base or starts_from_method_weights(spec)


def _nested_method_dir(path: Path) -> Path | None:
    """The method weights an HF export keeps beside its base (a record's `init_subdir`), if any."""
    for kind in method_registry.kinds():
        sub = method_registry.get(kind).init_subdir
        if sub and (path / sub / "adapter_config.json").is_file():
            return path / sub
    return None


def check_method(source: InitSource, kind: str) -> None:
    """Raise ValueError when a method.kind=`kind` run cannot start from `source` (trained weights
    of another method, an unrecognised path). A RUN is checked once its checkpoint's method is
    read (frozen_base.initial_params). Which methods read which directories is each method
    record's `reads_init_dir` / `init_subdir`."""
    init = source.path
    if source.adapter_config is not None:
        found = source.adapter_config
        want = methods.kinds_reading(found)
        if kind not in want:
            what = f"a PEFT {found.get('peft_type')} adapter" if found.get("peft_type") else "an adapter export"
            raise ValueError(
                f"model.init_from={init!r} is {what}, which a method.kind={kind!r} run cannot "
                f"start from" + (f" (expected method.kind {' or '.join(want)})" if want else "")
            )
    elif (
        source.kind == HF_DIR
        and source.method_dir is not None
        and method_registry.get(kind).init_subdir != source.method_dir.name
    ):
        raise ValueError(
            f"model.init_from={init!r} holds method weights ({source.method_dir.name}/) "
            f"that a method.kind={kind!r} run would drop; start a run of their method from it, "
            f"or a {kind} run from its base model"
        )
    elif source.kind == UNKNOWN:
        raise ValueError(
            f"model.init_from={init!r}: expected a run directory (with checkpoints/), a "
            f"Hugging Face directory (config.json), a PEFT adapter or an ftc adapter export"
        )
