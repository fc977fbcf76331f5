"""LoRA (and the machinery QLoRA shares) as a transformation of any family's model.

LoRA (Hu et al. 2021) adds a low-rank update to chosen linear layers:
    y = dense(x) + (dropout(x) @ A @ B) * scale,   scale = alpha / r   (alpha / sqrt(r) with rslora)
A is initialised like Hugging Face PEFT's (kaiming-uniform, a = sqrt(5): U(-1/sqrt(in), 1/sqrt(in)))
and B with zeros, so a fresh LoRA model equals its base exactly.

How it transforms a model: `adapt` wraps the base module in `intercept.Intercepted` with this
module's interceptor on `layers.Dense.__call__` of the planned sites (lora_sites.py: targets and
plan). The factors live in the ordinary "params" collection, as a child `ftc_lora` of the Dense
they adapt:
    layers/self_attn/q_proj/ftc_lora/a   [L, D, r]      axes (layers, embed, None)
    layers/self_attn/q_proj/ftc_lora/b   [L, r, N, H]   axes (layers, None, heads, head_dim)
A keeps the kernel's input dims and B its output dims (and their logical axes), so the factors
shard like the kernel and the family's `nn.scan` stacks them per layer. The training core trains
them with `is_trainable` as its path predicate; every base weight stays frozen and is never
differentiated. (Merging W + scale*A@B before each step instead would cost a full weight gradient
per step and cannot apply dropout to the LoRA branch only; ftc merges only on export.)

Expert projections of a MoE model (`moe.ExpertKernel`, every expert's kernel [E, *in, *out]) get
per-expert factors a [E, *in, r], b [E, r, *out] (axes led by "expert"); the interceptor returns
the kernel plus scale * a @ b for every expert, which the experts' grouped FFN then runs: PEFT's
`target_parameters` compute experts the same way, and so forbid dropout there too.

QLoRA (qlora.py) uses the same model with `plan.quant` set: the kernels of the quantised sites are
replaced by NF4 codes and scales (nf4.py) in a child `ftc_nf4`, dequantised to the compute dtype
inside the intercepted call, so a full-precision weight exists only transiently, one layer at a
time inside the scan.

Parameters, counts and the merge: lora_params.py. Export (lora_export.py): PEFT's adapter format
(peft.py) or the merged model as a plain HF checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ftc.backends.jax.methods import lora_export, nf4
from ftc.backends.jax.methods.contract import Method
from ftc.backends.jax.methods.intercept import Intercepted, deterministic_clone, layer_count
from ftc.backends.jax.methods.lora_params import (
    base_params,
    expected_trainable,
    init_params,
    lora_a_init,
    merged_params,
    method_summary,
)
from ftc.backends.jax.methods.lora_sites import (
    ALL_LINEAR,
    CHILD,
    QUANT_CHILD,
    LoraConfig,
    LoraPlan,
    QuantConfig,
    plan_lora,
)
from ftc.backends.jax.methods.peft import load_peft_adapter, save_peft_adapter
from ftc.backends.jax.models import layers, moe


class LoraDelta(nn.Module):
    """(dropout(x) @ a @ b) * scale; `a` [*in, r] and `b` [r, *out] carry the kernel's logical axes."""

    rank: int
    scale: float
    dropout: float
    in_axes: tuple
    out_axes: tuple
    out_shape: tuple
    dtype: Any = jnp.float32
    deterministic: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        n_in = len(self.in_axes)
        in_shape = tuple(x.shape[-n_in:])
        a = self.param(
            "a",
            nn.with_logical_partitioning(lora_a_init(math.prod(in_shape)), self.in_axes + (None,)),
            in_shape + (self.rank,),
            jnp.float32,
        )
        # b starts at zero: the adapted model equals its base until it trains.
        b = self.param(
            "b",
            nn.with_logical_partitioning(nn.initializers.zeros, (None,) + self.out_axes),
            (self.rank,) + tuple(self.out_shape),
            jnp.float32,
        )
        if self.dropout > 0 and not self.deterministic and self.has_rng("dropout"):
            x = nn.Dropout(self.dropout, deterministic=False)(x)
        x = x.astype(self.dtype)
        # layers.linear: on CPU its weight gradients avoid copying the [tokens, out] gradient.
        h = layers.linear(x, a.astype(self.dtype), n_in)
        y = layers.linear(h, b.astype(self.dtype), 1)
        return y * jnp.asarray(self.scale, self.dtype)


