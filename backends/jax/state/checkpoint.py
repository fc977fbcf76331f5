"""Checkpoints: Orbax CheckpointManager over <run_dir>/checkpoints/<step>/ with three items:

  state  the train state (step, rng, opt_state, params), sharded arrays (StandardSave); of the
         params only the leaves the Checkpointer's `saved_params` mask keeps (a run keeps those it
         trains: frozen_base.saved_mask), and never a frozen reference copy (train/step.py REFERENCE)
  data   the data iterator's position (grain get_state, as JSON)
  meta   what the checkpoint is: the resolved spec dict, tokenizer hash, plan fingerprint, and how
         the params it leaves out are rebuilt and checked (frozen_base.py)

Format 1 (before the frozen base was left out) held the whole train state; it still restores.

A checkpoint describes itself, so resume and export need no settings re-entered. Restoring goes
through abstract arrays carrying shardings, so a run saved on one mesh restores onto another.
Resuming is refused (`check_resumable`) when a training-relevant key of the spec changed (any key
but compiler.plan.RESUMABLE_CHANGES), the tokenizer changed, or, with the same spec, the plan's
fingerprint did (the base's config.json or ftc's parameter layout changed under the run).
"""

from __future__ import annotations

import base64
import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax
import orbax.checkpoint as ocp

from ftc.backends.jax.models.shapes import path_str
from ftc.backends.jax.state import integrity
from ftc.backends.jax.train.step import REFERENCE  # a frozen copy of the starting params: never saved
from ftc.compiler.plan import RESUMABLE_CHANGES

CHECKPOINT_DIR = "checkpoints"
FORMAT_VERSION = 2  # 1: the whole train state; 2: params' saved leaves only, no reference copy
# meta["plan_fingerprint_version"]: checkpoints without it were written when the fingerprint also
# covered remat and the micro-batch split and resume did not check it; they resume on their spec.
FINGERPRINT_VERSION = 2


def _not_read_only_notice(record: logging.LogRecord) -> bool:
    # Orbax logs a warning every time a manager is opened read-only, which export and
    # inspection always do on purpose; it reads to users as if something were wrong.
    return not str(record.msg).startswith("Given directory is read only")


logging.getLogger("absl").addFilter(_not_read_only_notice)


class ResumeRefusedError(RuntimeError):
    pass


