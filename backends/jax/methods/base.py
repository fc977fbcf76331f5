"""`[method]` of a spec as a transformation of the base model, asked of the method's registered
record (methods/__init__.py -> `METHOD` in methods/<kind>.py, contract.py) and never of its name.

    model = build_model(hf_config, spec)            # MethodModel: family, arch, base, module, plan
    abstract = abstract_params(model, spec.model.param_dtype)
    params = init_method_params(model, base_params, seed, shardings=..., param_dtype=...)

Every method keeps its trainables inside the one params tree (under the module it adapts), so the
training core, the optimizer and checkpoints need no method-specific code.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from ftc.backends.jax import methods as registry
from ftc.backends.jax.io.hf_checkpoint import abstract_params as family_abstract
from ftc.backends.jax.methods import value_head
from ftc.backends.jax.models import family_for, shapes
from ftc.compiler.sharding_rules import param_partition
from ftc.spec import choices


def method_config(method):
    """The method's config dataclass from a spec's MethodSpec (None for full)."""
    return registry.get(method.kind).config(method)


def trainable_predicate(kind: str) -> Callable[[str], bool]:
    """ "/"-joined param path -> trained? for the model's params tree."""
    return registry.get(kind).trainable


@dataclasses.dataclass(frozen=True)
class MethodModel:
    """The base model and what the method makes of it. No arrays."""

    kind: str
    config: Any  # the method's config (LoraConfig, QLoraConfig, ...; None for full)
    family: Any
    arch: Any
    base: nn.Module  # the family's own module (compute dtype)
    module: nn.Module  # what trains: `base` transformed by the method (== base for full, probe)
    plan: Any  # the transformation's plan (lora_sites.LoraPlan, adapter.AdapterPlan) or None
    value_head: bool = False  # `module` also computes a value per position (value_head.py: PPO)

    @property
    def method(self):
        """The registered `contract.Method` of this kind (with a value head: value_head.wrap of it)."""
        record = registry.get(self.kind)
        return value_head.wrap(record) if self.value_head else record

    @property
    def eval_module(self) -> nn.Module:
        """`module` without LoRA dropout: what evaluation, export checks and reference models run."""
        return self.method.eval_module(self.module)

    def trainable(self, path: str) -> bool:
        return self.method.trainable(path)

    def base_params(self, params) -> Any:
        """The family's params tree inside `params` (method children dropped; for QLoRA the
        quantised sites keep their NF4 storage instead of a kernel)."""
        return self.method.base_params(nn.unbox(params))


def build_model(hf_config: dict, spec, dtype=None, remat: str | None = None) -> MethodModel:
    """The base family's module for `hf_config`, transformed by `spec.method`.

    dtype: compute dtype (default `spec.model.dtype`); remat: default `spec.training.remat`, set on
    the family's arch when it carries a `remat` field (families.py convention)."""
    family = family_for(hf_config)
    arch = family.config_from_hf(hf_config)
    remat = spec.training.remat if remat is None else remat
    if dataclasses.is_dataclass(arch) and "remat" in {f.name for f in dataclasses.fields(arch)}:
        arch = dataclasses.replace(arch, remat=remat)
    elif remat != "none":
        raise ValueError(f"training.remat={remat!r}: model family {family.name} does not support remat")
    base = family.build(arch, jnp.dtype(dtype or spec.model.dtype))
    # The objective's schema entry says whether the policy carries a value head (ppo).
    head = bool(choices.objective_info(spec.training.objective).get("value_head"))
    method = registry.get(spec.method.kind)
    method = value_head.wrap(method) if head else method
    config = method.config(spec.method)
    if method.transform is None:
        return MethodModel(method.kind, config, family, arch, base, base, None)
    module = method.transform(family, arch, base, config)
    return MethodModel(method.kind, config, family, arch, base, module, module.plan, value_head=head)


# ---------------------------------------------------------------- abstract params and shardings


def abstract_params(model: MethodModel, param_dtype) -> Any:
    """The module's params as ShapeDtypeStructs, as `init_method_params` creates them: floating
    leaves in `param_dtype`, except what the method stores in its own dtypes (QLoRA's NF4 storage:
    uint8 codes, int8/float32 scales)."""
    param_dtype = jnp.dtype(param_dtype)
    own_dtype = model.method.own_dtype

    def one(path, s):
        keep = own_dtype(shapes.path_str(path)) or not jnp.issubdtype(s.dtype, jnp.floating)
        return jax.ShapeDtypeStruct(s.shape, s.dtype if keep else param_dtype)

    return jax.tree_util.tree_map_with_path(one, nn.unbox(shapes.abstract_boxed_params(model.module)))