class Nf4Kernel(nn.Module):
    """The quantised kernel's stored arrays (nf4.py layout); returns the kernel in `dtype`.
    `experts` > 0: every expert's kernel, [E, *in, *out], one lead dim."""

    in_axes: tuple
    out_axes: tuple
    block_size: int
    double_quant: bool
    experts: int = 0

    @nn.compact
    def __call__(self, in_shape: tuple, out_shape: tuple, dtype) -> jax.Array:
        lead, lead_axes = ((self.experts,), (moe.EXPERT_AXIS,)) if self.experts else ((), ())
        blocked = lead_axes + (self.in_axes[0],) + tuple(self.out_axes)
        axes = {
            "codes": blocked,
            "absmax": blocked,
            "absmax_q": blocked,
            "absmax_scale": lead_axes + (None,),
            "absmax_offset": lead_axes,
        }
        shapes = nf4.shapes(lead, in_shape, out_shape, block_size=self.block_size, double_quant=self.double_quant)
        q = {
            name: self.param(name, nn.with_logical_partitioning(nn.initializers.zeros, axes[name]), shape, dt)
            for name, (shape, dt) in shapes.items()
        }
        return nf4.dequantize(q, len(lead), in_shape, dtype)


class ExpertLoraDelta(nn.Module):
    """scale * a @ b for every expert: a [E, *in, r], b [E, r, *out] -> [E, *in, *out]."""

    rank: int
    scale: float
    in_axes: tuple
    out_axes: tuple
    in_shape: tuple
    out_shape: tuple
    experts: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self) -> jax.Array:
        E, r, I = self.experts, self.rank, math.prod(self.in_shape)
        a = self.param(
            "a",
            nn.with_logical_partitioning(lora_a_init(I), (moe.EXPERT_AXIS,) + self.in_axes + (None,)),
            (E,) + tuple(self.in_shape) + (r,),
            jnp.float32,
        )
        b = self.param(
            "b",
            nn.with_logical_partitioning(nn.initializers.zeros, (moe.EXPERT_AXIS, None) + self.out_axes),
            (E, r) + tuple(self.out_shape),
            jnp.float32,
        )
        delta = jnp.matmul(a.astype(self.dtype).reshape(E, I, r), b.astype(self.dtype).reshape(E, r, -1))
        delta = delta * jnp.asarray(self.scale, self.dtype)
        return delta.reshape((E,) + tuple(self.in_shape) + tuple(self.out_shape))


def _expert_kernel(module: moe.ExpertKernel, site, plan: LoraPlan, next_fun) -> jax.Array:
    """What an intercepted ExpertKernel returns: its kernel (dequantised from NF4 under QLoRA)
    plus the LoRA update of every expert."""
    in_shape, out_shape = tuple(module.in_shape), tuple(module.out_shape)
    if site.quantized:
        q = plan.quant
        kernel = Nf4Kernel(
            tuple(module.in_axes),
            tuple(module.out_axes),
            q.block_size,
            q.double_quant,
            module.num_experts,
            parent=module,
            name=QUANT_CHILD,
        )(in_shape, out_shape, module.dtype)
    else:
        kernel = next_fun()
    if site.lora:
        c = plan.config
        delta = ExpertLoraDelta(
            c.rank,
            c.scale,
            tuple(module.in_axes),
            tuple(module.out_axes),
            in_shape,
            out_shape,
            module.num_experts,
            module.dtype,
            parent=module,
            name=CHILD,
        )()
        kernel = kernel + delta.astype(kernel.dtype)
    return kernel


def _quantized_dense(module: layers.Dense, x: jax.Array, quant: QuantConfig) -> jax.Array:
    """layers.Dense's computation with its kernel read from NF4 storage (the float kernel is never created)."""
    n_in = len(module.in_axes)
    in_shape, out_shape = tuple(x.shape[-n_in:]), tuple(module.out_shape)
    kernel = Nf4Kernel(
        tuple(module.in_axes),
        tuple(module.out_axes),
        quant.block_size,
        quant.double_quant,
        parent=module,
        name=QUANT_CHILD,
    )(in_shape, out_shape, module.dtype)
    y = jax.lax.dot_general(
        x.astype(module.dtype), kernel, ((tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in))), ((), ()))
    )
    if module.use_bias:
        bias = layers.param_with_axes(
            module, "bias", nn.initializers.zeros, out_shape, tuple(module.out_axes), module.param_dtype
        )
        y = y + bias.astype(module.dtype)
    return y


