"""The frozen part of a run's parameters: left out of its checkpoints, rebuilt from its source.

A LoRA / QLoRA / adapter run trains a small part of its params tree; the rest (the base's
weights, QLoRA's NF4 codes and scales) never changes. A DPO run of a full fine-tune keeps a frozen
copy of its starting params (train/step.py REFERENCE). A checkpoint holds only the `saved_mask`
leaves (what trains, plus QLoRA's double-quantisation statistics, whose float32 mean depends on the
mesh that computed it) and no reference copy, so a LoRA checkpoint of a 70B model is adapter-sized.
Resume and export rebuild the rest as the run started: `initial_params` with the run's own spec
(base from model.base or model.init_from, method params by seed, NF4 quantisation), which is
deterministic; frozen leaves at any step equal those starting leaves bitwise, and the reference is
the starting params. A full fine-tune's checkpoint holds every parameter (everything trains).

Two guards against a base that changed under a run, recorded in the checkpoint's metadata
(meta["frozen"], written by `record`) and checked before anything resumes or exports:
  source     each file the frozen base is read from (the base's *.safetensors, or the checkpoint
             of a `model.init_from` run): its size and a sha256 of its safetensors header and 16
             evenly spaced 4 KiB ranges from its start to its end (the whole file under 1 MiB). Checked
             before the rebuild, naming the file. Not caught here: a same-size rewrite that
             changes only bytes outside the sampled ranges (e.g. one tensor inside a large shard).
  checksums  each rebuilt leaf's bits, hashed on the devices into two position-weighted 32-bit
             sums (one pass over the frozen params). Checked after the rebuild, naming the
             parameter. Catches any changed value, whatever the files look like: one changed
             element always changes the first sum; several cancel in both with odds about 2**-64.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from ftc.backends.jax import methods as method_registry
from ftc.backends.jax.io.hf_checkpoint import abstract_params as family_abstract
from ftc.backends.jax.io.hf_checkpoint import load_model
from ftc.backends.jax.methods import base as methods
from ftc.backends.jax.models.shapes import path_str
from ftc.backends.jax.state import checkpoint as ckpt_lib
from ftc.backends.jax.state import init_from
from ftc.backends.jax.state.fingerprint import checksum_changes, checksums, source_changes, source_fingerprint
from ftc.spec import spec_from_dict


class BaseChangedError(ckpt_lib.ResumeRefusedError):
    """The frozen base a checkpoint leaves out cannot be rebuilt as it was (source gone or changed)."""


# ---------------------------------------------------------------- which leaves a checkpoint holds


def saved_leaf(path: str, method) -> bool:
    """Whether a checkpoint holds the param at "/"-joined `path`, for a method record: what trains,
    and the frozen leaves the record says a rebuild might not reproduce bitwise (`saved_frozen`:
    NF4's double-quantisation statistics, whose float32 mean sums in a mesh-dependent order)."""
    return bool(method.trainable(path)) or bool(method.saved_frozen(path))


def saved_mask(abstract_params: Any, method) -> Any:
    """A tree of bools matching the params: True where a checkpoint holds the leaf."""
    return jax.tree_util.tree_map_with_path(lambda p, _: saved_leaf(path_str(p), method), abstract_params)


def rebuilt_part(tree: dict, mask: Any, with_reference: bool) -> dict:
    """What a restore takes from the rebuild: the whole starting tree when a reference copy is
    rebuilt from it, else the leaves the checkpoint leaves out."""
    if with_reference:
        return tree
    return ckpt_lib.prune(tree, jax.tree.map(lambda keep: not keep, mask))


def needs_rebuild(mask: Any, with_reference: bool) -> bool:
    return with_reference or not all(jax.tree.leaves(mask))


# ---------------------------------------------------------------- the starting params


def initial_params(
    spec,
    model_dir: str | os.PathLike,
    abstract_params,
    param_shardings,
    model=None,
    *,
    init_step: int | None = None,
    method_weights: bool = True,
):
    """Parameters a run starts from, placed by `param_shardings` (a tree matching the method's
    params), from what init_from.resolve says its source is:

    RUN             its checkpoint (`init_step`, default its latest; one that leaves its frozen base
                    out has it rebuilt): the whole tree when that run trained the same method, or a
                    full fine-tune's params as this method's base
    METHOD_DIR      base from model.base, trained weights from the directory (the method record's
                    `load_trained`: PEFT factors, adapter exports)
    HF_DIR          its weights as the base, plus the method weights an export keeps beside them
    BASE            model.base's weights
    The method's fresh parameters (LoRA A random and B zero, NF4 storage, adapters with up = 0) are
    added to a base, so a run starts computing exactly what its base model computes.
    Deterministic: resume and export rebuild a checkpoint's frozen part with it (`rebuild`), where
    `method_weights=False` skips reading the trained weights of a PEFT / adapter init_from."""
    if model is None:
        model = methods.build_model(init_from.read_model_config(spec.model.base)[1], spec)
    dtype = jnp.dtype(spec.model.param_dtype)
    source = init_from.resolve(spec, model_dir, init_step)
    if source.kind == init_from.RUN:
        reader = ckpt_lib.Checkpointer(ckpt_lib.checkpoint_dir(source.path), read_only=True)
        step = source.step
        if step is None:
            raise FileNotFoundError(f"model.init_from={source.path!r}: no complete checkpoint in {reader.directory}")
        if step not in reader.all_steps():
            raise ckpt_lib.ResumeRefusedError(
                f"model.init_from={source.path!r}: its checkpoint at step {step}, which this run started from, is "
                f"gone (there are: {', '.join(map(str, reader.all_steps())) or 'none'})"
            )
        meta = reader.metadata(step)
        earlier = meta.get("spec", {}).get("method", {}).get("kind", "full")
        if earlier == model.kind:
            return restore_params(
                reader,
                step,
                meta,
                model,
                _placed(abstract_params, param_shardings),
                what=f"model.init_from={source.path!r}",
            )
        if method_registry.get(earlier).transform is not None:  # only an untransformed tree is a base
            raise ValueError(
                f"model.init_from={source.path!r} is a {earlier} run; a method.kind={model.kind!r} run "
                f"starts from a run of the same method or of a full fine-tune. Export it first (`ftc "
                f"export {source.path} --format hf` merges a LoRA) and give the export directory as "
                f"model.init_from"
            )
        base = reader.restore_params(
            _placed(family_abstract(model.family, model.arch, dtype), methods.base_shardings(model, param_shardings)),
            step,
        )
    else:
        init_from.check_method(source, model.kind)
        base = load_model(source.base_dir, dtype=dtype, shardings=methods.base_shardings(model, param_shardings)).params
    params = methods.init_method_params(model, base, spec.training.seed, shardings=param_shardings, param_dtype=dtype)
    if source.method_dir is not None and method_weights:
        params = methods.load_trained_weights(model, source.method_dir, params)
        params = jax.device_put(params, param_shardings)
    return params


def _placed(abstract_params, shardings):
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), abstract_params, shardings)


