"""All partitioning knowledge in one place: logical axis names -> mesh axes.

The mesh has four axes:
- "data":   pure data parallelism; parameters are replicated across it.
- "fsdp":   fully sharded data parallelism; the batch is split over it and so is each
            parameter's "embed" dimension (gathered by XLA just before use).
- "tensor": tensor (model) parallelism over the wide dimensions: mlp, heads, vocab.
- "expert": expert parallelism for mixture-of-experts models: each device holds its share of the
            experts ("expert" dimension) and the batch is split over it too; the MoE layers
            exchange tokens between its devices (models/moe.py). Size 1 for dense models.

The batch dimension of every input is split over ("expert", "data", "fsdp"). A parameter dimension whose
size the mesh axis does not divide is replicated instead (and the plan says so), so any model
plans on any mesh. Pure Python: no jax, so a plan is data that prints without a device.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

MESH_AXES = ("data", "fsdp", "tensor", "expert")

# logical axis -> mesh axis (None = replicated). Every name in families.LOGICAL_AXES is here.
PARAM_RULES: dict[str, str | None] = {
    "embed": "fsdp",
    "vocab": "tensor",
    "mlp": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "layers": None,  # scanned layer stacks: each step of the scan needs its own slice whole
    "norm": None,
    "position": None,
    "expert": "expert",
}

# The batch dimension of inputs and activations.
# "expert" leads so that its devices hold contiguous blocks of the batch (what the MoE layers'
# shard_map over it expects).
BATCH_AXES: tuple[str, ...] = ("expert", "data", "fsdp")

PartitionTuple = tuple


class PlanError(ValueError):
    """A spec that cannot run as asked on these devices; the message names the spec keys."""


# one entry per dimension: a mesh axis name or None


def param_partition(
    logical_axes: Sequence[str | None], shape: Sequence[int], mesh_shape: Mapping[str, int]
) -> tuple[PartitionTuple, list[str]]:
    """The partition (one mesh axis or None per dim) for a parameter, and notes on any dim that
    a rule wanted sharded but that stays replicated (indivisible, or mesh axis already used)."""
    if len(logical_axes) != len(shape):
        raise ValueError(f"logical axes {tuple(logical_axes)} do not match shape {tuple(shape)}")
    used: set[str] = set()
    out: list[str | None] = []
    notes: list[str] = []
    for name, size in zip(logical_axes, shape):
        if name is not None and name not in PARAM_RULES:
            raise ValueError(f"unknown logical axis {name!r}; known: {', '.join(PARAM_RULES)}")
        axis = PARAM_RULES.get(name) if name is not None else None
        n = mesh_shape.get(axis, 1) if axis else 1
        if axis is None or n == 1:
            out.append(None)
        elif axis in used:
            notes.append(f"{name} ({size}) replicated: mesh axis {axis!r} already shards another dim")
            out.append(None)
        elif size % n:
            notes.append(f"{name} ({size}) replicated: not divisible by mesh {axis}={n}")
            out.append(None)
        else:
            used.add(axis)
            out.append(axis)
    return tuple(out), notes


def shard_factor(partition: Sequence[str | None], mesh_shape: Mapping[str, int]) -> int:
    """How many ways a parameter with this partition is split (its bytes per device = total / this)."""
    return math.prod(mesh_shape.get(a, 1) for a in partition if a is not None)


def batch_shards(mesh_shape: Mapping[str, int]) -> int:
    return math.prod(mesh_shape.get(a, 1) for a in BATCH_AXES)


def resolve_mesh(data: int, fsdp: int, tensor: int, device_count: int, expert: int = 1) -> dict[str, int]:
    """Mesh axis sizes with at most one -1 ("the rest") filled in; the product must equal the
    device count. Raises ValueError naming the mesh keys otherwise."""
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor, "expert": expert}
    for key, value in sizes.items():
        if value == 0 or value < -1:
            raise PlanError(f"mesh.{key}={value}: expected a positive size or -1 (the rest)")
    rest = [k for k, v in sizes.items() if v == -1]
    if len(rest) > 1:
        raise PlanError(f"mesh: at most one axis may be -1, got {', '.join('mesh.' + k for k in rest)}")
    fixed = math.prod(v for v in sizes.values() if v != -1)
    given = ", ".join(f"{k}={v}" for k, v in sizes.items() if k != "expert" or v != 1)
    if rest:
        if device_count % fixed:
            raise PlanError(
                f"mesh ({given}): the fixed axes multiply to {fixed}, which does not divide the {device_count} devices"
            )
        sizes[rest[0]] = device_count // fixed
    elif fixed != device_count:
        raise PlanError(
            f"mesh ({given}) has {fixed} devices but {device_count} are available; set one axis to -1 to take the rest"
        )
    return sizes


def check_expert_axis(experts: int, model_type: str, mesh_shape: Mapping[str, int]) -> None:
    """Refuses a mesh.expert > 1 for a model without experts, or one that does not divide them."""
    n = mesh_shape.get("expert", 1)
    if n > 1 and not experts:
        raise PlanError(
            f"mesh.expert={n}: model_type {model_type!r} has no experts; "
            f"use mesh.data or mesh.fsdp for data parallelism"
        )
    if n > 1 and experts % n:
        raise PlanError(
            f"mesh.expert={n} does not divide the {experts} experts of this model "
            f"(config.json num_experts / num_local_experts); choose a divisor of {experts}"
        )
