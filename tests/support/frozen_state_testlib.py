"""Helpers of the frozen-base checkpoint tests (tests/state/test_frozen_base*.py): whole train
states as `ftc run` resumes them, format 1 checkpoints, bitwise comparisons."""

from __future__ import annotations

from pathlib import Path

import jax
import method_runs_testlib as mr
import numpy as np
import orbax.checkpoint as ocp
import train_testlib as tl

from ftc.backends.jax import pipeline as run_lib
from ftc.backends.jax.state import checkpoint as ckpt_lib
from ftc.backends.jax.state import frozen_base
from ftc.backends.jax.train import optimizer as opt_lib
from ftc.backends.jax.train import step as ts
from ftc.spec import spec_from_dict

ONE = jax.sharding.SingleDeviceSharding(jax.devices()[0])


def du(path: Path) -> int:
    """Bytes of every file under `path`."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def spec_on(model_dir: Path, kind: str, name: str, **kw) -> Path:
    """mr.write_spec, with `model_dir` as model.base."""
    path = mr.write_spec(kind, name, **kw)
    path.write_text(path.read_text().replace(f'base = "{mr.root() / "model"}"', f'base = "{model_dir}"'))
    return path


def whole_state(run_dir: Path, step: int | None = None) -> tuple[dict, object, dict]:
    """(whole train state on one device, data state, metadata) of a run's checkpoint, through
    frozen_base.restore_state as `ftc run` resumes it."""
    reader = ckpt_lib.Checkpointer(ckpt_lib.checkpoint_dir(str(run_dir)), read_only=True)
    step = reader.latest_step() if step is None else step
    meta = reader.metadata(step)
    spec = spec_from_dict(meta["spec"])
    model_dir, hf_config = run_lib.read_model_config(spec.model.base)
    model = run_lib.build_model(hf_config, spec)
    plan, abstract = run_lib.plan_for(spec, hf_config, jax.device_count(), model=model)
    mask = opt_lib.trainable_mask(abstract, model.trainable)
    tx = opt_lib.make_optimizer(
        plan.optimizer,
        opt_lib.make_schedule(plan.schedule, plan.steps.total_steps),
        {p.path: p.axes for p in plan.params},
    )
    _, with_reference = run_lib.build_objective(spec, model)
    state_abs = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=ONE),
        ts.abstract_state(abstract, tx, mask, reference=with_reference),
    )
    reader = ckpt_lib.Checkpointer(
        reader.directory, read_only=True, saved_params=frozen_base.saved_mask(abstract, model.method)
    )
    state, data_state = frozen_base.restore_state(reader, step, meta, model_dir, model, state_abs)
    return state, data_state, meta


def write_format_1(run_dir: Path, step: int, state: dict, data_state, meta: dict) -> None:
    """A checkpoint as ftc wrote them before format 2: the whole train state in "state"."""
    options = ocp.CheckpointManagerOptions(enable_async_checkpointing=False, create=True)
    manager = ocp.CheckpointManager(
        ckpt_lib.checkpoint_dir(str(run_dir)), options=options, item_names=("state", "data", "meta")
    )
    old_meta = {k: v for k, v in meta.items() if k != "frozen"} | {"step": step, "format_version": 1}
    manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(ckpt_lib.encode_data_state(data_state)),
            meta=ocp.args.JsonSave(old_meta),
        ),
    )
    manager.wait_until_finished()
    manager.close()


def assert_bitwise(got: dict, want: dict, what: str) -> None:
    got, want = tl.flat(got), tl.flat(want)
    assert set(got) == set(want), (what, sorted(set(got) ^ set(want))[:5])
    for name in want:
        assert np.asarray(got[name]).tobytes() == np.asarray(want[name]).tobytes(), f"{what}: {name} differs"


def saved_params(run_dir: Path) -> set[str]:
    reader = ckpt_lib.Checkpointer(ckpt_lib.checkpoint_dir(str(run_dir)), read_only=True)
    arrays = reader.saved_arrays()
    assert not any(p.startswith(ts.REFERENCE + "/") for p in arrays)
    return {p.removeprefix("params/") for p in arrays if p.startswith("params/")}


WEIGHT_FILES = (".safetensors", ".gguf")


def exported_bytes(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.suffix in WEIGHT_FILES}
