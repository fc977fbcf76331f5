"""`ftc export`: a run's checkpoint -> a directory that transformers, PEFT or PyTorch loads.

    result, check = export_run("runs/support-bot", format="peft", dtype="bfloat16", verify=True)

A checkpoint describes itself (its metadata holds the resolved spec and the base model's
directory), so the model, the method and its plan are rebuilt from it: nothing is re-entered.

method   format     what the directory holds
full     hf         config.json + safetensors + tokenizer (hf_checkpoint.save_hf)
lora     hf         the merged model: W + scale * A @ B in every adapted kernel
qlora    hf         the merged model on the dequantised NF4 base (what the QLoRA run computed)
lora     peft       adapter_config.json + adapter_model.safetensors (+ tokenizer):
qlora    peft         `PeftModel.from_pretrained(base, dir)`; a QLoRA adapter is served on the
                      original base, as PEFT serves bitsandbytes QLoRA adapters
adapter  hf         the base as an HF checkpoint + ftc_adapters/ (the bottleneck adapters):
                      `load_adapters(AutoModel...from_pretrained(dir), dir / "ftc_adapters")`
                      (a subdirectory: transformers would read a top-level adapter_config.json
                      as a PEFT adapter)
adapter  adapters   the adapters only (ftc.backends.torch_adapters.load_adapters on the base)
probe    hf         written by `ftc run` (probe.run_probe) into RUN_DIR/export; copied elsewhere;
                      `verify_probe_export` checks it against the trained head (RUN_DIR/probe_head.ftc.safetensors)

Every export also holds ftc_export.json (run, step, method, format, dtype, base).

The directory appears whole or not at all: it is written into a temporary sibling and renamed
into place, so a failed export leaves no partial `--out`; a non-empty `--out` is replaced only
with `force`.

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
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ftc.backends.jax.methods import adapter as adapters, lora, base as methods

from ftc.backends.jax.state import frozen_base

from ftc.backends.jax.io import hf_checkpoint

from ftc.backends.jax.models import shapes
from ftc.backends.jax.state import checkpoint as ckpt_lib

FORMATS = {"full": ("hf",), "lora": ("hf", "peft"), "qlora": ("hf", "peft"), "adapter": ("hf", "adapters"),
           "probe": ("hf",)}
DTYPES = ("float32", "bfloat16", "float16")
ADAPTER_SUBDIR = "ftc_adapters"
MANIFEST = "ftc_export.json"
EXPORT_DIR = "export"


class ExportError(ValueError):
    """An export ftc refuses (unknown format for the method, non-empty --out, no checkpoint...)."""


class VerifyFailedError(RuntimeError):
    """The export reloads in PyTorch but computes something else than ftc's model (above tolerance)."""


# ---------------------------------------------------------------- the trained run


@dataclasses.dataclass(frozen=True)
class TrainedRun:
    """A run's checkpointed model, rebuilt from the checkpoint's own metadata."""

    run_dir: Path
    spec: Any                    # ftc.spec.Spec (the checkpoint's resolved spec)
    step: int
    model_dir: Path              # the base model's HF directory
    hf_config: dict
    model: methods.MethodModel   # float32 compute: exports and checks compute in float32
    params: Any                  # the method's params tree (sharded over this process's devices)
    tokenizer_dir: Path | None   # None when the run had no tokenizer files
    base_name: str | None        # PEFT's base_model_name_or_path for the frozen base; None: no HF dir holds it
    base_dir: Path | None        # local HF directory holding the frozen base weights
    base_note: str               # why base_name is None, or where it came from
    load_seconds: float = 0.0    # rebuilding the model and restoring the checkpoint

    @property
    def kind(self) -> str:
        return self.model.kind