def interceptor(plan: LoraPlan, deterministic: bool = False):
    """The `nn.intercept_methods` interceptor: quantised kernels and LoRA branches at planned sites."""
    by_path = {site.module_path: site for site in plan.sites}
    c = plan.config

    def intercept(next_fun, args, kwargs, context):
        module = context.module
        site = by_path.get(tuple(module.path)) if context.method_name == "__call__" else None
        if site is None:
            return next_fun(*args, **kwargs)
        if isinstance(module, moe.ExpertKernel):
            return _expert_kernel(module, site, plan, lambda: next_fun(*args, **kwargs))
        if not isinstance(module, layers.Dense):
            raise TypeError(f"LoRA site {site.param_path} is a {type(module).__name__}, expected layers.Dense")
        x = args[0]
        y = _quantized_dense(module, x, plan.quant) if site.quantized else next_fun(*args, **kwargs)
        if site.lora:
            delta = LoraDelta(
                c.rank,
                c.scale,
                float(c.dropout),
                tuple(module.in_axes),
                tuple(module.out_axes),
                tuple(module.out_shape),
                module.dtype,
                deterministic,
                parent=module,
                name=CHILD,
            )(x)
            y = y + delta.astype(y.dtype)
        return y

    return intercept


def adapt(family, arch, module: nn.Module, config: LoraConfig, *, quant: QuantConfig | None = None) -> Intercepted:
    """The transformed model: what the training core builds instead of `family.build(arch, dtype)`."""
    return Intercepted(module, plan_lora(family, arch, config, quant=quant), interceptor)


def is_trainable(path: str) -> bool:
    """The trainable predicate over "/"-joined param paths: the LoRA factors only."""
    return CHILD in path.split("/")


def detail(model) -> str:
    """The counts line's description of a LoRA (or QLoRA) model's settings."""
    c, q = model.plan.config, model.plan.quant
    text = (
        f"rank {c.rank}, alpha {c.alpha:g}{' (rslora)' if c.rslora else ''}, dropout {c.dropout:g}, "
        f"{len(model.plan.lora_sites)} adapted projection(s) x {layer_count(model.plan.lora_sites)} layer(s)"
    )
    if q is not None:
        text += f", NF4 block {q.block_size}{' + double quantisation' if q.double_quant else ''}"
    return text


def load_trained(model, directory, params):
    """`params` with the factors of the PEFT LoRA adapter in `directory` (a model.init_from)."""
    return load_peft_adapter(directory, model.family, model.arch, model.plan, params)


METHOD = Method(
    kind="lora",
    config=LoraConfig.from_spec,
    trainable=is_trainable,
    detail=detail,
    formats=lora_export.FORMATS,
    transform=adapt,
    init_params=init_params,
    base_params=base_params,
    eval_module=deterministic_clone,
    zero_is_base=True,  # (x A) B * s = 0 with A, B = 0
    summary=method_summary,
    reads_init_dir=lambda adapter_config: bool(adapter_config.get("peft_type")),
    load_trained=load_trained,
)


# ---------------------------------------------------------------- one call for tests and tools


@dataclasses.dataclass(frozen=True)
class Initialized:
    """A transformed model ready to train: `apply(params, input_ids, ...)` runs it."""

    plan: LoraPlan
    module: Intercepted
    params: Any
    mask: Any  # tree of bools over `params`: True = trainable

    def apply(self, params, *args, **kwargs):
        return self.module.apply({"params": params}, *args, **kwargs)


def init_method(
    loaded, config: LoraConfig, rng: jax.Array, *, dtype=jnp.float32, quant: QuantConfig | None = None, shardings=None
) -> Initialized:
    """LoRA (or, with `quant`, QLoRA) on a `hf_checkpoint.LoadedModel`, computing in `dtype`."""
    model = adapt(loaded.family, loaded.arch, loaded.family.build(loaded.arch, dtype), config, quant=quant)
    params = init_params(model, loaded.params, rng, shardings=shardings)
    mask = jax.tree_util.tree_map_with_path(lambda p, _: is_trainable("/".join(str(k.key) for k in p)), params)
    return Initialized(model.plan, model, params, mask)


__all__ = [
    "ALL_LINEAR",
    "CHILD",
    "QUANT_CHILD",
    "LoraConfig",
    "LoraPlan",
    "QuantConfig",
    "adapt",
    "base_params",
    "expected_trainable",
    "init_method",
    "init_params",
    "is_trainable",
    "load_peft_adapter",
    "merged_params",
    "method_summary",
    "plan_lora",
    "save_peft_adapter",
]
