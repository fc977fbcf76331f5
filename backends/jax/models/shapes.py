"""Abstract parameters: shapes, dtypes and logical axes from `jax.eval_shape`, never allocating.

The one place parameters are traced without being created: `abstract_boxed_params` of a module
(a family's, or a method's transformed one); everything else here derives from it. The compiler
plans from these; the program builds shardings and restore targets from them.
Paths are "/"-joined flax parameter paths without the leading "params" collection.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from ftc.backends.jax.models import family_for
from ftc.backends.jax.models.family import Family
from ftc.compiler.plan import ParamInfo


def path_str(path) -> str:
    """A jax key path as "a/b/c" (dict keys, attribute names and indices)."""
    parts = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            parts.append(k.name)
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        else:
            parts.append(str(k))
    return "/".join(parts)


def abstract_boxed_params(module: nn.Module, seq_len: int = 1) -> Any:
    """`module`'s parameters as ShapeDtypeStructs, still boxed in nn.LogicallyPartitioned.

    Traced once per distinct module: a run asks for the same module's tree from the plan, the
    method, the shardings and the checks, and each trace of a real model's init costs 0.1-0.3 s
    of start-up (bench/README.md, "Start-up"). Modules are frozen dataclasses, equal when their
    fields are; one with an unhashable field is traced every time. Callers get fresh containers.
    """
    try:
        hash((module, seq_len))
    except TypeError:
        return _trace_boxed_params(module, seq_len)
    return jax.tree.map(lambda x: x, _boxed_params_cached(module, seq_len))


def _trace_boxed_params(module: nn.Module, seq_len: int) -> Any:
    ids = jax.ShapeDtypeStruct((1, seq_len), jnp.int32)
    variables = jax.eval_shape(lambda i: module.init(jax.random.key(0), i), ids)
    return variables["params"]


@functools.lru_cache(maxsize=32)
def _boxed_params_cached(module: nn.Module, seq_len: int) -> Any:
    return _trace_boxed_params(module, seq_len)


def family_boxed_params(family: Family, arch) -> Any:
    """The family's parameters for `arch`, boxed with their logical axes (traced once per arch)."""
    return abstract_boxed_params(family.build(arch, jnp.float32))


def abstract_params(family: Family, arch, dtype=jnp.float32):
    """Params as jax.ShapeDtypeStruct (the tree `hf_checkpoint.load_model` gives), without allocating."""
    params = nn.meta.unbox(family_boxed_params(family, arch))
    return jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, jnp.dtype(dtype)), params)


def logical_axes(family: Family, arch):
    """Logical axis names of every param: a tuple of str per param, same dict structure as params.

    Tuples are pytree nodes: map over this tree with `is_leaf=lambda x: isinstance(x, tuple)`.
    """
    params = family_boxed_params(family, arch)
    is_boxed = lambda x: isinstance(x, nn.Partitioned)
    missing = [
        k
        for k, v in traverse_util.flatten_dict(params, sep="/", is_leaf=lambda k, v: is_boxed(v)).items()
        if not is_boxed(v)
    ]
    if missing:
        raise ValueError(f"family {family.name}: params without logical axes: {missing}")
    return jax.tree.map(lambda p: tuple(p.names), params, is_leaf=is_boxed)


def param_infos(boxed_params: Any) -> list[ParamInfo]:
    """One ParamInfo per leaf of a (boxed, abstract or concrete) parameter tree. A leaf without
    logical axis names is an error: the compiler would not know how to shard it."""
    axes_tree = nn.get_partition_spec(boxed_params)
    values = nn.unbox(boxed_params)
    flat_axes = dict(
        jax.tree_util.tree_flatten_with_path(axes_tree, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))[0]
    )
    infos = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(values)[0]:
        axes = flat_axes.get(path)
        name = path_str(path)
        shape = tuple(int(d) for d in leaf.shape)
        if axes is None or len(tuple(axes)) != len(shape):
            if len(shape) == 0:
                axes = ()
            else:
                raise ValueError(
                    f"parameter {name} {shape} carries no logical axis names "
                    f"(create it with nn.with_logical_partitioning)"
                )
        infos.append(ParamInfo(name, shape, str(np.dtype(leaf.dtype)), tuple(axes)))
    return infos


def param_infos_for_config(hf_config: dict, param_dtype: str = "float32") -> list[ParamInfo]:
    """The parameters of the family that reads `hf_config` (config.json as a dict)."""
    family = family_for(hf_config)
    arch = family.config_from_hf(hf_config)
    module = family.build(arch, jnp.dtype(param_dtype))
    return param_infos(abstract_boxed_params(module))