def base_source(spec, model_dir: Path) -> tuple[str | None, Path | None, str]:
    """(name PEFT writes as base_model_name_or_path, local HF dir of the frozen base, note).

    The frozen base is `model.base`, unless `model.init_from` started the run from other weights:
    an HF directory (that one), a full fine-tune's run directory (its export/, when it holds an HF
    checkpoint), or an earlier run of the same method (that run's base)."""
    init = spec.model.init_from
    if init:
        init_path = Path(init)
        if os.path.isdir(ckpt_lib.checkpoint_dir(init)):
            reader = ckpt_lib.Checkpointer(ckpt_lib.checkpoint_dir(init), read_only=True)
            meta = reader.metadata()
            from ftc.spec import spec_from_dict

            earlier = spec_from_dict(meta["spec"])
            if earlier.method.kind != "full":
                return base_source(earlier, Path(meta.get("model_dir") or model_dir))
            export = init_path / EXPORT_DIR
            if (export / "config.json").is_file() and any(export.glob("*.safetensors")):
                return str(export), export, f"the full fine-tune {init} (its export/)"
            return None, None, (f"the frozen base is the final checkpoint of the full fine-tune {init}, which has no "
                                f"HF export; run `ftc export {init}` first, then export this run again")
        if (init_path / "config.json").is_file():
            return str(init_path), init_path, f"model.init_from {init}"
    base = spec.model.base
    local = Path(base).expanduser()
    if local.is_dir():
        return str(local.resolve()), model_dir, f"model.base {base}"
    if not base.startswith("package:") and not base.lower().endswith(".gguf") and "/" in base:
        return base.split("@")[0], model_dir, f"model.base {base} (Hugging Face id)"
    return str(model_dir), model_dir, f"model.base {base}, converted to {model_dir}"


def export_shardings(model: methods.MethodModel, abstract_params, devices=None) -> Any:
    """Params spread over this process's devices on one fsdp axis (by the mesh rules), whatever mesh
    the run trained on: export gathers one parameter at a time, so each device holds a share."""
    from ftc.backends.jax.train import mesh as mesh_lib
    from ftc.compiler import sharding_rules

    devices = list(devices or jax.devices())
    mesh = mesh_lib.make_mesh(1, len(devices), 1, devices)
    infos = {i.path: i for i in shapes.param_infos(shapes.abstract_boxed_params(model.module))}

    def one(path, _):
        info = infos[shapes.path_str(path)]
        partition, _ = sharding_rules.param_partition(info.axes, info.shape, dict(mesh.shape))
        return mesh_lib.param_sharding(mesh, partition)

    return jax.tree_util.tree_map_with_path(one, abstract_params)


def load_run(run_dir: str | os.PathLike, step: int | None = None) -> TrainedRun:
    """The parameters of a run's latest (or `step`) checkpoint and everything needed to export them."""
    from ftc.backends.jax.pipeline import read_model_config, tokenizer_dir, tokenizer_hash
    from ftc.spec import spec_from_dict

    started = time.perf_counter()
    run_dir = Path(run_dir).absolute()
    directory = ckpt_lib.checkpoint_dir(str(run_dir))
    if not os.path.isdir(directory):
        raise ExportError(f"{run_dir}: no checkpoints/ directory (is it a run directory of `ftc run`?)")
    reader = ckpt_lib.Checkpointer(directory, read_only=True)
    steps = reader.all_steps()
    if not steps:
        raise ExportError(f"{directory}: no complete checkpoint to export")
    if step is not None and step not in steps:
        raise ExportError(f"{directory}: no checkpoint at step {step}; there are {', '.join(map(str, steps))}")
    step = max(steps) if step is None else step
    meta = reader.metadata(step)
    spec = spec_from_dict(meta["spec"])
    saved_dir = meta.get("model_dir")
    if saved_dir and (Path(saved_dir) / "config.json").is_file():
        model_dir = Path(saved_dir)
        hf_config = hf_checkpoint.read_hf_config(model_dir)
    else:
        model_dir, hf_config = read_model_config(spec.model.base)
    model = methods.build_model(hf_config, spec, dtype=jnp.float32, remat="none")
    abstract = methods.abstract_params(model, spec.model.param_dtype)
    shardings = export_shardings(model, abstract)
    # The checkpoint holds what trained; the frozen base is rebuilt from its source (frozen_base.py).
    try:
        params = frozen_base.restore_params(reader, step, meta, model, jax.tree.map(
            lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), abstract, shardings), model_dir,
            what=f"cannot export {run_dir} (step {step})")
    except ckpt_lib.ResumeRefusedError as e:  # its base changed or is gone
        raise ExportError(str(e)) from e
    tok_dir = tokenizer_dir(spec, model_dir)
    saved_hash = meta.get("tokenizer_hash")
    if saved_hash is None:
        tok_dir = None
    else:
        now = tokenizer_hash(tok_dir)
        if now != saved_hash:
            raise ExportError(f"{tok_dir}: the tokenizer files {'are gone' if now is None else 'changed'} since "
                              f"the run (hash {saved_hash} in the checkpoint, now {now}); the export would ship a "
                              f"tokenizer the model was not trained with")
    name, base_dir, note = base_source(spec, Path(model_dir))
    return TrainedRun(run_dir, spec, step, Path(model_dir), hf_config, model, params, tok_dir, name, base_dir, note,
                      time.perf_counter() - started)


