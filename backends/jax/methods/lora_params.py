"""LoRA's parameters: fresh factors (and NF4 storage) on a base, counts, and the merge export uses.

layers/self_attn/q_proj/ftc_lora/a   [L, D, r]      A: PEFT's kaiming-uniform, U(-1/sqrt(in), 1/sqrt(in))
layers/self_attn/q_proj/ftc_lora/b   [L, r, N, H]   B: zeros, so a fresh LoRA model equals its base
layers/mlp/up_proj/ftc_nf4/{codes,absmax,...}       QLoRA: the kernel's NF4 storage (nf4.py) in its place
layers/mlp/experts/down_proj/ftc_lora/a   [L, E, F, r]  an expert projection: factors per expert
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from ftc.backends.jax.io.hf_checkpoint import save_hf
from ftc.backends.jax.methods import nf4
from ftc.backends.jax.methods.intercept import copy_tree, merge, node, set_node, without_child
from ftc.backends.jax.methods.lora_sites import CHILD, QUANT_CHILD, LoraPlan, Site
from ftc.backends.jax.models import shapes


def lora_a_init(fan_in: int):
    """PEFT's default for lora_A: kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        # Drawn flat and reshaped: the same values (threefry numbers elements by their flat
        # index), and XLA:CPU compiles the 1-D draw in a fraction of the multi-dimensional one's time.
        return jax.random.uniform(key, (math.prod(shape),), dtype, -bound, bound).reshape(shape)

    return init


def init_params(model, base_params, rng: jax.Array, *, shardings=None, param_dtype=jnp.float32):
    """Base params plus fresh LoRA factors, with quantised sites' kernels replaced by NF4 storage.

    `model`: the transformed module (lora.adapt); `base_params` is the family's tree (e.g.
    `load_model(...).params`, unboxed). The result does not reference the float kernels of
    quantised sites: drop the loaded tree to free them. `shardings`: optional tree of shardings
    for the full result (e.g. from the plan); the new arrays are created directly in theirs, base
    leaves keep their placement.
    """
    plan = model.plan
    base_params = nn.unbox(base_params)
    kernels = {s.module_path: node(base_params, s.module_path)["kernel"] for s in plan.quant_sites}

    def quantize(kernels):
        new: dict = {}
        for s in plan.quant_sites:
            q = nf4.quantize(
                kernels[s.module_path],
                len(s.lead),
                s.n_in,
                block_size=plan.quant.block_size,
                double_quant=plan.quant.double_quant,
            )
            set_node(new, s.module_path + (QUANT_CHILD,), q)
        return new

    new: dict = {}
    if kernels:
        out_shardings = None
        if shardings is not None:
            abstract_new = jax.eval_shape(quantize, kernels)
            out_shardings = jax.tree.map(lambda _, sh: sh, abstract_new, _subtree_like(shardings, abstract_new))
        new = jax.jit(quantize, out_shardings=out_shardings)(kernels)

    # The factors are drawn call by call, not in one jitted program: XLA:CPU compiles a copy of the
    # threefry hash for every factor there, seconds per site; called one by one, jax compiles
    # `uniform` once per distinct size. Same keys, same values.
    def place(path, value):
        set_node(new, path, jax.device_put(value, None if shardings is None else node(shardings, path)))

    dtype = jnp.dtype(param_dtype)
    for i, s in enumerate(plan.sites):
        if s.lora:
            r = plan.config.rank
            a = lora_a_init(math.prod(s.in_shape))(jax.random.fold_in(rng, i), s.lead + s.in_shape + (r,))
            place(s.module_path + (CHILD, "a"), a.astype(dtype))
            place(s.module_path + (CHILD, "b"), np.zeros(s.lead + (r,) + s.out_shape, dtype))
    params = copy_tree(base_params)
    for s in plan.quant_sites:
        del node(params, s.module_path)["kernel"]
    params = merge(params, new)
    _check_matches(params, nn.unbox(shapes.abstract_boxed_params(model)))
    return params


def _subtree_like(tree, like):
    if isinstance(like, Mapping):
        return {k: _subtree_like(tree[k], v) for k, v in like.items()}
    return tree


def _check_matches(params, abstract) -> None:
    got = {k: (tuple(v.shape), jnp.dtype(v.dtype)) for k, v in traverse_util.flatten_dict(params, sep="/").items()}
    want = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(abstract, sep="/").items()}
    bad = sorted(set(got) ^ set(want)) + sorted(k for k in set(got) & set(want) if got[k][0] != want[k])
    if bad:
        raise ValueError(
            f"LoRA params do not match the transformed model at {bad[:5]} "
            f"(got {[got.get(k) for k in bad[:5]]}, expected {[want.get(k) for k in bad[:5]]})"
        )


