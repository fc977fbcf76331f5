"""`ftc export`: a run's checkpoint -> a directory that transformers, PEFT or PyTorch loads.

    result, check = export_run("runs/support-bot", format="peft", dtype="bfloat16", verify=True)

A checkpoint describes itself (its metadata holds the resolved spec and the base model's
directory), so the model, the method and its plan are rebuilt from it: nothing is re-entered.
Which formats a method exports, how each is written, loaded and reloaded for `verify` is the
method's record (`METHOD.formats` in methods/<kind>.py; full: hf; lora, qlora: hf merged, peft;
adapter: hf with ftc_adapters/, adapters; probe: written by `ftc run`, copied here). Every export
also holds ftc_export.json (run, step, method, format, dtype, base).

The directory appears whole or not at all: it is written into a temporary sibling and renamed
into place, so a failed export leaves no partial `--out`; a non-empty `--out` is replaced only
with `force` (export_common.publish).

`verify_export` reloads the export in PyTorch (transformers; PEFT for peft; ftc's PyTorch hooks
for adapters) and compares its outputs on a fixed padded batch with ftc's model in float32 using
the weights as exported (rounded to the export dtype), so a bfloat16 export is checked exactly
for what it holds. A QLoRA PEFT adapter is checked on the dequantised base (written to a temporary
directory), the base that QLoRA trained against.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from gguf import GGUFReader

from ftc.backends.jax import methods as registry
from ftc.backends.jax import stages
from ftc.backends.jax.io import certificate, gguf_config, hf_checkpoint
from ftc.backends.jax.io.export_common import (
    DTYPES,
    EXPORT_DIR,
    MANIFEST,
    ExportError,
    ExportResult,
    VerifyFailedError,
    check_out_dir,
    is_causal,
    is_run_dir,
    publish,
)
from ftc.backends.jax.io.export_verify import verify_export
from ftc.backends.jax.io.gguf_export import QUANTIZED, VERIFY_TOL
from ftc.backends.jax.io.model_source import gguf_file, is_loadable_by_transformers
from ftc.backends.jax.methods import base as methods
from ftc.backends.jax.methods import value_head
from ftc.backends.jax.methods.probe_export import PROBE_HEAD, verify_probe_export
from ftc.backends.jax.models import shapes
from ftc.backends.jax.state import checkpoint as ckpt_lib
from ftc.backends.jax.state import files, frozen_base, init_from, integrity
from ftc.backends.jax.train import mesh as mesh_lib
from ftc.compiler import sharding_rules
from ftc.spec import choices, spec_from_dict

# Names other modules import from here (pipeline.py, ftc/cli.py): their homes are export_common and probe_export.
__all__ = [
    "DTYPES",
    "EXPORT_DIR",
    "MANIFEST",
    "PROBE_HEAD",
    "ExportError",
    "ExportResult",
    "TrainedRun",
    "VerifyFailedError",
    "base_source",
    "check_format",
    "check_out_dir",
    "export_run",
    "how_to_load",
    "load_run",
    "publish",
    "verify_export",
    "verify_probe_export",
    "write_export",
]


# ---------------------------------------------------------------- the trained run


@dataclasses.dataclass(frozen=True)
class TrainedRun:
    """A run's checkpointed model, rebuilt from the checkpoint's own metadata."""

    run_dir: Path
    spec: Any  # ftc.spec.Spec (the checkpoint's resolved spec)
    step: int
    model_dir: Path  # the base model's HF directory
    hf_config: dict
    model: methods.MethodModel  # float32 compute: exports and checks compute in float32
    params: Any  # the method's params tree (sharded over this process's devices)
    tokenizer_dir: Path | None  # None when the run had no tokenizer files
    base_name: str | None  # PEFT's base_model_name_or_path for the frozen base; None: no HF dir holds it
    base_dir: Path | None  # local HF directory holding the frozen base weights
    base_note: str  # why base_name is None, or where it came from
    load_seconds: float = 0.0  # rebuilding the model and restoring the checkpoint

    @property
    def kind(self) -> str:
        return self.model.kind


def base_source(spec, model_dir: Path) -> tuple[str | None, Path | None, str]:
    """(name PEFT writes as base_model_name_or_path, local HF dir of the frozen base, note).

    The frozen base is `model.base`, unless `model.init_from` (init_from.resolve) started the run
    from other weights: an HF directory (that one), a full fine-tune's run directory (its export/,
    when it holds an HF checkpoint), or an earlier run of the same method (that run's base)."""
    source = init_from.resolve(spec, model_dir)
    if source.kind == init_from.RUN:
        meta = ckpt_lib.Checkpointer(ckpt_lib.checkpoint_dir(source.path), read_only=True).metadata()
        earlier = spec_from_dict(meta["spec"])
        if registry.get(earlier.method.kind).transform is not None:  # its base is that run's base
            return base_source(earlier, Path(meta.get("model_dir") or model_dir))
        export = Path(source.path) / EXPORT_DIR
        if (export / "config.json").is_file() and any(export.glob("*.safetensors")):
            return str(export), export, f"the full fine-tune {source.path} (its export/)"
        return (
            None,
            None,
            (
                f"the frozen base is the final checkpoint of the full fine-tune {source.path}, which has "
                f"no HF export; run `ftc export {source.path}` first, then export this run again"
            ),
        )
    if source.kind == init_from.HF_DIR:
        return str(source.base_dir), source.base_dir, f"model.init_from {source.path}"
    base = spec.model.base
    local = Path(base).expanduser()
    if local.is_dir():
        return str(local.resolve()), model_dir, f"model.base {base}"
    if is_loadable_by_transformers(base) and "/" in base:
        return base.split("@")[0], model_dir, f"model.base {base} (Hugging Face id)"
    # A GGUF file or a package: source was converted into this machine's ftc cache; that path means
    # nothing on a serving machine, so the name is the one the GGUF's metadata gives its HF
    # original, else the source as the spec names it (resolve_model_source loads it anywhere).
    gguf = gguf_file(base)
    original = gguf_config.hf_name(gguf_config.read_metadata(GGUFReader(str(gguf)))) if gguf else None
    if original:
        return original, model_dir, f"model.base {base}, a GGUF of {original} (its metadata), converted to {model_dir}"
    return base, model_dir, f"model.base {base}, converted to {model_dir}"


def export_shardings(model: methods.MethodModel, abstract_params, devices=None) -> Any:
    """Params spread over this process's devices on one fsdp axis (by the mesh rules), whatever mesh
    the run trained on: export gathers one parameter at a time, so each device holds a share."""
    devices = list(devices or jax.devices())
    mesh = mesh_lib.make_mesh(1, len(devices), 1, devices)
    infos = {i.path: i for i in shapes.param_infos(shapes.abstract_boxed_params(model.module))}

    def one(path, _):
        info = infos[shapes.path_str(path)]
        partition, _ = sharding_rules.param_partition(info.axes, info.shape, dict(mesh.shape))
        return mesh_lib.param_sharding(mesh, partition)

    return jax.tree_util.tree_map_with_path(one, abstract_params)


USE_GOOD = "export the newest good one with --step {step}"


def not_a_run(run_dir: Path) -> str:
    """Why `run_dir` cannot be exported: no checkpoints/; naming the run it lies in, if any (a
    checkpoint step's directory is exported as its run with --step)."""
    message = f"{run_dir}: no checkpoints/ directory (is it a run directory of `ftc run`?)"
    enclosing = next((p for p in run_dir.parents if is_run_dir(p)), None)
    if enclosing is None:
        return message
    step = run_dir.name if run_dir.parent.name == "checkpoints" and run_dir.name.isdigit() else None
    how = f"ftc export {enclosing}" + (f" --step {step}" if step else "")
    return f"{message}; it lies inside the run directory {enclosing}: export that run ({how})"


def load_run(run_dir: str | os.PathLike, step: int | None = None, *, use_good: str = USE_GOOD) -> TrainedRun:
    """The parameters of a run's latest (or `step`) checkpoint and everything needed to export them.
    `use_good`: how the caller's user reads an older checkpoint ({step}), named when the newest is damaged."""

    started = time.perf_counter()
    run_dir = Path(run_dir).absolute()
    directory = ckpt_lib.checkpoint_dir(str(run_dir))
    if not os.path.isdir(directory):
        raise ExportError(not_a_run(run_dir))
    reader = ckpt_lib.Checkpointer(directory, read_only=True)
    steps = reader.all_steps()
    if not steps:
        raise ExportError(f"{directory}: no complete checkpoint to export")
    if step is not None and step not in steps:
        raise ExportError(f"{directory}: no checkpoint at step {step}; there are {', '.join(map(str, steps))}")
    step = max(steps) if step is None else step
    damage = integrity.problem(os.path.join(directory, str(step)))
    if damage is not None:  # export reads, never repairs: `ftc run` sets a damaged checkpoint aside
        good = [s for s in steps if s < step and integrity.problem(os.path.join(directory, str(s))) is None]
        hint = f"{use_good.format(step=good[-1])}, or" if good else "there is no good one;"
        raise ExportError(
            f"{directory}/{step} is damaged: {damage}. {hint[0].upper() + hint[1:]} run the spec again "
            "(`ftc run` moves a damaged checkpoint aside and resumes from the newest good one)"
        )
    meta = reader.metadata(step)
    spec = spec_from_dict(meta["spec"])
    saved_dir = meta.get("model_dir")
    if saved_dir and (Path(saved_dir) / "config.json").is_file():
        model_dir = Path(saved_dir)
        hf_config = hf_checkpoint.read_hf_config(model_dir)
    else:
        model_dir, hf_config = init_from.read_model_config(spec.model.base)
    model = methods.build_model(hf_config, spec, dtype=jnp.float32, remat="none")
    abstract = methods.abstract_params(model, spec.model.param_dtype)
    shardings = export_shardings(model, abstract)
    # The checkpoint holds what trained; the frozen base is rebuilt from its source (frozen_base.py).
    try:
        params = frozen_base.restore_params(
            reader,
            step,
            meta,
            model,
            jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), abstract, shardings),
            model_dir,
            what=f"cannot export {run_dir} (step {step})",
        )
    except ckpt_lib.ResumeRefusedError as e:  # its base changed or is gone
        raise ExportError(str(e)) from e
    model, params = value_head.strip(model, params)  # PPO's value head: not part of a causal LM
    tok_dir = stages.tokenizer_dir(spec, model_dir)
    saved_hash = meta.get("tokenizer_hash")
    if saved_hash is None:
        tok_dir = None
    else:
        now = stages.tokenizer_hash(tok_dir)
        if now != saved_hash:
            raise ExportError(
                f"{tok_dir}: the tokenizer files {'are gone' if now is None else 'changed'} since "
                f"the run (hash {saved_hash} in the checkpoint, now {now}); the export would ship a "
                f"tokenizer the model was not trained with"
            )
    name, base_dir, note = base_source(spec, Path(model_dir))
    return TrainedRun(
        run_dir,
        spec,
        step,
        Path(model_dir),
        hf_config,
        model,
        params,
        tok_dir,
        name,
        base_dir,
        note,
        time.perf_counter() - started,
    )