class Checkpointer:
    """Saves and restores train state + data position + metadata under `directory`.

    `saved_params`: a tree of bools matching the params (True: the checkpoint holds the leaf), or
    None for every leaf. The caller rebuilds the rest on restore (frozen_base.restore_state)."""

    def __init__(
        self,
        directory: str,
        *,
        keep: int = 3,
        async_save: bool = True,
        read_only: bool = False,
        saved_params: Any = None,
    ):
        self.directory = os.path.abspath(directory)
        self.saved_params = saved_params
        options = ocp.CheckpointManagerOptions(
            # A read-only manager must say it keeps everything and saves never, or Orbax warns.
            max_to_keep=keep if keep and keep > 0 and not read_only else None,
            save_interval_steps=0 if read_only else 1,
            enable_async_checkpointing=async_save,
            create=not read_only,
            read_only=read_only,
            cleanup_tmp_directories=not read_only,  # leftovers of a save killed midway
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data", "meta"))
        # Steps saved but not yet digested (integrity.py), digested once Orbax has committed them.
        self._undigested: list[int] = []
        self._digests: list = []
        self._digester = None if read_only else ThreadPoolExecutor(1, thread_name_prefix="ftc-digest")

    # ---- queries
    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def metadata(self, step: int | None = None) -> dict:
        step = self._step(step)
        return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    # ---- save / restore
    def save(self, step: int, state: dict, data_state: Any, metadata: dict, *, force: bool = True) -> bool:
        """Start saving (async unless disabled); returns whether a save was started."""
        meta = dict(metadata, step=int(step), format_version=FORMAT_VERSION)
        self._manager.wait_until_finished()  # as Orbax's save would: the previous save is committed
        self._digest_committed()
        started = self._manager.save(
            int(step),
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(saved_state(state, self.saved_params)),
                data=ocp.args.JsonSave(encode_data_state(data_state)),
                meta=ocp.args.JsonSave(meta),
            ),
            force=force,
        )
        if started:
            self._undigested.append(int(step))
        return started

    def restore(self, abstract_state: dict, step: int | None = None) -> tuple[dict, Any, dict]:
        """(state, data_state, metadata) of `step` (default: latest), arrays placed by the
        shardings on `abstract_state`'s ShapeDtypeStructs (the whole train state's). From a format 1
        checkpoint the whole state; from format 2 what it holds: params reduced to the
        `saved_params` leaves and no reference copy, for the caller to complete."""
        step = self._step(step)
        if self.metadata(step).get("format_version", 1) >= 2:
            abstract_state = saved_state(abstract_state, self.saved_params)
        out = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data=ocp.args.JsonRestore(),
                meta=ocp.args.JsonRestore(),
            ),
        )
        return out["state"], decode_data_state(out["data"]), out["meta"]

    def restore_params(self, abstract_params: Any, step: int | None = None) -> Any:
        """The leaves of a checkpoint's params that `abstract_params` names (a sub-tree of what it
        holds: of a format 2 checkpoint, only its saved leaves; frozen_base.restore_params
        gives a run's whole params tree)."""
        step = self._step(step)
        target = {"params": abstract_params}
        restore_args = jax.tree.map(
            lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding, global_shape=s.shape, dtype=s.dtype), target
        )
        out = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True)
            ),
        )
        return out["state"]["params"]

    def saved_arrays(self, step: int | None = None) -> dict[str, tuple[tuple[int, ...], str]]:
        """ "/"-joined path -> (shape, dtype) of every array the "state" item of `step` holds, read
        from Orbax's metadata (no array is read)."""
        step = self._step(step)
        tree = ocp.StandardCheckpointer().metadata(os.path.join(self.directory, str(step), "state")).item_metadata
        return {
            path_str(p): (tuple(m.shape), str(m.dtype))
            for p, m in jax.tree_util.tree_flatten_with_path(tree)[0]
            if m is not None
        }

    def wait(self) -> None:
        """Until every save has been committed and digested."""
        self._manager.wait_until_finished()
        self._digest_committed()
        for future in self._digests:
            future.result()
        self._digests.clear()

    def close(self) -> None:
        self.wait()
        # Orbax awaits its clean-up of a killed save's leftovers only in save(): a run that fails
        # before its first save would leave that thread to die at interpreter exit, with a traceback.
        getattr(self._manager, "_maybe_await_cleanup_tmp_directory", lambda: None)()
        self._manager.close()
        if self._digester is not None:
            self._digester.shutdown()

    def _digest_committed(self) -> None:
        if jax.process_index() == 0:  # the step directories are on storage every process shares
            for step in self._undigested:
                self._digests.append(self._digester.submit(_digest, os.path.join(self.directory, str(step))))
        self._undigested.clear()

    def _step(self, step: int | None) -> int:
        if step is None:
            step = self.latest_step()
            if step is None:
                raise FileNotFoundError(f"no checkpoint in {self.directory}")
        return int(step)


def _digest(step_dir: str) -> None:
    try:
        integrity.write_digest(step_dir)
    except FileNotFoundError:  # pruned by `keep` meanwhile
        pass
    except OSError as e:  # the checkpoint stands; without a digest it is checked structurally
        logging.getLogger(__name__).warning("could not write the digest of %s: %s", step_dir, e)


def set_aside_damaged(run_dir: str, warn: Callable[[str], None]) -> None:
    """Before a run opens its checkpoints: damaged newest ones moved aside (integrity.py), by
    process 0, every process waiting for it."""
    if jax.process_index() == 0:
        integrity.set_aside_damaged(checkpoint_dir(run_dir), warn)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("ftc: damaged checkpoints set aside")


def prune(tree: Any, keep: Any) -> Any:
    """The nested dict `tree` with only the leaves where the matching `keep` tree of bools is
    True; dicts left empty are dropped."""
    if not isinstance(tree, dict):
        raise TypeError(f"prune expects nested dicts of arrays, got {type(tree).__name__}")
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            sub = prune(v, keep[k])
            if sub:
                out[k] = sub
        elif keep[k]:
            out[k] = v
    return out


def saved_state(state: dict, saved_params: Any) -> dict:
    """What a checkpoint holds of a train state (or its abstract twin): everything but the
    reference copy, with params pruned to `saved_params` (None: all of them)."""
    out = {k: v for k, v in state.items() if k != REFERENCE}
    if saved_params is not None:
        out["params"] = prune(state["params"], saved_params)
    return out


def overlay(base: Any, leaves: Any) -> Any:
    """`base` (a nested dict) with every leaf that the sub-tree `leaves` holds put in its place."""
    if not isinstance(leaves, dict):
        return leaves
    out = dict(base)
    for k, v in leaves.items():
        if k not in base:
            raise KeyError(f"checkpoint leaf {k!r} is not in the model's params (keys: {sorted(base)[:8]})")
        out[k] = overlay(base[k], v)
    return out