# ---------------------------------------------------------------- writing


@dataclasses.dataclass(frozen=True)
class ExportResult:
    out_dir: Path
    kind: str
    format: str
    dtype: str
    step: int | None
    files: tuple[str, ...]
    how_to_load: str


def check_format(kind: str, format: str, dtype: str) -> None:
    if format not in FORMATS.get(kind, ()):
        hint = {"full": "a full fine-tune exports format 'hf'",
                "adapter": "bottleneck adapters cannot be merged into the base weights; 'hf' writes the base plus "
                           "ftc_adapters/, 'adapters' the adapters only"}.get(kind, "")
        raise ExportError(f"export format {format!r} does not apply to method.kind {kind!r}: expected "
                          f"{' or '.join(map(repr, FORMATS.get(kind, ())))}" + (f" ({hint})" if hint else ""))
    if dtype not in DTYPES:
        raise ExportError(f"export dtype {dtype!r}: expected one of {', '.join(DTYPES)}")


def publish(out_dir: str | os.PathLike, write: Callable[[Path], Any], *, force: bool = False) -> Any:
    """Run `write(tmp)` on a fresh temporary sibling of `out_dir`, then rename it to `out_dir`.
    A failure removes the temporary directory: `out_dir` is never left half written. An existing
    non-empty `out_dir` is refused unless `force` (then replaced once the new one is complete)."""
    out = Path(out_dir).absolute()
    if out.exists() and not force and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out} exists and is not empty; choose another --out or pass --force to replace it")
    if jax.process_index() != 0:
        return write(out)  # only process 0 writes; the others take part in the gathers
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; an export is shared like any output
        result = write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists() or out.is_symlink():
        old = out.parent / f".{out.name}.replaced-{os.getpid()}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()
    return result


def _np_dtype(dtype: str):
    return np.dtype(hf_checkpoint._EXPORT_DTYPES[dtype])


def _copy_tokenizer(tok_dir: Path | None, out: Path) -> None:
    if tok_dir is None or jax.process_index() != 0:
        return
    for name in hf_checkpoint.TOKENIZER_FILES:
        if (tok_dir / name).is_file():
            shutil.copyfile(tok_dir / name, out / name)


def _task_type(trained: TrainedRun) -> str:
    from ftc.backends.jax.io.verify import is_causal_lm

    return "CAUSAL_LM" if is_causal_lm({"architectures": [trained.model.family.hf_architecture]}) else \
        "FEATURE_EXTRACTION"


def _loaded(trained: TrainedRun, params) -> hf_checkpoint.LoadedModel:
    m = trained.model
    return hf_checkpoint.LoadedModel(m.family, m.arch, params, trained.hf_config, trained.model_dir)