# ---------------------------------------------------------------- writing


def check_format(kind: str, format: str, dtype: str) -> None:
    method = registry.get(kind)
    if format not in method.formats:
        hint = method.format_hint
        raise ExportError(
            f"export format {format!r} does not apply to method.kind {kind!r}: expected "
            f"{' or '.join(map(repr, method.formats))}" + (f" ({hint})" if hint else "")
        )
    if dtype not in DTYPES:
        raise ExportError(f"export dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    if dtype in QUANTIZED and format != "gguf":  # llama.cpp's block quantisations exist only in GGUF
        raise ExportError(
            f"export dtype {dtype!r} is for format 'gguf' only (here {format!r}): use float32, bfloat16 or float16"
        )


def _write(trained: TrainedRun, out: Path, format: str, dtype: str) -> tuple[str, ...]:
    """Write the export into `out` (an empty directory); returns the names written there."""
    written = trained.model.method.formats[format]
    if written is None:
        raise ExportError(f"method.kind {trained.kind!r} has no checkpoint export")
    written.write(trained, out, dtype)
    manifest = {
        "format": format,
        "dtype": dtype,
        "method": trained.kind,
        "run_dir": str(trained.run_dir),
        "step": trained.step,
        "base": trained.spec.model.base,  # as the spec names it
        "base_model_name_or_path": trained.base_name,  # what PEFT / adapter configs record
        "base_note": trained.base_note,
        "model_type": trained.hf_config.get("model_type"),
    }
    if trained.spec.model.init_from:
        manifest["init_from"] = trained.spec.model.init_from
    if choices.objective_info(trained.spec.training.objective).get("value_head"):
        manifest["left_out"] = f"{value_head.CHILD}: the value head PPO trained beside the policy"
    if jax.process_index() == 0:
        files.write_json_atomic(out / MANIFEST, manifest)
    return tuple(sorted(p.name for p in out.iterdir())) if jax.process_index() == 0 else ()


def how_to_load(kind: str, format: str, out: Path, base_name: str | None, causal: bool = True) -> str:
    """The Python line that loads an export (printed by `ftc export`)."""
    auto = "AutoModelForCausalLM" if causal else "AutoModel"
    return registry.get(kind).formats[format].how_to_load(out, base_name, auto)


def write_export(
    trained: TrainedRun, out_dir: str | os.PathLike, *, format: str, dtype: str, force: bool = False
) -> ExportResult:
    """Export `trained` into `out_dir` atomically (see `publish`)."""
    check_format(trained.kind, format, dtype)
    out = Path(out_dir).absolute()
    reads = (trained.run_dir, trained.model_dir, trained.base_dir, trained.tokenizer_dir)
    files = publish(out, lambda tmp: _write(trained, tmp, format, dtype), force=force, reads=reads)
    return ExportResult(
        out,
        trained.kind,
        format,
        dtype,
        trained.step,
        files,
        how_to_load(trained.kind, format, out, trained.base_name, is_causal(trained.model.family)),
    )


# `[export] targets` -> the export format that serves each ("vllm": export.format when it is one vLLM loads).
TARGET_FORMATS = {"transformers": "hf", "peft": "peft", "vllm": "hf", "gguf": "gguf", "ollama": "gguf"}


def target_formats(spec) -> tuple[str, ...]:
    """The formats `ftc run` writes besides export.format, one per serving target that needs another
    (into RUN_DIR/export-<format>/); `ftc lint` has refused targets the method cannot serve."""
    e, formats = spec.export, registry.get(spec.method.kind).formats
    wanted = [e.format if t == "vllm" and e.format in ("hf", "peft") else TARGET_FORMATS[t] for t in e.targets or ()]
    return tuple(f for f in dict.fromkeys(wanted) if f != e.format and formats.get(f) is not None)


def export_run(
    run_dir: str | os.PathLike,
    *,
    out: str | os.PathLike | None = None,
    format: str | None = None,
    dtype: str | None = None,
    verify: bool | None = None,
    force: bool = False,
    step: int | None = None,
    tol: float | None = None,
    base_name: str | None = None,
    echo: Callable[[str], None] = print,
):
    """`ftc export`: format, dtype and verify default to the run's spec `[export]`; `out` to
    RUN_DIR/export; `base_name` replaces the base's name that PEFT / adapter configs record
    (base_model_name_or_path). Returns (ExportResult, VerifyResult or None)."""
    run_dir = Path(run_dir).absolute()
    resolved = run_dir / "spec.resolved.json"
    # RUN_DIR first: given runs/x/checkpoints/4, the default --out (inside runs/x) was refused in
    # words about an --out the user never passed, not about the RUN_DIR that is not a run.
    if not os.path.isdir(ckpt_lib.checkpoint_dir(str(run_dir))) and not resolved.is_file():
        raise ExportError(not_a_run(run_dir))
    out = Path(out).absolute() if out is not None else run_dir / EXPORT_DIR
    check_out_dir(out, (run_dir,))  # before the checkpoint is read; publish checks again
    if not os.path.isdir(ckpt_lib.checkpoint_dir(str(run_dir))) and resolved.is_file():
        kind = json.loads(resolved.read_text()).get("method", {}).get("kind")
        by_run = registry.get(kind).exported_by_run if kind in registry.MODULES else None
        if by_run is not None:  # a method whose export `ftc run` writes keeps no checkpoint
            if step is not None:  # was ignored: the run's final export came out as if it were that step
                raise ExportError(
                    f"{run_dir}: method.kind {kind!r} keeps no checkpoints, only its final export; drop --step"
                )
            return by_run(run_dir, out, format=format, dtype=dtype, verify=verify, force=force, tol=tol, echo=echo)
    trained = load_run(run_dir, step)
    if base_name:
        trained = dataclasses.replace(trained, base_name=base_name, base_note=f"--base-name {base_name}")
    e = trained.spec.export
    format, dtype = format or e.format, dtype or e.dtype
    verify = e.verify if verify is None else verify
    started = time.perf_counter()
    result = write_export(trained, out, format=format, dtype=dtype, force=force)
    echo(
        f"exported step {trained.step} of {run_dir.name} ({trained.kind}, format {format}, {dtype}) to "
        f"{result.out_dir} in {time.perf_counter() - started:.1f} s\n  load with: {result.how_to_load}"
    )
    check = None
    if verify:
        tol = tol if tol is not None else VERIFY_TOL.get(dtype) if format == "gguf" else None
        check = verify_export(trained, result, tol=tol, echo=echo)
    cert = certificate.certify(trained, result, check)  # into ftc_export.json
    if check is not None:
        check = dataclasses.replace(check, greedy=certificate.summary(cert), greedy_ok=cert["ok"])
        echo("verify: " + check.summary())
    return result, check
