"""The parts every export format is made of: errors, the atomic directory, dtypes, tokenizer files,
and the plain HF checkpoint format that several methods write (methods/*.py `ExportFormat`s).

`trained` below is an `io.export.TrainedRun` (the run's MethodModel, params, base and tokenizer).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ftc.backends.jax.io import hf_checkpoint, verify
from ftc.backends.jax.models import shapes
from ftc.backends.jax.state import files
from ftc.backends.jax.state.files import RUN_MARKERS
from ftc.spec import schema_walk

DTYPES = tuple(schema_walk.node_at(("export", "dtype"))["enum"])
MANIFEST = "ftc_export.json"
EXPORT_DIR = "export"
# `[export] targets` wanting another format than export.format: RUN_DIR/export-<format>/ (export.target_formats)
TARGET_EXPORT_DIRS = ("export-hf", "export-peft", "export-gguf")


class ExportError(ValueError):
    """An export ftc refuses (unknown format for the method, non-empty --out, no checkpoint...)."""


class VerifyFailedError(RuntimeError):
    """The export reloads in PyTorch but computes something else than ftc's model (above tolerance)."""


@dataclasses.dataclass(frozen=True)
class ExportResult:
    out_dir: Path
    kind: str
    format: str
    dtype: str
    step: int | None
    files: tuple[str, ...]
    how_to_load: str


_MAX_CHECKED = 100_000  # entries of a directory to replace that are searched for a run


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and any((path / m).exists() for m in RUN_MARKERS)


def out_dir_problem(out_dir: str | os.PathLike, reads: tuple = ()) -> str | None:
    """Why `out_dir` must not be written (or replaced), whatever --force says, or None: it is or
    contains a directory the export reads (`reads`: the run, its base model, its tokenizer), or a
    run directory; or it lies inside a run directory and is not that run's export/."""
    target = Path(os.path.realpath(out_dir))
    for source in (Path(os.path.realpath(r)) for r in reads if r is not None):
        if target == source or target in source.parents:
            return f"it {'is' if target == source else 'contains'} {source}, which this export reads"
    for parent in target.parents:
        if (
            is_run_dir(parent)
            and target != parent / EXPORT_DIR
            and target not in [parent / d for d in TARGET_EXPORT_DIRS]
        ):
            return (
                f"it lies inside the run directory {parent}, where only {EXPORT_DIR}/ (and export-<format>/) is written"
            )
    if is_run_dir(target):
        return "it is a run directory"
    if not target.is_dir():
        return None
    for count, (here, dirs, _) in enumerate(os.walk(target)):
        found = next((Path(here, d) for d in dirs if is_run_dir(Path(here, d))), None)
        if found is not None:
            return f"it contains the run directory {found}"
        if count > _MAX_CHECKED:
            return "it holds too much to check that no run directory is inside it"
    return None


def check_out_dir(out_dir: str | os.PathLike, reads: tuple = ()) -> None:
    problem = out_dir_problem(out_dir, reads)
    if problem:
        raise ExportError(f"refusing --out {out_dir}: {problem} (whatever --force says); choose another --out")


def publish(out_dir: str | os.PathLike, write: Callable[[Path], Any], *, force: bool = False, reads: tuple = ()) -> Any:
    """Run `write(tmp)` on a fresh temporary sibling of `out_dir`, then rename it to `out_dir`.
    A failure removes the temporary directory: `out_dir` is never left half written. An existing
    non-empty `out_dir` is refused unless `force` (then replaced once the new one is complete); one
    that `out_dir_problem` names is refused whatever `force` says: an export never deletes a run,
    nor what it reads (`reads`)."""
    # A symlinked --out is written where it points: renaming onto the link itself replaced the link
    # with a directory beside it and left the old export, stale, where the link had pointed.
    out = Path(os.path.realpath(out_dir))
    check_out_dir(out, reads)
    if out.exists() and not force and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out} exists and is not empty; choose another --out or pass --force to replace it")
    if jax.process_index() != 0:
        return write(out)  # only process 0 writes; the others take part in the gathers
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = files.temp_dir(out.parent, f".{out.name}.partial-")
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