def base_params(params) -> Any:
    """`params` without the LoRA subtrees (quantised sites keep their NF4 storage)."""
    return without_child(params, CHILD)


# ---------------------------------------------------------------- counts


@dataclasses.dataclass(frozen=True)
class MethodSummary:
    """What the plan and the run report: counts of weights and the bytes the frozen base holds."""

    trainable: int  # LoRA factor values
    total: int  # every weight of the model (a quantised kernel counts its logical weights)
    base_bytes: int  # bytes held by the frozen base (NF4 codes and scales for quantised kernels)
    quantized_weights: int  # logical weights stored as NF4
    quantized_bytes: int  # bytes of their NF4 storage

    @property
    def quantized_vs_bf16(self) -> float:
        """NF4 bytes of the quantised kernels / the bytes the same kernels take in bfloat16."""
        return self.quantized_bytes / (2 * self.quantized_weights) if self.quantized_weights else float("nan")


def method_summary(params) -> MethodSummary:
    """Counts from a params tree (arrays or ShapeDtypeStructs, e.g. `methods.base.abstract_params`)."""
    trainable = total = base_bytes = q_weights = q_bytes = 0
    for path, leaf in traverse_util.flatten_dict(nn.unbox(params), sep="/").items():
        parts = path.split("/")
        size, nbytes = math.prod(leaf.shape), math.prod(leaf.shape) * jnp.dtype(leaf.dtype).itemsize
        if CHILD in parts:
            trainable += size
            total += size
            continue
        base_bytes += nbytes
        if QUANT_CHILD in parts:
            q_bytes += nbytes
            if parts[-1] == "codes":
                q_weights += 2 * size
                total += 2 * size
        else:
            total += size
    return MethodSummary(trainable, total, base_bytes, q_weights, q_bytes)


def expected_trainable(plan: LoraPlan) -> int:
    """r * (in + out) per adapted layer (and expert)."""
    r = plan.config.rank
    return sum(r * (math.prod(s.in_shape) + math.prod(s.out_shape)) * math.prod(s.lead) for s in plan.lora_sites)


# ---------------------------------------------------------------- merge


def _delta(s: Site, factors: Mapping, scale: float) -> jax.Array:
    """scale * A @ B in the kernel's flax layout (float32), stacked when the site is."""
    a, b = jnp.asarray(factors["a"], jnp.float32), jnp.asarray(factors["b"], jnp.float32)
    lead = a.shape[: len(s.lead)]
    I, O, r = math.prod(s.in_shape), math.prod(s.out_shape), a.shape[-1]
    d = jnp.matmul(a.reshape(*lead, I, r), b.reshape(*lead, r, O)) * scale
    return d.reshape(*lead, *s.in_shape, *s.out_shape)


def dequantized_kernel(s: Site, params) -> jax.Array:
    q = node(params, s.module_path)[QUANT_CHILD]
    return nf4.dequantize(q, len(s.lead), s.in_shape, jnp.float32)


def merged_params(plan: LoraPlan, params, *, include_lora: bool = True) -> Any:
    """The family's plain params: quantised kernels dequantised (float32) and, with `include_lora`,
    scale * A @ B added to each adapted kernel. What `save_hf` exports."""
    params = nn.unbox(params)
    out = copy_tree(without_child(params, CHILD))
    fold = jax.jit(lambda kernel, factors, s: kernel + _delta(s, factors, plan.config.scale), static_argnums=2)
    for s in plan.sites:
        at = node(out, s.module_path)
        kernel = dequantized_kernel(s, params) if s.quantized else at["kernel"]
        at.pop(QUANT_CHILD, None)
        if s.lora and include_lora:
            kernel = fold(jnp.asarray(kernel, jnp.float32), node(params, s.module_path)[CHILD], s)
        at["kernel"] = kernel
    return out


def save_merged(
    out_dir: str | os.PathLike,
    family,
    arch,
    plan: LoraPlan,
    params,
    hf_config: dict,
    *,
    dtype: str = "bfloat16",
    tokenizer_dir=None,
):
    """A plain HF checkpoint of base + scale * A @ B (the QLoRA base dequantised first)."""
    return save_hf(
        out_dir, (family, arch, merged_params(plan, params), hf_config), dtype=dtype, tokenizer_dir=tokenizer_dir
    )
