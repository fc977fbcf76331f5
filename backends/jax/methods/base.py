"""`[method]` of a spec as a transformation of the base model: one place maps the method kind to
the module that trains, the trainable predicate, the initial parameters and the counts.

    model = build_model(hf_config, spec)            # MethodModel: family, arch, base, module, plan
    abstract = abstract_params(model, spec.model.param_dtype)
    params = init_method_params(model, base_params, seed, shardings=..., param_dtype=...)

kind     module that trains                       trainable leaves (path predicate)
full     the family's module                      every parameter
lora     lora.LoraModel(base, plan)               <dense>/ftc_lora/{a,b}
qlora    lora.LoraModel(base, plan with NF4)      <dense>/ftc_lora/{a,b}; kernels stored as <dense>/ftc_nf4
adapter  adapters.Adapted(base, plan)             <proj>/ftc_adapter/...
probe    the family's module (frozen features)    none in the model: the head trains on cached features

Every method keeps its trainables inside the one params tree (under the Dense it adapts), so the
training core, the optimizer and checkpoints need no method-specific code.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from ftc.backends.jax.methods import adapter as adapters, lora, qlora
from ftc.backends.jax.models import shapes

KINDS = ("full", "lora", "qlora", "adapter", "probe")


def method_config(method):
    """The method module's config dataclass from a spec's MethodSpec (None for full)."""
    kind = method.kind
    if kind == "full":
        return None
    if kind == "lora":
        return lora.LoraConfig.from_spec(method)
    if kind == "qlora":
        return qlora.QLoraConfig.from_spec(method)
    if kind == "adapter":
        given = {f.name: getattr(method, f.name) for f in dataclasses.fields(adapters.AdapterConfig)
                 if getattr(method, f.name, None) is not None}
        return adapters.AdapterConfig(**given)
    if kind == "probe":
        from ftc.backends.jax.methods import probe

        given = {f.name: getattr(method, f.name) for f in dataclasses.fields(probe.ProbeConfig)
                 if getattr(method, f.name, None) is not None}
        return probe.ProbeConfig(**given)
    raise ValueError(f"method.kind={kind!r}: expected one of {', '.join(KINDS)}")


def trainable_predicate(kind: str) -> Callable[[str], bool]:
    """"/"-joined param path -> trained? for the model's params tree."""
    if kind == "full":
        return lambda path: True
    if kind in ("lora", "qlora"):
        return lora.is_trainable
    if kind == "adapter":
        return adapters.is_trainable
    if kind == "probe":
        return lambda path: False  # the probe's head lives outside the model (probe.run_probe)
    raise ValueError(f"method.kind={kind!r}: expected one of {', '.join(KINDS)}")


@dataclasses.dataclass(frozen=True)
class MethodModel:
    """The base model and what the method makes of it. No arrays."""

    kind: str
    config: Any                 # LoraConfig | QLoraConfig | AdapterConfig | ProbeConfig | None
    family: Any
    arch: Any
    base: nn.Module             # the family's own module (compute dtype)
    module: nn.Module           # what trains: `base` transformed by the method (== base for full, probe)
    plan: Any                   # lora.LoraPlan | adapters.AdapterPlan | None

    @property
    def eval_module(self) -> nn.Module:
        """`module` without LoRA dropout: what evaluation, export checks and reference models run."""
        if isinstance(self.module, lora.LoraModel):
            return self.module.clone(deterministic=True)
        return self.module

    def trainable(self, path: str) -> bool:
        return trainable_predicate(self.kind)(path)

    def base_params(self, params) -> Any:
        """The family's params tree inside `params` (method children dropped; for QLoRA the
        quantised sites keep their NF4 storage instead of a kernel)."""
        if self.kind in ("lora", "qlora"):
            return lora.base_params(nn.unbox(params))
        if self.kind == "adapter":
            return adapters.base_params(nn.unbox(params))
        return params


def build_model(hf_config: dict, spec, dtype=None, remat: str | None = None) -> MethodModel:
    """The base family's module for `hf_config`, transformed by `spec.method`.

    dtype: compute dtype (default `spec.model.dtype`); remat: default `spec.training.remat`, set on
    the family's arch when it carries a `remat` field (families.py convention)."""
    from ftc.backends.jax.models import family_for

    family = family_for(hf_config)
    arch = family.config_from_hf(hf_config)
    remat = spec.training.remat if remat is None else remat
    if dataclasses.is_dataclass(arch) and "remat" in {f.name for f in dataclasses.fields(arch)}:
        arch = dataclasses.replace(arch, remat=remat)
    elif remat != "none":
        raise ValueError(f"training.remat={remat!r}: model family {family.name} does not support remat")
    base = family.build(arch, jnp.dtype(dtype or spec.model.dtype))
    kind = spec.method.kind
    config = method_config(spec.method)
    if kind in ("lora", "qlora"):
        quant = config.quant if kind == "qlora" else None
        lora_config = config.lora if kind == "qlora" else config
        module = lora.adapt(family, arch, base, lora_config, quant=quant)
        return MethodModel(kind, config, family, arch, base, module, module.plan)
    if kind == "adapter":
        module = adapters.adapt(family, arch, base, config)
        return MethodModel(kind, config, family, arch, base, module, module.plan)
    return MethodModel(kind, config, family, arch, base, base, None)


# ---------------------------------------------------------------- abstract params and shardings


def _path_parts(path) -> list[str]:
    return shapes.path_str(path).split("/")