def np_dtype(dtype: str):
    return np.dtype(hf_checkpoint._EXPORT_DTYPES[dtype])


def copy_tokenizer(tok_dir: Path | None, out: Path) -> None:
    if tok_dir is None or jax.process_index() != 0:
        return
    for name in hf_checkpoint.TOKENIZER_FILES:
        if (tok_dir / name).is_file():
            shutil.copyfile(tok_dir / name, out / name)


def update_json(path: Path, **changes) -> None:
    """Set keys of a JSON file another writer made (process 0 only, as it wrote the file)."""
    if jax.process_index() != 0:
        return
    config = json.loads(path.read_text())
    config.update(changes)
    files.write_json_atomic(path, config)


def is_causal(family) -> bool:
    return verify.is_causal_lm({"architectures": [family.hf_architecture]})


def task_type(family) -> str:
    """PEFT's task_type for the family's HF architecture."""
    return "CAUSAL_LM" if is_causal(family) else "FEATURE_EXTRACTION"


def loaded(trained, params) -> hf_checkpoint.LoadedModel:
    m = trained.model
    return hf_checkpoint.LoadedModel(m.family, m.arch, params, trained.hf_config, trained.model_dir)


# ---------------------------------------------------------------- what verify computes on ftc's side


def round_leaves(params, dtype: str, which: Callable[[str], bool]):
    """Floating leaves selected by `which` rounded to `dtype` and back to float32; others untouched."""
    target = jnp.dtype(dtype)

    def one(path, x):
        if not jnp.issubdtype(x.dtype, jnp.floating) or not which(shapes.path_str(path)):
            return x
        return x.astype(target).astype(jnp.float32)

    return jax.tree_util.tree_map_with_path(one, params)


def as_float32(params):
    return jax.tree.map(lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)


def every_weight_exported(model, params, dtype: str) -> tuple:
    """The method's model with all its weights as the export holds them (in `dtype`)."""
    return model.eval_module, round_leaves(params, dtype, lambda path: True)


def trained_weights_exported(model, params, dtype: str) -> tuple:
    """The method's model with its trained weights in `dtype` and its base as it is (an adapter
    served on the base it was trained on)."""
    return model.eval_module, round_leaves(params, dtype, model.trainable)


# ---------------------------------------------------------------- the plain HF checkpoint format


def save_hf(trained, out: Path, params, dtype: str) -> None:
    """The family's `params` as an HF checkpoint with the run's tokenizer."""
    hf_checkpoint.save_hf(out, loaded(trained, params), dtype=dtype, tokenizer_dir=trained.tokenizer_dir)
    from ftc.backends.jax.io.certificate import carry_stop_ids  # imports this module

    carry_stop_ids(out, trained.tokenizer_dir)


def reload_hf(trained, out: Path, scratch: Path, causal: bool):
    return verify.load_reference(out, causal=causal)


def load_base(base_name: str | None, auto: str) -> tuple[str, str]:
    """(imports, expression): Python that loads the base an adapter export is served on, named as
    the export names it; a GGUF or package: source goes through ftc's resolver, which converts it
    into the local ftc cache on first use."""
    from ftc.backends.jax.io.model_source import is_loadable_by_transformers

    if base_name is None or is_loadable_by_transformers(base_name):
        return "", f"{auto}.from_pretrained({base_name!r})"
    return (
        "from ftc.backends.jax.io.model_source import resolve_model_source; ",
        f"{auto}.from_pretrained(resolve_model_source({base_name!r}))",
    )


def load_hf_line(out: Path, base_name: str | None, auto: str) -> str:
    return f"{auto}.from_pretrained({str(out)!r})"


def base_dir(trained) -> Path:
    """The local HF directory of the frozen base an adapter export is served on."""
    if trained.base_dir is None:
        raise ExportError(f"cannot verify: {trained.base_note}")
    return trained.base_dir
