"""What `ftc generate`, `ftc chat` and `ftc eval` run: a SOURCE made into a model, its parameters,
its tokenizer and what ends a generation.

    source = load_source("runs/support-bot")        # or an export, a .gguf, an HF directory, ...
    sampler = source.sampler()                       # sampler.make_sampler over the method's model

SOURCE is, in this order:
  a run directory (checkpoints/)   its latest checkpoint as `ftc export` reads it (io/export.py
                                   load_run): the method's parameters as trained, a LoRA, QLoRA or
                                   adapter model unmerged, its frozen base rebuilt
  a PEFT LoRA adapter directory    over its base_model_name_or_path (rank, alpha, rslora and
                                   targets from its adapter_config.json)
  an ftc adapter export, or an HF export holding ftc_adapters/   the adapters over their base
  anything `model.base` accepts    an HF directory (an `hf` export), an HF id in the local cache,
                                   a .gguf file, package:NAME/path (io/model_source.py)
Parameters are placed over this process's devices on one fsdp axis (io/export.py
export_shardings), the mesh the sampler shards its cache over. Computation is in `dtype`
(float32 by default: what the parity tests compare); with a narrower dtype the floating
parameters are stored in it too (decoding reads every weight once per token, so their bytes set
its speed), except what a method keeps in its own dtypes (QLoRA's NF4 storage).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from ftc.backends.jax.generate import sampler as sampler_lib
from ftc.backends.jax.io import export as export_lib
from ftc.backends.jax.io.hf_checkpoint import read_hf_config
from ftc.backends.jax.io.model_source import ModelSourceError, resolve_model_source
from ftc.backends.jax.methods import adapter, adapter_io
from ftc.backends.jax.methods import base as methods
from ftc.backends.jax.models import shapes
from ftc.backends.jax.stages import RESOLVED_SPEC
from ftc.backends.jax.state import checkpoint as ckpt_lib
from ftc.backends.jax.state import frozen_base
from ftc.spec import spec_from_dict


class SourceError(ValueError):
    """A SOURCE that cannot be generated from; the message names it and what was expected."""


@dataclasses.dataclass(frozen=True)
class Source:
    name: str  # SOURCE as given
    what: str  # one line: what was loaded
    model: methods.MethodModel  # compute in the requested dtype
    params: Any
    tokenizer: Any  # a transformers tokenizer, or None when the source has none
    model_dir: Path  # the base model's HF directory
    hf_config: dict
    eos_ids: tuple[int, ...]
    context: int  # positions the model has
    spec: Any = None  # the run's resolved Spec (a run directory), else None

    def sampler(self) -> sampler_lib.Sampler:
        leaf = jax.tree.leaves(self.params)[0]
        mesh = getattr(leaf.sharding, "mesh", None) if hasattr(leaf, "sharding") else None
        return sampler_lib.make_sampler(  # the params stay: their per-layer copy is kept between calls
            self.model.family, self.model.arch, self.model.eval_module, context=self.context, mesh=mesh, keep_split=True
        )

    @property
    def is_chat(self) -> bool:
        return self.tokenizer is not None and bool(getattr(self.tokenizer, "chat_template", None))

    @property
    def pad_id(self) -> int:
        pad = None if self.tokenizer is None else self.tokenizer.pad_token_id
        return int(pad if pad is not None else (self.eos_ids[0] if self.eos_ids else 0))


def context_length(hf_config: dict) -> int:
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        if hf_config.get(key):
            return int(hf_config[key])
    raise SourceError(f"config.json of model_type {hf_config.get('model_type')!r} names no context length")


def eos_ids(model_dir: Path | None, hf_config: dict, tokenizer) -> tuple[int, ...]:
    """Every id that ends a generation: generation_config.json's eos_token_id (transformers'
    own stop ids), config.json's, and the tokenizer's eos token, in that order, without repeats."""
    found: list[int] = []

    def add(value):
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, int) and not isinstance(v, bool) and v not in found:
                found.append(v)

    gen = Path(model_dir) / "generation_config.json" if model_dir is not None else None
    if gen is not None and gen.is_file():
        add(json.loads(gen.read_text()).get("eos_token_id"))
    add(hf_config.get("eos_token_id"))
    if tokenizer is not None:
        add(tokenizer.eos_token_id)
    return tuple(found)


def load_tokenizer(*dirs: Path | None):
    """The tokenizer of the first directory that has tokenizer files, or None."""
    from ftc.backends.jax.stages import load_tokenizer as load
    from ftc.backends.jax.stages import tokenizer_hash

    for d in dirs:
        if d is not None and tokenizer_hash(d) is not None:
            return load(d)
    return None


def load_source(source: str | os.PathLike, *, dtype: str = "float32") -> Source:
    """SOURCE (see the module docstring) as a Source, or SourceError saying what it is not."""
    source = os.fspath(source)
    path = Path(source).expanduser()
    try:
        if os.path.isdir(ckpt_lib.checkpoint_dir(str(path))):
            return _from_run(source, path, dtype)
        if (path / RESOLVED_SPEC).is_file() and not (path / "config.json").is_file():
            raise SourceError(_run_without_checkpoint(source, path))
        for config in (path / adapter_io.CONFIG_FILE, path / adapter.HF_SUBDIR / adapter_io.CONFIG_FILE):
            if config.is_file():
                return _from_method_dir(source, path, json.loads(config.read_text()), dtype)
        model_dir = resolve_model_source(source)
        return _from_spec(source, _spec(str(model_dir), "full", {}, None, dtype), model_dir, None, f"model {model_dir}")
    except (ModelSourceError, export_lib.ExportError, FileNotFoundError, json.JSONDecodeError) as e:
        raise SourceError(f"cannot generate from {source!r}: {e}") from e


def _run_without_checkpoint(source: str, path: Path) -> str:
    """What a run directory with no checkpoints/ is: a probe run (trained outside the step loop: a
    classifier, it keeps no checkpoint), or one that has not saved yet."""
    try:
        method = json.loads((path / RESOLVED_SPEC).read_text()).get("method", {})
    except (OSError, ValueError, AttributeError):
        method = {}
    if isinstance(method, dict) and method.get("kind") == "probe":
        return (
            f"cannot generate from {source!r}: it is a probe run, a classifier head on a frozen model, not a "
            f"causal language model (its export {path / 'export'} classifies with transformers)"
        )
    return (
        f"cannot generate from {source!r}: it is a run directory of `ftc run` with no checkpoint yet "
        f"(no {ckpt_lib.checkpoint_dir(str(path))}); run its spec until it saves one, or give the base model"
    )


def _generating(source: str, model: methods.MethodModel) -> methods.MethodModel:
    """The model, if its family decodes (before any weight is read)."""
    if model.family.cache_layout is None:
        raise SourceError(
            f"cannot generate from {source!r}: it is a {model.family.name} model, not a causal language model "
            f"(generation needs a decoder: {', '.join(_decoder_families())})"
        )
    return model


def _decoder_families() -> list[str]:
    from ftc.backends.jax import models

    types = models.supported_model_types()
    return [t for t in types if models.family_for({"model_type": t}).cache_layout is not None]


def _in_dtype(model: methods.MethodModel, params, dtype: str):
    """Floating parameters cast to the compute dtype when it is narrower than theirs."""
    target = jnp.dtype(dtype)

    def one(path, x):
        keep = model.method.own_dtype(shapes.path_str(path)) or not jnp.issubdtype(x.dtype, jnp.floating)
        return x if keep or x.dtype.itemsize <= target.itemsize else x.astype(target)

    return jax.tree_util.tree_map_with_path(one, params)


def _from_run(source: str, path: Path, dtype: str) -> Source:
    # generate has no --step: an older checkpoint is read through its export
    use_good = f"export the newest good one (ftc export {source} --step {{step}} --out DIR) and generate from DIR"
    trained = export_lib.load_run(path, use_good=use_good)
    model = _generating(
        source, methods.build_model(trained.hf_config, trained.spec, dtype=jnp.dtype(dtype), remat="none")
    )
    tokenizer = load_tokenizer(trained.tokenizer_dir)
    return Source(
        source,
        f"run {trained.run_dir} at step {trained.step} ({trained.kind}, base {trained.model_dir})",
        model,
        _in_dtype(model, trained.params, dtype),
        tokenizer,
        trained.model_dir,
        trained.hf_config,
        eos_ids(trained.model_dir, trained.hf_config, tokenizer),
        context_length(trained.hf_config),
        trained.spec,
    )


def _from_method_dir(source: str, path: Path, config: dict, dtype: str) -> Source:
    """A PEFT LoRA adapter (over its base) or ftc bottleneck adapters (over the export's base)."""
    if config.get("format") == adapter_io.FORMAT:
        keys = {k: config[k] for k in ("placement", "reduction_factor", "non_linearity")}
        manifest = path / export_lib.MANIFEST
        named = json.loads(manifest.read_text()).get("base_model_name_or_path") if manifest.is_file() else None
        base = str(path) if (path / "config.json").is_file() else named
        kind = "adapter"
    elif config.get("peft_type") == "LORA":
        targets = config.get("target_modules")
        keys = {
            "rank": config["r"],
            "alpha": config["lora_alpha"],
            "rslora": bool(config.get("use_rslora", False)),
            "targets": sorted(targets) if isinstance(targets, list) else targets,
        }
        base = config.get("base_model_name_or_path")
        kind = "lora"
    else:
        raise SourceError(
            f"{path / adapter_io.CONFIG_FILE}: expected a PEFT LoRA adapter (peft_type LORA) or an ftc "
            f"adapter export (format {adapter_io.FORMAT!r}); got peft_type={config.get('peft_type')!r}"
        )
    if not base:
        raise SourceError(f"{path / adapter_io.CONFIG_FILE}: names no base model (base_model_name_or_path)")
    model_dir = resolve_model_source(base)
    spec = _spec(str(model_dir), kind, keys, str(path), dtype)
    return _from_spec(source, spec, model_dir, path, f"{kind} weights {path} over {model_dir}")


def _spec(base: str, kind: str, method_keys: dict, init_from_dir: str | None, dtype: str):
    """The spec a training run starting from this source would have: the one resolver
    (state/init_from.py) then reads it as a run's starting weights."""
    model = {"base": base, "dtype": dtype}
    if init_from_dir is not None:
        model["init_from"] = init_from_dir
    return spec_from_dict(
        {
            "ftc": 1,
            "name": "generate",
            "model": model,
            "data": {"format": "text", "train": os.devnull},
            "method": {"kind": kind, **method_keys},
        }
    )


def _from_spec(source: str, spec, model_dir: Path, extra_dir: Path | None, what: str) -> Source:
    hf_config = read_hf_config(model_dir)
    model = _generating(source, methods.build_model(hf_config, spec, remat="none"))  # compute dtype: spec.model.dtype
    abstract = methods.abstract_params(model, spec.model.param_dtype)
    shardings = export_lib.export_shardings(model, abstract)
    try:
        params = frozen_base.initial_params(spec, model_dir, abstract, shardings, model=model)
    except ValueError as e:
        raise SourceError(f"cannot generate from {source!r}: {e}") from e
    tokenizer = load_tokenizer(extra_dir, model_dir)
    return Source(
        source,
        what,
        model,
        _in_dtype(model, params, spec.model.dtype),
        tokenizer,
        Path(model_dir),
        hf_config,
        eos_ids(model_dir, hf_config, tokenizer),
        context_length(hf_config),
    )
