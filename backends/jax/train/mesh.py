"""The device mesh ("data", "fsdp", "tensor", "expert") and the shardings a Plan names.

Axes are Auto: jax.make_mesh defaults to Explicit in jax 0.10, where sharding constraints inside
the model are refused; Auto lets XLA propagate shardings from the parameters and the batch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ftc.compiler import sharding_rules

AXES = sharding_rules.MESH_AXES


def make_mesh(data: int, fsdp: int, tensor: int, devices: Sequence[Any] | None = None, expert: int = 1) -> Mesh:
    """A mesh of `data*fsdp*tensor*expert` devices (default: all of them, in jax's topology-aware order)."""
    devices = list(jax.devices() if devices is None else devices)
    n = data * fsdp * tensor * expert
    if n != len(devices):
        raise ValueError(
            f"mesh data={data} fsdp={fsdp} tensor={tensor} expert={expert} needs {n} devices, "
            f"{len(devices)} are available"
        )
    shape = (data, fsdp, tensor, expert)
    return jax.make_mesh(shape, AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(AXES), devices=devices)


def mesh_for_plan(plan, devices: Sequence[Any] | None = None) -> Mesh:
    return make_mesh(plan.mesh.data, plan.mesh.fsdp, plan.mesh.tensor, devices, expert=plan.mesh.expert)


def param_sharding(mesh: Mesh, partition: Sequence[str | None]) -> NamedSharding:
    return NamedSharding(mesh, P(*partition))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, leading: int = 0) -> NamedSharding:
    """Sharding of a [*leading, batch, ...] input: batch split over sharding_rules.BATCH_AXES."""
    return NamedSharding(mesh, P(*([None] * leading), sharding_rules.BATCH_AXES))


def params_shardings(mesh: Mesh, params_tree: Any, partitions: Mapping[str, Sequence[str | None]]) -> Any:
    """A tree of NamedShardings matching `params_tree`, from the plan's path -> partition map."""
    from ftc.backends.jax.models.shapes import path_str

    def one(path, leaf):
        name = path_str(path)
        if name not in partitions:
            raise KeyError(f"parameter {name} is not in the plan")
        return param_sharding(mesh, partitions[name])

    return jax.tree_util.tree_map_with_path(one, params_tree)


def put_batch(batch: Mapping[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """Host numpy arrays (this process's rows) -> global jax arrays with `sharding`."""
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}