def checkpoint_dir(run_dir: str) -> str:
    return os.path.join(run_dir, CHECKPOINT_DIR)


def latest_step(run_dir: str) -> int | None:
    """The newest complete checkpoint step of a run directory, or None."""
    directory = checkpoint_dir(run_dir)
    if not os.path.isdir(directory):
        return None
    return Checkpointer(directory, read_only=True).latest_step()


# ------------------------------------------------------------------ data iterator state


def encode_data_state(state: Any) -> dict:
    """grain iterator state as JSON: DataLoader iterators give bytes, dataset iterators dicts."""
    if state is None:
        return {"kind": "none"}
    if isinstance(state, (bytes, bytearray)):
        return {"kind": "bytes", "value": base64.b64encode(bytes(state)).decode("ascii")}
    return {"kind": "json", "value": state}


def decode_data_state(data: dict) -> Any:
    kind = data.get("kind")
    if kind == "bytes":
        return base64.b64decode(data["value"])
    if kind == "json":
        return data["value"]
    return None


# ------------------------------------------------------------------ resume compatibility


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: d}


# A key left out of a resolved spec (because another key excludes it) that means a value.
_UNSET_MEANS = {"data.validation_split": 0.0}


def _may_change(key: str) -> bool:
    return any(key == p or key.startswith(p + ".") for p in RESUMABLE_CHANGES)


def spec_changes(old: dict, new: dict) -> list[tuple[str, Any, Any]]:
    """(key, old value, new value) for every training-relevant key that differs between two
    resolved spec dicts (a key present on one side only counts, shown as <unset>)."""
    a, b = _UNSET_MEANS | _flatten(old), _UNSET_MEANS | _flatten(new)
    unset = "<unset>"
    return [
        (k, a.get(k, unset), b.get(k, unset))
        for k in sorted(set(a) | set(b))
        if not _may_change(k) and a.get(k, unset) != b.get(k, unset)
    ]


def fingerprint_metadata(plan_fingerprint: str) -> dict:
    """What a run's checkpoints record of its plan for `check_resumable`."""
    return {"plan_fingerprint": plan_fingerprint, "plan_fingerprint_version": FINGERPRINT_VERSION}


def check_resumable(
    metadata: dict,
    spec_dict: dict,
    tokenizer_hash: str | None,
    where: str,
    plan_fingerprint: str | None = None,
    data_digest: str | None = None,
) -> None:
    """Raise ResumeRefusedError naming each training-relevant key that changed since the
    checkpoint at `where` was written, with its old and new value; with the spec unchanged, a
    changed `plan_fingerprint` (compiler.plan.Plan.fingerprint of the resuming run), or training
    rows other than the checkpoint's (`data_digest`: data/digest.py rows_digest)."""
    problems = [f"  {k}: {old!r} -> {new!r}" for k, old, new in spec_changes(metadata.get("spec", {}), spec_dict)]
    saved_fingerprint = metadata.get("plan_fingerprint")
    if (
        not problems
        and plan_fingerprint
        and saved_fingerprint != plan_fingerprint
        and metadata.get("plan_fingerprint_version") == FINGERPRINT_VERSION
    ):
        problems.append(
            f"  plan fingerprint: {saved_fingerprint} -> {plan_fingerprint} (the same spec compiles to "
            f"another training program: the base model's config.json, or how this ftc lays out the "
            f"parameters, changed; `ftc plan` prints the parameters)"
        )
    saved_hash = metadata.get("tokenizer_hash")
    if saved_hash and tokenizer_hash and saved_hash != tokenizer_hash:
        problems.append(f"  tokenizer: hash {saved_hash} -> {tokenizer_hash}")
    saved_rows = metadata.get("data_digest")
    if saved_rows and data_digest and saved_rows != data_digest:
        problems.append(
            f"  training rows: digest {saved_rows} -> {data_digest} (data.train's files hold other rows than "
            "when the checkpoint was saved; its data position would continue in other data)"
        )
    if metadata.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
        problems.append(
            f"  checkpoint format {metadata['format_version']} is newer than this ftc reads ({FORMAT_VERSION})"
        )
    if problems:
        raise ResumeRefusedError(
            f"refusing to resume from {where}: training-relevant settings changed since it was saved:\n"
            + "\n".join(problems)
            + "\nRestore the old values to resume, or start a new run (another name or output_dir). "
            f"Keys that may change on resume: {', '.join(RESUMABLE_CHANGES)}."
        )