def base_shardings(model: MethodModel, param_shardings) -> Any:
    """Shardings for the *family's* params tree (what `hf_checkpoint.load_model` reads), given the
    shardings of the method's params: a leaf both trees share keeps its sharding; a kernel that
    only the family has (QLoRA stores it as NF4) gets the partition the mesh rules give it."""
    flat_sh = {shapes.path_str(p): s for p, s in jax.tree_util.tree_flatten_with_path(param_shardings)[0]}
    first = next(iter(flat_sh.values()))
    infos = {i.path: i for i in shapes.param_infos(shapes.abstract_boxed_params(model.base))}

    def one(path, _):
        name = shapes.path_str(path)
        if name in flat_sh:
            return flat_sh[name]
        if not isinstance(first, jax.sharding.NamedSharding):
            return first
        mesh = first.mesh
        info = infos[name]
        partition, _ = param_partition(info.axes, info.shape, dict(mesh.shape))
        return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*partition))

    return jax.tree_util.tree_map_with_path(one, family_abstract(model.family, model.arch))


# ---------------------------------------------------------------- parameters


def init_method_params(model: MethodModel, base_params, seed: int, *, shardings=None, param_dtype=jnp.float32):
    """The method's params from the family's `base_params`: LoRA factors (A random, B zero) and,
    for QLoRA, NF4 storage in place of the quantised kernels; adapter weights (up zero). A fresh
    method model computes exactly what its base does. full / probe: `base_params` unchanged.
    `shardings`: the method's params shardings (new leaves are created in theirs)."""
    init = model.method.init_params
    if init is None:
        return base_params
    return init(model.module, base_params, jax.random.key(seed), shardings=shardings, param_dtype=param_dtype)


def disabled_params(model: MethodModel, params) -> Any:
    """`params` with every trainable leaf set to zero when that computes exactly the base model
    (`Method.zero_is_base`: lora, qlora, adapter): a DPO reference model for these methods, with
    no second copy of the base. Otherwise `params` unchanged (a full fine-tune's reference must be
    a frozen copy of the initial params)."""
    if not model.method.zero_is_base:
        return params
    predicate = model.method.trainable
    return jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.zeros_like(x) if predicate(shapes.path_str(p)) else x, params
    )


def kinds_reading(adapter_config: dict) -> tuple[str, ...]:
    """The method kinds that can start from (`model.init_from`) a directory with this
    adapter_config.json, in registry order."""
    return tuple(k for k in registry.kinds() if registry.get(k).reads_init_dir(adapter_config))


def load_trained_weights(model: MethodModel, directory, params) -> Any:
    """`params` with the method's trained weights read from an init_from directory of its own format."""
    return model.method.load_trained(model, directory, params)


# ---------------------------------------------------------------- counts


@dataclasses.dataclass(frozen=True)
class MethodCounts:
    """What `ftc plan` and the run log report about a method."""

    kind: str
    trainable: int  # trained weights
    total: int  # every weight of the model (an NF4 kernel counts its logical weights)
    base_bytes: int  # bytes the frozen (untrained) params hold; 0 for full
    quantized_weights: int  # QLoRA: logical weights stored as NF4
    quantized_bytes: int  # QLoRA: bytes of their NF4 storage
    detail: str  # one line describing the method's settings

    def lines(self) -> list[str]:
        pct = 100.0 * self.trainable / max(self.total, 1)
        out = [f"method {self.kind}: {self.detail}; trains {self.trainable:,} of {self.total:,} weights ({pct:.3f}%)"]
        if self.quantized_weights:
            out.append(
                f"qlora frozen base: {_mib(self.base_bytes)} in all; {self.quantized_weights:,} kernel weights "
                f"stored as NF4 in {_mib(self.quantized_bytes)} = "
                f"{self.quantized_bytes / (2 * self.quantized_weights):.3f} x their bfloat16 bytes"
            )
        return out


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def method_counts(model: MethodModel, params) -> MethodCounts:
    """Counts from the method's params (arrays or ShapeDtypeStructs, e.g. `abstract_params`)."""
    params = nn.unbox(params)
    method = model.method
    if method.summary is not None:
        s = method.summary(params)
        return MethodCounts(
            model.kind, s.trainable, s.total, s.base_bytes, s.quantized_weights, s.quantized_bytes, method.detail(model)
        )
    flat = traverse_util.flatten_dict(params, sep="/")
    trainable = sum(math.prod(x.shape) for k, x in flat.items() if model.trainable(k))
    total = sum(math.prod(x.shape) for x in flat.values())
    frozen_bytes = sum(
        math.prod(x.shape) * np.dtype(x.dtype).itemsize for k, x in flat.items() if not model.trainable(k)
    )
    return MethodCounts(model.kind, trainable, total, frozen_bytes, 0, 0, method.detail(model))