def _write(trained: TrainedRun, out: Path, format: str, dtype: str) -> tuple[str, ...]:
    """Write the export into `out` (an empty directory); returns the names written there."""
    m, params = trained.model, trained.params
    kind = m.kind
    if kind == "full":
        hf_checkpoint.save_hf(out, _loaded(trained, params), dtype=dtype, tokenizer_dir=trained.tokenizer_dir)
    elif kind in ("lora", "qlora") and format == "hf":
        hf_checkpoint.save_hf(out, _loaded(trained, lora.merged_params(m.plan, params)), dtype=dtype,
                              tokenizer_dir=trained.tokenizer_dir)
    elif kind in ("lora", "qlora"):
        if trained.base_name is None:
            raise ExportError(f"cannot write a PEFT adapter: {trained.base_note} (or export --format hf, merged)")
        lora.save_peft_adapter(out, m.family, m.arch, m.plan, params, base_model_name_or_path=trained.base_name,
                               task_type=_task_type(trained), dtype=_np_dtype(dtype))
        revision = trained.spec.model.base.partition("@")[2].split("/")[0] if "@" in trained.spec.model.base else ""
        if revision and trained.base_name == trained.spec.model.base.split("@")[0] and jax.process_index() == 0:
            config = json.loads((out / lora.CONFIG_FILE).read_text())
            config["revision"] = revision
            (out / lora.CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        _copy_tokenizer(trained.tokenizer_dir, out)
    elif kind == "adapter":
        target = out
        if format == "hf":
            hf_checkpoint.save_hf(out, _loaded(trained, adapters.base_params(nn.unbox(params))), dtype=dtype,
                                  tokenizer_dir=trained.tokenizer_dir)
            target = out / ADAPTER_SUBDIR
        else:
            _copy_tokenizer(trained.tokenizer_dir, out)
        adapters.export_adapters(m.plan, params, target, dtype=_np_dtype(dtype))
        if jax.process_index() == 0:
            config = json.loads((target / adapters.CONFIG_FILE).read_text())
            config["base_model_name_or_path"] = "." if format == "hf" else trained.base_name
            (target / adapters.CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    else:
        raise ExportError(f"method.kind {kind!r} has no checkpoint export")
    manifest = {"format": format, "dtype": dtype, "method": kind, "run_dir": str(trained.run_dir),
                "step": trained.step, "base_model_name_or_path": trained.base_name,
                "model_type": trained.hf_config.get("model_type")}
    if jax.process_index() == 0:
        (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return tuple(sorted(p.name for p in out.iterdir())) if jax.process_index() == 0 else ()


def how_to_load(kind: str, format: str, out: Path, base_name: str | None, causal: bool = True) -> str:
    auto = "AutoModelForCausalLM" if causal else "AutoModel"
    if kind in ("lora", "qlora") and format == "peft":
        return (f"PeftModel.from_pretrained({auto}.from_pretrained({base_name!r}), {str(out)!r})"
                + (" -- trained against the NF4-dequantised base; on the original base it differs by the "
                   "quantisation error" if kind == "qlora" else ""))
    if kind == "adapter" and format == "hf":
        return (f"model = {auto}.from_pretrained({str(out)!r}); "
                f"ftc.backends.torch_adapters.load_adapters(model, {str(out / ADAPTER_SUBDIR)!r})")
    if kind == "adapter":
        return (f"model = {auto}.from_pretrained({base_name!r}); "
                f"ftc.backends.torch_adapters.load_adapters(model, {str(out)!r})")
    return f"{auto}.from_pretrained({str(out)!r})"


def write_export(trained: TrainedRun, out_dir: str | os.PathLike, *, format: str, dtype: str,
                 force: bool = False) -> ExportResult:
    """Export `trained` into `out_dir` atomically (see `publish`)."""
    check_format(trained.kind, format, dtype)
    out = Path(out_dir).absolute()
    files = publish(out, lambda tmp: _write(trained, tmp, format, dtype), force=force)
    return ExportResult(out, trained.kind, format, dtype, trained.step, files,
                        how_to_load(trained.kind, format, out, trained.base_name, _task_type(trained) == "CAUSAL_LM"))


def copy_probe_export(run_dir: Path, out_dir: str | os.PathLike, *, format: str | None, dtype: str | None,
                      force: bool = False) -> ExportResult:
    """A probe run's export is written by `ftc run` (probe.run_probe, in the spec's export.dtype);
    `ftc export` copies it (atomically) to another directory."""
    from ftc.spec import spec_from_dict

    source = run_dir / EXPORT_DIR
    resolved = run_dir / "spec.resolved.json"
    if not (source / "config.json").is_file() or not resolved.is_file():
        raise ExportError(f"{run_dir}: a probe run writes its export at the end of `ftc run`; there is none "
                          f"({source}) - run the spec first")
    spec = spec_from_dict(json.loads(resolved.read_text()))
    if format not in (None, "hf") or dtype not in (None, spec.export.dtype):
        raise ExportError(f"a probe's export is written by `ftc run` in export.format 'hf', export.dtype "
                          f"{spec.export.dtype!r}; to change them run it again with "
                          f"--set export.dtype=... (the features are cached, so it is quick)")
    out = Path(out_dir).absolute()
    files = tuple(sorted(p.name for p in source.iterdir()))
    if out != source.absolute():
        publish(out, lambda tmp: shutil.copytree(source, tmp, dirs_exist_ok=True), force=force)
    load = ("ftc.backends.torch_probe.load_probe" if (source / "probe_config.json").exists()
            else "AutoModelForSequenceClassification.from_pretrained")
    return ExportResult(out, "probe", "hf", spec.export.dtype, None, files, f"{load}({str(out)!r})")


# ---------------------------------------------------------------- verification


def _round_leaves(params, dtype: str, which: Callable[[str], bool]):
    """Floating leaves selected by `which` rounded to `dtype` and back to float32 (NF4 storage untouched)."""
    target = jnp.dtype(dtype)

    def one(path, x):
        name = shapes.path_str(path)
        if lora.QUANT_CHILD in name.split("/") or not jnp.issubdtype(x.dtype, jnp.floating) or not which(name):
            return x
        return x.astype(target).astype(jnp.float32)

    return jax.tree_util.tree_map_with_path(one, params)


def _as_float32(params):
    return jax.tree.map(lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)


def verify_export(trained: TrainedRun, result: ExportResult, *, tol: float | None = None, batch: int = 2,
                  seq_len: int = 16, seed: int = 0, echo: Callable[[str], None] | None = None):
    """Reload `result` in PyTorch and compare with ftc's model on one fixed padded batch (see the
    module docstring). Returns a verify.VerifyResult (`.ok`, `.summary()`). With `echo`, a
    non-float32 export also reports how far rounding to its dtype moved the trained model's outputs."""
    from ftc.backends.jax.io import verify

    verify.require_torch()
    import torch

    tol = verify.DEFAULT_TOL if tol is None else tol
    m, kind, fmt, dtype = trained.model, result.kind, result.format, result.dtype
    out = result.out_dir
    causal = verify.is_causal_lm({"architectures": [m.family.hf_architecture]})
    output = "logits" if causal else "hidden"
    everything = lambda path: True
    params = trained.params

    # ftc's side: the trained model, float32, with the weights the export holds.
    if kind == "full" or (kind == "adapter" and fmt == "hf"):
        module, ours = m.eval_module, _round_leaves(params, dtype, everything)
    elif kind in ("lora", "qlora") and fmt == "hf" and dtype != "float32":
        module, ours = m.base, _round_leaves(lora.merged_params(m.plan, params), dtype, everything)
    else:  # float32 merged, peft, adapters: the trained method model, its own weights rounded
        module, ours = m.eval_module, _round_leaves(params, dtype, m.trainable)
    ours = _as_float32(ours)

    with tempfile.TemporaryDirectory(prefix="ftc-verify-") as scratch:
        started = time.perf_counter()
        if fmt == "hf":
            reference = verify.load_reference(out, causal=causal)
            if kind == "adapter":
                from ftc.backends import torch_adapters

                torch_adapters.load_adapters(reference, out / ADAPTER_SUBDIR)
        else:
            base_dir = trained.base_dir
            if kind == "qlora":  # the base QLoRA trained against: NF4 dequantised
                base_dir = Path(scratch) / "dequantised"
                dequantised = lora.merged_params(m.plan, params, include_lora=False)
                hf_checkpoint.save_hf(base_dir, _loaded(trained, dequantised), dtype="float32")
            if base_dir is None:
                raise ExportError(f"cannot verify: {trained.base_note}")
            reference = verify.load_reference(base_dir, causal=causal)
            if fmt == "peft":
                import peft

                reference = peft.PeftModel.from_pretrained(reference, str(out)).eval()
            else:
                from ftc.backends import torch_adapters

                torch_adapters.load_adapters(reference, out)
        torch_load = time.perf_counter() - started

        fixed = verify.fixed_batch(int(trained.hf_config.get("vocab_size") or m.arch.vocab_size), batch, seq_len, seed)
        started = time.perf_counter()
        forward = jax.jit(lambda p, ids, mask, pos: module.apply({"params": p}, ids, attention_mask=mask,
                                                                 positions=pos, output=output))
        ftc_out = np.asarray(jax.device_get(forward(ours, fixed.input_ids, fixed.attention_mask, fixed.positions)),
                             np.float32)
        ftc_forward = time.perf_counter() - started
        if echo is not None and dtype != "float32":
            trained_forward = jax.jit(lambda p, ids, mask, pos: m.eval_module.apply(
                {"params": p}, ids, attention_mask=mask, positions=pos, output=output))
            trained_out = np.asarray(jax.device_get(trained_forward(
                _as_float32(params), fixed.input_ids, fixed.attention_mask, fixed.positions)), np.float32)
            moved = float(np.abs(trained_out - ftc_out)[fixed.attention_mask.astype(bool)].max())
            echo(f"rounding the weights to {dtype} moves ftc's {output} by up to {moved:.3g} (not an export error: "
                 f"the check below compares transformers with ftc on the {dtype} weights)")
        started = time.perf_counter()
        with torch.no_grad():
            ref_out = verify.reference_outputs(reference, fixed, output)
        torch_forward = time.perf_counter() - started
    max_diff, scale = verify.compare(ftc_out, ref_out, fixed)
    return verify.VerifyResult(model_dir=out, output=output, max_abs_diff=max_diff, max_abs_reference=scale, tol=tol,
                               shape=tuple(ref_out.shape), real_tokens=int(fixed.attention_mask.sum()),
                               ftc_load_seconds=trained.load_seconds, ftc_forward_seconds=ftc_forward,
                               torch_load_seconds=torch_load, torch_forward_seconds=torch_forward)


PROBE_HEAD = "probe_head.ftc.safetensors"  # the trained head in ftc's layout, beside probe_metrics.json


def verify_probe_export(run_dir: str | os.PathLike, out_dir: str | os.PathLike, *, tol: float | None = None,
                        batch: int = 4, seq_len: int = 12, seed: int = 0):
    """A probe's export against the probe ftc trained: the base's pooled features under ftc (float32,
    weights rounded to the export dtype) through the trained head (RUN_DIR/probe_head.ftc.safetensors),
    vs the export loaded in PyTorch (AutoModelForSequenceClassification, or torch_probe.load_probe
    for the generic format), on fixed right-padded rows that avoid the pad id. Compares class logits."""
    from safetensors.numpy import load_file

    from ftc.backends.jax.methods import probe

    from ftc.backends.jax.io import verify
    from ftc.backends.jax.pipeline import read_model_config
    from ftc.spec import spec_from_dict

    verify.require_torch()
    import torch

    tol = verify.DEFAULT_TOL if tol is None else tol
    run_dir, out = Path(run_dir).absolute(), Path(out_dir).absolute()
    if not (run_dir / PROBE_HEAD).is_file():
        raise ExportError(f"{run_dir}: no {PROBE_HEAD} (the trained head); run the spec again to write it")
    started = time.perf_counter()
    spec = spec_from_dict(json.loads((run_dir / "spec.resolved.json").read_text()))
    model_dir, hf_config = read_model_config(spec.model.base)
    loaded = hf_checkpoint.load_model(model_dir)
    config = methods.method_config(spec.method)
    generic = (out / probe.PROBE_CONFIG_FILE).is_file()
    dtype = spec.export.dtype
    params = _as_float32(_round_leaves(loaded.params, dtype, lambda path: True))
    head = {k: np.asarray(v, np.float32) for k, v in load_file(run_dir / PROBE_HEAD).items()}
    if not generic:  # the exact export stores the head in the export dtype too
        head = {k: np.asarray(jnp.asarray(v).astype(dtype).astype(jnp.float32)) for k, v in head.items()}
    ftc_load = time.perf_counter() - started

    exported = json.loads((out / "config.json").read_text())
    pad = exported.get("pad_token_id")
    pad = 0 if pad is None else int(pad)
    rng = np.random.default_rng(seed)
    vocab = int(hf_config["vocab_size"])
    rows = [[int(t) for t in rng.integers(0, vocab - 1, size=max(1, seq_len - 3 * i))] for i in range(batch)]
    rows = [[t + 1 if t >= pad else t for t in row] for row in rows]  # ids in [0, vocab) without the pad id
    data = probe.ClassificationArrays.from_token_lists(rows, [0] * batch, pad_id=pad)

    started = time.perf_counter()
    module = loaded.family.build(loaded.arch, jnp.float32)
    feats = probe.compute_features(module, params, data, pooling=config.pooling, batch_size=batch,
                                   pooled_output=probe.uses_pooler(loaded.family.model_types[0], config))
    ours = probe.predict_logits(head, feats)
    ftc_forward = time.perf_counter() - started
    started = time.perf_counter()
    if generic:
        from ftc.backends import torch_probe

        reference = torch_probe.load_probe(out, dtype=torch.float32).eval()
    else:
        from transformers import AutoModelForSequenceClassification

        reference = AutoModelForSequenceClassification.from_pretrained(out, dtype=torch.float32, local_files_only=True,
                                                                        trust_remote_code=False).eval()
    torch_load = time.perf_counter() - started
    started = time.perf_counter()
    with torch.no_grad():
        theirs = reference(torch.as_tensor(data.input_ids, dtype=torch.long),
                           attention_mask=torch.as_tensor(data.attention_mask, dtype=torch.long)).logits.float().numpy()
    torch_forward = time.perf_counter() - started
    diff = float(np.abs(ours.astype(np.float64) - theirs.astype(np.float64)).max())
    return verify.VerifyResult(model_dir=out, output="class logits", max_abs_diff=diff,
                               max_abs_reference=float(np.abs(theirs).max()), tol=tol,
                               shape=(theirs.shape[0], data.input_ids.shape[1], theirs.shape[1]),
                               real_tokens=int(data.attention_mask.sum()), ftc_load_seconds=ftc_load,
                               ftc_forward_seconds=ftc_forward, torch_load_seconds=torch_load,
                               torch_forward_seconds=torch_forward)


# ---------------------------------------------------------------- one call


def export_run(run_dir: str | os.PathLike, *, out: str | os.PathLike | None = None, format: str | None = None,
               dtype: str | None = None, verify: bool | None = None, force: bool = False, step: int | None = None,
               tol: float | None = None, echo: Callable[[str], None] = print):
    """`ftc export`: format, dtype and verify default to the run's spec `[export]`; `out` to
    RUN_DIR/export. Returns (ExportResult, VerifyResult or None)."""
    run_dir = Path(run_dir).absolute()
    out = Path(out).absolute() if out is not None else run_dir / EXPORT_DIR
    resolved = run_dir / "spec.resolved.json"
    if not os.path.isdir(ckpt_lib.checkpoint_dir(str(run_dir))) and resolved.is_file():
        kind = json.loads(resolved.read_text()).get("method", {}).get("kind")
        if kind == "probe":
            result = copy_probe_export(run_dir, out, format=format, dtype=dtype, force=force)
            echo(f"probe export: {result.out_dir} (written by ftc run)\n  load with: {result.how_to_load}")
            check = None
            if verify if verify is not None else json.loads(resolved.read_text()).get("export", {}).get("verify"):
                check = verify_probe_export(run_dir, result.out_dir, tol=tol)
                echo("verify: " + check.summary())
            return result, check
    trained = load_run(run_dir, step)
    e = trained.spec.export
    format, dtype = format or e.format, dtype or e.dtype
    verify = e.verify if verify is None else verify
    started = time.perf_counter()
    result = write_export(trained, out, format=format, dtype=dtype, force=force)
    echo(f"exported step {trained.step} of {run_dir.name} ({trained.kind}, format {format}, {dtype}) to "
         f"{result.out_dir} in {time.perf_counter() - started:.1f} s\n  load with: {result.how_to_load}")
    check = None
    if verify:
        check = verify_export(trained, result, tol=tol, echo=echo)
        echo("verify: " + check.summary())
    return result, check