# ---------------------------------------------------------------- recording and rebuilding


def record(spec, model_dir: str | os.PathLike, state: dict, mask: Any, init_step: int | None) -> dict | None:
    """meta["frozen"] for a run's checkpoints, from its train state (fresh or restored whole): how
    the left-out part is rebuilt and what it must equal. None when nothing is left out."""
    with_reference = ckpt_lib.REFERENCE in state
    if not needs_rebuild(mask, with_reference):
        return None
    tree = rebuilt_part(state[ckpt_lib.REFERENCE] if with_reference else state["params"], mask, with_reference)
    return {
        "rebuilt": "reference" if with_reference else "frozen params",
        "init_from": spec.model.init_from,
        "init_from_step": init_step,
        "source": source_fingerprint(spec, model_dir, init_step),
        "checksums": checksums(tree),
    }


def run_model_dir(meta: dict, spec) -> Path:
    """The base model's HF directory of a checkpointed run: the one it recorded, when still there."""
    saved = meta.get("model_dir")
    if saved and (Path(saved) / "config.json").is_file():
        return Path(saved)
    return Path(init_from.read_model_config(spec.model.base)[0])


def rebuild(
    meta: dict, model_dir: str | os.PathLike, model, abstract_params: Any, *, with_reference: bool, mask: Any, what: str
) -> Any:
    """The run's starting params (placed by the shardings on `abstract_params`), after checking
    that its frozen base's source and the rebuilt leaves are what the checkpoint recorded.
    `meta`: the checkpoint's metadata; `what`: how refusals start ("refusing to resume from X")."""
    frozen = meta.get("frozen")
    if not frozen:
        raise BaseChangedError(
            f"{what}: the checkpoint leaves its frozen parameters out but has no record of "
            f"where they come from (metadata 'frozen'); it was not written by ftc"
        )
    # The run's spec, with the model.init_from it started from (a resume may have changed it since).
    spec_dict = dict(meta["spec"], model={**meta["spec"]["model"], "init_from": frozen.get("init_from")})
    if spec_dict["model"]["init_from"] is None:
        del spec_dict["model"]["init_from"]
    spec = spec_from_dict(spec_dict)
    init_step = frozen.get("init_from_step")
    problems = source_changes(frozen["source"], source_fingerprint(spec, model_dir, init_step))
    if problems:
        raise BaseChangedError(
            f"{what}: the frozen base it was trained on changed since it was saved:\n"
            + "\n".join(problems)
            + f"\nThe checkpoint holds only the trained parameters; the rest is rebuilt from "
            f"{frozen['source']['what']}. Put the original files back, or start a new run."
        )
    shardings = jax.tree.map(lambda s: s.sharding, abstract_params)
    initial = initial_params(
        spec,
        Path(model_dir),
        abstract_params,
        shardings,
        model=model,
        init_step=init_step,
        method_weights=with_reference,  # a reference copy is the starting model, init_from's trained weights too
    )
    now, saved = checksums(rebuilt_part(initial, mask, with_reference)), frozen["checksums"]
    if not with_reference and frozen.get("rebuilt") == "reference":  # recorded whole: its frozen part is asked
        saved = {name: value for name, value in saved.items() if name in now}
    problems = checksum_changes(saved, now)
    if problems:
        raise BaseChangedError(
            f"{what}: the frozen parameters rebuilt from {frozen['source']['what']} are not the ones the run "
            f"trained with:\n"
            + "\n".join(problems[:20])
            + (f"\n  ... {len(problems) - 20} more" if len(problems) > 20 else "")
            + "\nIts files read the same where sampled: they changed elsewhere, or this ftc or device computes the "
            "rebuild (e.g. NF4 quantisation) differently. Put the original files back, or start a new run."
        )
    return jax.tree.map(lambda x, s: x if x.dtype == s.dtype else x.astype(s.dtype), initial, abstract_params)


