"""The training program of a plan: mesh, optimizer, train-state shardings and the jitted steps.

`ftc run` (pipeline.py) steps it; `ftc plan --compile` (train/compiled_memory.py) compiles the
same train step ahead of time on abstract inputs to read XLA's memory analysis. One builder, so
what the plan reports is what the run executes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import optax
from jax.sharding import Mesh

from ftc.backends.jax.objectives.contract import Objective
from ftc.backends.jax.train import mesh as mesh_lib
from ftc.backends.jax.train import optimizer as opt_lib
from ftc.backends.jax.train import step as ts


@dataclasses.dataclass(frozen=True)
class Program:
    mesh: Mesh
    mask: Any  # trainable mask over the params tree
    schedule: optax.Schedule
    tx: optax.GradientTransformation
    state_abs: dict  # the train state as ShapeDtypeStructs (no shardings)
    state_sh: dict  # its NamedShardings
    steps: ts.Steps

    def abstract_state(self) -> dict:
        """The train state as ShapeDtypeStructs carrying their shardings (a lowering or restore target)."""
        return jax.tree.map(
            lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), self.state_abs, self.state_sh
        )


def build_program(
    plan,
    model,
    abstract_params: Any,
    objective: Objective,
    *,
    reference: bool,
    devices: Sequence[Any] | None = None,
    total_steps: int | None = None,
) -> Program:
    """The program for `plan` (compiler.plan.Plan) of a methods.MethodModel whose parameters are
    `abstract_params`; `reference`: the state carries a frozen copy of the starting parameters
    (pipeline.build_objective says when); `devices`: the mesh's devices (default: all);
    `total_steps`: the schedule's length (default: the plan's, which a run knows once its data is
    read)."""
    mesh = mesh_lib.mesh_for_plan(plan, devices)
    mask = opt_lib.trainable_mask(abstract_params, model.trainable)
    schedule = opt_lib.make_schedule(plan.schedule, total_steps or plan.steps.total_steps)
    tx = opt_lib.make_optimizer(plan.optimizer, schedule, {p.path: p.axes for p in plan.params})
    state_abs = ts.abstract_state(abstract_params, tx, mask, reference=reference)
    state_sh = ts.state_shardings(mesh, state_abs, plan.partitions())
    steps = ts.build_steps(
        model.module,
        tx,
        schedule,
        mask,
        mesh,
        state_sh,
        accum_steps=plan.batch.accum_steps,
        eval_model=model.eval_module,
        objective=objective,
    )
    return Program(mesh, mask, schedule, tx, state_abs, state_sh, steps)