def abstract_params(model: MethodModel, param_dtype) -> Any:
    """The module's params as ShapeDtypeStructs, as `init_method_params` creates them: floating
    leaves in `param_dtype`, except NF4 storage (uint8 codes, int8/float32 scales), which keeps
    its own dtypes."""
    param_dtype = jnp.dtype(param_dtype)

    def one(path, s):
        keep = lora.QUANT_CHILD in _path_parts(path) or not jnp.issubdtype(s.dtype, jnp.floating)
        return jax.ShapeDtypeStruct(s.shape, s.dtype if keep else param_dtype)

    return jax.tree_util.tree_map_with_path(one, nn.unbox(shapes.abstract_boxed_params(model.module)))


def base_shardings(model: MethodModel, param_shardings) -> Any:
    """Shardings for the *family's* params tree (what `hf_checkpoint.load_model` reads), given the
    shardings of the method's params: a leaf both trees share keeps its sharding; a kernel that
    only the family has (QLoRA stores it as NF4) gets the partition the mesh rules give it."""
    from ftc.backends.jax.io.hf_checkpoint import abstract_params as family_abstract
    from ftc.compiler import sharding_rules

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
        partition, _ = sharding_rules.param_partition(info.axes, info.shape, dict(mesh.shape))
        return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*partition))

    return jax.tree_util.tree_map_with_path(one, family_abstract(model.family, model.arch))


# ---------------------------------------------------------------- parameters


def init_method_params(model: MethodModel, base_params, seed: int, *, shardings=None, param_dtype=jnp.float32):
    """The method's params from the family's `base_params`: LoRA factors (A random, B zero) and,
    for QLoRA, NF4 storage in place of the quantised kernels; adapter weights (up zero). A fresh
    method model computes exactly what its base does. full / probe: `base_params` unchanged.
    `shardings`: the method's params shardings (new leaves are created in theirs)."""
    rng = jax.random.key(seed)
    if model.kind in ("lora", "qlora"):
        return lora.init_params(model.module, base_params, rng, shardings=shardings, param_dtype=param_dtype)
    if model.kind == "adapter":
        return adapters.init_params(model.module, base_params, rng, shardings=shardings, param_dtype=param_dtype)
    return base_params


def disabled_params(model: MethodModel, params) -> Any:
    """`params` with every trainable leaf of a lora / qlora / adapter model set to zero: the same
    module then computes exactly its base model (LoRA adds (x A) B * s = 0; an adapter adds
    up(act(down(y))) = 0 since act(0) = 0 for relu, gelu, silu and tanh). A DPO reference model
    for these methods, with no second copy of the base. full / probe: `params` unchanged (a full
    fine-tune's reference must be a frozen copy of the initial params)."""
    if model.kind not in ("lora", "qlora", "adapter"):
        return params
    predicate = trainable_predicate(model.kind)
    return jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.zeros_like(x) if predicate(shapes.path_str(p)) else x, params)


# ---------------------------------------------------------------- counts


@dataclasses.dataclass(frozen=True)
class MethodCounts:
    """What `ftc plan` and the run log report about a method."""

    kind: str
    trainable: int          # trained weights
    total: int              # every weight of the model (an NF4 kernel counts its logical weights)
    base_bytes: int         # bytes the frozen (untrained) params hold; 0 for full
    quantized_weights: int  # QLoRA: logical weights stored as NF4
    quantized_bytes: int    # QLoRA: bytes of their NF4 storage
    detail: str             # one line describing the method's settings

    def lines(self) -> list[str]:
        pct = 100.0 * self.trainable / max(self.total, 1)
        out = [f"method {self.kind}: {self.detail}; trains {self.trainable:,} of {self.total:,} weights ({pct:.3f}%)"]
        if self.quantized_weights:
            out.append(f"qlora frozen base: {_mib(self.base_bytes)} in all; {self.quantized_weights:,} kernel weights "
                       f"stored as NF4 in {_mib(self.quantized_bytes)} = "
                       f"{self.quantized_bytes / (2 * self.quantized_weights):.3f} x their bfloat16 bytes")
        return out


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def method_counts(model: MethodModel, params) -> MethodCounts:
    """Counts from the method's params (arrays or ShapeDtypeStructs, e.g. `abstract_params`)."""
    params = nn.unbox(params)
    if model.kind in ("lora", "qlora"):
        s = lora.method_summary(params)
        c = model.plan.config
        sites = len(model.plan.lora_sites)
        detail = (f"rank {c.rank}, alpha {c.alpha:g}{' (rslora)' if c.rslora else ''}, dropout {c.dropout:g}, "
                  f"{sites} adapted projection(s) x {_layers(model.plan.lora_sites)} layer(s)")
        if model.kind == "qlora":
            q = model.plan.quant
            detail += f", NF4 block {q.block_size}{' + double quantisation' if q.double_quant else ''}"
        return MethodCounts(model.kind, s.trainable, s.total, s.base_bytes, s.quantized_weights, s.quantized_bytes,
                            detail)
    flat = traverse_util.flatten_dict(params, sep="/")
    trainable = sum(math.prod(x.shape) for k, x in flat.items() if model.trainable(k))
    total = sum(math.prod(x.shape) for x in flat.values())
    frozen_bytes = sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for k, x in flat.items()
                       if not model.trainable(k))
    if model.kind == "adapter":
        c = model.plan.config
        detail = (f"{c.placement} placement, reduction factor {c.reduction_factor}, {c.non_linearity}, "
                  f"{len(model.plan.sites)} site(s) x {_layers(model.plan.sites)} layer(s)")
    elif model.kind == "probe":
        c = model.config
        detail = (f"{c.pooling} pooling, {c.head} head: the base is frozen; the head "
                  f"(features x labels{f', hidden {c.head_hidden}' if c.head == 'mlp' else ''}) trains on cached "
                  f"features, outside this count")
    else:
        detail = "every weight trains"
    return MethodCounts(model.kind, trainable, total, frozen_bytes, 0, 0, detail)


def _layers(sites) -> int:
    return max((len(s.hf_modules) for s in sites), default=0)