def restore_params(
    reader: ckpt_lib.Checkpointer,
    step: int,
    meta: dict,
    model,
    abstract_params: Any,
    model_dir: str | os.PathLike | None = None,
    *,
    what: str | None = None,
) -> Any:
    """A checkpointed run's whole params tree (the method's, placed by the shardings on
    `abstract_params`): the leaves the checkpoint holds over its rebuilt frozen base. `model`: the
    run's methods.MethodModel; `meta`: the checkpoint's metadata."""
    mask = saved_mask(abstract_params, model.method)
    if meta.get("format_version", 1) < 2 or all(jax.tree.leaves(mask)):
        return reader.restore_params(abstract_params, step)
    model_dir = model_dir or run_model_dir(meta, spec_from_dict(meta["spec"]))
    what = what or f"cannot read {reader.directory}/{step}"
    initial = rebuild(meta, model_dir, model, abstract_params, with_reference=False, mask=mask, what=what)
    return ckpt_lib.overlay(initial, reader.restore_params(ckpt_lib.prune(abstract_params, mask), step))


def restore_state(
    checkpointer: ckpt_lib.Checkpointer,
    step: int,
    meta: dict,
    model_dir: str | os.PathLike,
    model,
    abstract_state: dict,
) -> tuple[dict, Any]:
    """(train state, data state) of checkpoint `step` of a run, placed by the shardings on
    `abstract_state` (the whole state's ShapeDtypeStructs): what it holds, completed by the rebuilt
    frozen params and reference copy (format 2), or all of it (format 1)."""
    state, data_state, _ = checkpointer.restore(abstract_state, step)
    with_reference = ckpt_lib.REFERENCE in abstract_state
    mask = checkpointer.saved_params
    if meta.get("format_version", 1) < 2 or mask is None or not needs_rebuild(mask, with_reference):
        return state, data_state
    initial = rebuild(
        meta,
        model_dir,
        model,
        abstract_state["params"],
        with_reference=with_reference,
        mask=mask,
        what=f"refusing to resume from {checkpointer.directory}/{step}",
    )
    state = dict(state, params=ckpt_lib.overlay(initial, state["params"]))
    if with_reference:  # its own buffers: the train step donates the state
        state[ckpt_lib.REFERENCE] = jax.tree.map(jnp.copy, initial)
    shardings = jax.tree.map(lambda s: s.sharding, abstract_state)
    return jax.device_put(state, shardings), data_state
