"""LoRA (and the machinery QLoRA shares) as a transformation of any family's model.

LoRA (Hu et al. 2021) adds a low-rank update to chosen linear layers:
    y = dense(x) + (dropout(x) @ A @ B) * scale,   scale = alpha / r   (alpha / sqrt(r) with rslora)
A is initialised like Hugging Face PEFT's (kaiming-uniform, a = sqrt(5): U(-1/sqrt(in), 1/sqrt(in)))
and B with zeros, so a fresh LoRA model equals its base exactly.

How it transforms a model: `LoraModel(base_module, plan)` shares the base module's scope (same
parameter paths) and runs it under an `nn.intercept_methods` interceptor on `layers.Dense.__call__`
of the planned sites. The factors live in the ordinary "params" collection, as a child `ftc_lora`
of the Dense they adapt:
    layers/self_attn/q_proj/ftc_lora/a   [L, D, r]      axes (layers, embed, None)
    layers/self_attn/q_proj/ftc_lora/b   [L, r, N, H]   axes (layers, None, heads, head_dim)
A keeps the kernel's input dims and B its output dims (and their logical axes), so the factors
shard like the kernel and the family's `nn.scan` stacks them per layer. The training core trains
them with `is_trainable` as its path predicate; every base weight stays frozen and is never
differentiated. (Merging W + scale*A@B before each step instead would cost a full weight gradient
per step and cannot apply dropout to the LoRA branch only; ftc merges only on export.)

QLoRA (qlora.py) uses the same model with `plan.quant` set: the kernels of the quantised sites are
replaced by NF4 codes and scales (nf4.py) in a child `ftc_nf4`, dequantised to the compute dtype
inside the intercepted call, so a full-precision weight exists only transiently, one layer at a
time inside the scan.

Targets (`[method].targets`): "all-linear" (every Dense inside the scanned blocks: not the LM head,
not embeddings, as PEFT's "all-linear"), or a list where each entry is either a module name matched
PEFT's way against the Hugging Face module names (`q_proj`, `self_attn.o_proj`, `attn.c_proj`:
whole dotted components at the end) or the flax path (`mlp/down_proj`), or a regular expression
(any entry with other characters) that must fully match an HF module name or a flax module path.
The factors of a scanned stack are one array, so a target selects a projection in every layer.

Export: `save_peft_adapter` writes adapter_config.json + adapter_model.safetensors in PEFT's format
(`base_model.model.<hf module>.lora_A.weight` [r, in], `.lora_B.weight` [out, r]), which
`peft.PeftModel.from_pretrained` and vLLM load; `save_merged` folds scale * A @ B into the kernels
(dequantising a QLoRA base first) and writes a plain HF checkpoint with `hf_checkpoint.save_hf`.
The HF layout of each factor is derived from the family's `hf_tensors` (`to_hf` of the kernel),
never written per family.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from ftc.backends.jax.models import layers

from ftc.backends.jax.methods import nf4

CHILD = "ftc_lora"
QUANT_CHILD = "ftc_nf4"
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
ALL_LINEAR = "all-linear"
_NAME = re.compile(r"^[A-Za-z0-9_.]+$")


# ---------------------------------------------------------------- configuration and plan


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """The spec's [method] keys for kind = "lora" (defaults as in spec_keys)."""

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    rslora: bool = False
    targets: str | tuple[str, ...] = ALL_LINEAR

    def __post_init__(self):
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise ValueError(f"[method].rank={self.rank!r}: expected an integer >= 1")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"[method].dropout={self.dropout!r}: expected 0 <= dropout < 1")
        if isinstance(self.targets, list):
            object.__setattr__(self, "targets", tuple(self.targets))
        if not self.targets:
            raise ValueError("[method].targets is empty: expected \"all-linear\" or module names/regexes")

    @classmethod
    def from_spec(cls, method) -> "LoraConfig":
        """From an ftc.spec MethodSpec (None means the default)."""
        given = {f.name: getattr(method, f.name) for f in dataclasses.fields(cls)
                 if getattr(method, f.name, None) is not None}
        return cls(**given)

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """NF4 storage of the frozen base kernels (QLoRA)."""

    block_size: int = 64
    double_quant: bool = False


@dataclasses.dataclass(frozen=True)
class Site:
    """One Dense the method touches: where it is in flax and in the HF checkpoint."""

    module_path: tuple[str, ...]   # ("layers", "self_attn", "q_proj")
    hf_modules: tuple[str, ...]    # one per layer for a scanned stack: "model.layers.3.self_attn.q_proj"
    stacked: bool                  # params carry a leading "layers" axis
    kernel_shape: tuple[int, ...]  # one layer's kernel: in dims + out dims
    n_in: int                      # how many leading kernel dims are inputs
    lora: bool
    quantized: bool

    @property
    def in_shape(self) -> tuple[int, ...]:
        return self.kernel_shape[: self.n_in]

    @property
    def out_shape(self) -> tuple[int, ...]:
        return self.kernel_shape[self.n_in:]

    @property
    def param_path(self) -> str:
        return "/".join(self.module_path)


@dataclasses.dataclass(frozen=True)
class LoraPlan:
    """Which Dense layers get LoRA factors and which are stored quantised. Hashable, no arrays."""

    config: LoraConfig
    sites: tuple[Site, ...]
    quant: QuantConfig | None = None
    model_type: str = ""

    @property
    def lora_sites(self) -> tuple[Site, ...]:
        return tuple(s for s in self.sites if s.lora)

    @property
    def quant_sites(self) -> tuple[Site, ...]:
        return tuple(s for s in self.sites if s.quantized)


@functools.lru_cache(maxsize=16)
def _dense_inputs(family, arch) -> dict[tuple[str, ...], int]:
    """Module path -> number of input dims, for every layers.Dense the model calls (abstract trace)."""
    seen: dict[tuple[str, ...], int] = {}

    def record(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and isinstance(context.module, layers.Dense):
            seen[tuple(context.module.path)] = len(context.module.in_axes)
        return next_fun(*args, **kwargs)

    module = family.build(arch, jnp.float32)
    with nn.intercept_methods(record):
        jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))
    return seen


def linear_sites(family, arch) -> list[Site]:
    """Every layers.Dense of the model with its HF module names (lora/quantized unset)."""
    from ftc.backends.jax.io.hf_checkpoint import abstract_params, logical_axes

    tensors = family.hf_tensors(arch)
    n_in = _dense_inputs(family, arch)
    flat_params = traverse_util.flatten_dict(abstract_params(family, arch), sep="/")
    flat_axes = traverse_util.flatten_dict(logical_axes(family, arch), sep="/",
                                           is_leaf=lambda k, v: isinstance(v, tuple))
    sites = []
    for path, n in sorted(n_in.items()):
        key = "/".join(path) + "/kernel"
        spec = tensors.get(key)
        if spec is None or not all(name.endswith(".weight") for name in spec.names):
            continue
        stacked = flat_axes[key][:1] == ("layers",)
        shape = tuple(flat_params[key].shape)[1 if stacked else 0:]
        hf_modules = tuple(name[: -len(".weight")] for name in spec.names)
        sites.append(Site(path, hf_modules, stacked, shape, n, lora=False, quantized=False))
    return sites


def _target_matches(target: str, site: Site) -> bool:
    flax_path = "/".join(site.module_path)
    if _NAME.match(target) or "/" in target and _NAME.match(target.replace("/", "")):
        dotted, slashed = target.replace("/", "."), target.replace(".", "/")
        in_flax = flax_path == slashed or flax_path.endswith("/" + slashed)
        hits = [m == dotted or m.endswith("." + dotted) for m in site.hf_modules]
    else:
        try:
            pattern = re.compile(target)
        except re.error as e:
            raise ValueError(f"[method].targets entry {target!r} is not a valid regular expression: {e}") from None
        in_flax = pattern.fullmatch(flax_path) is not None
        hits = [pattern.fullmatch(m) is not None for m in site.hf_modules]
    if in_flax:
        return True
    if any(hits) and not all(hits):
        raise ValueError(
            f"[method].targets entry {target!r} matches {site.hf_modules[hits.index(True)]} but not "
            f"{site.hf_modules[hits.index(False)]}: LoRA factors of a scanned stack cover every layer, so a "
            f"target must select a projection in all layers (e.g. {site.module_path[-1]!r})"
        )
    return all(hits)


def select_targets(sites: list[Site], targets) -> set[tuple[str, ...]]:
    """Module paths of the sites `targets` ("all-linear" or names/regexes) selects."""
    if targets == ALL_LINEAR or targets == (ALL_LINEAR,):
        chosen = {s.module_path for s in sites if s.stacked}
        if not chosen:
            raise ValueError("[method].targets=\"all-linear\": the model has no linear layers inside its blocks")
        return chosen
    entries = (targets,) if isinstance(targets, str) else tuple(targets)
    chosen = set()
    for target in entries:
        if target == ALL_LINEAR:
            raise ValueError("[method].targets: \"all-linear\" must be given alone, not inside a list")
        hit = {s.module_path for s in sites if _target_matches(target, s)}
        if not hit:
            names = sorted({s.hf_modules[0].split(".")[-1] for s in sites})
            raise ValueError(
                f"[method].targets entry {target!r} matches no linear layer of this model; its linear "
                f"layers are named {', '.join(names)} (flax paths: "
                f"{', '.join('/'.join(s.module_path) for s in sites)})"
            )
        chosen |= hit
    return chosen


def plan_lora(family, arch, config: LoraConfig, *, quant: QuantConfig | None = None) -> LoraPlan:
    """The sites for `config.targets`; with `quant`, every Dense inside the blocks is also stored
    NF4-quantised (QLoRA quantises all linear layers, LoRA targets or not; the LM head stays)."""
    sites = linear_sites(family, arch)
    chosen = select_targets(sites, config.targets)
    out = []
    for s in sites:
        quantized = quant is not None and s.stacked
        if quantized:
            nf4.check_shape(math.prod(s.in_shape), quant.block_size, f"{s.hf_modules[0]} ({s.param_path}/kernel)")
        if s.module_path in chosen or quantized:
            out.append(dataclasses.replace(s, lora=s.module_path in chosen, quantized=quantized))
    return LoraPlan(config, tuple(out), quant, family.model_types[0])


# ---------------------------------------------------------------- the transformed model


def lora_a_init(fan_in: int):
    """PEFT's default for lora_A: kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


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
        a = self.param("a", nn.with_logical_partitioning(lora_a_init(math.prod(in_shape)), self.in_axes + (None,)),
                       in_shape + (self.rank,), jnp.float32)
        # b starts at zero: the adapted model equals its base until it trains.
        b = self.param("b", nn.with_logical_partitioning(nn.initializers.zeros, (None,) + self.out_axes),
                       (self.rank,) + tuple(self.out_shape), jnp.float32)
        if self.dropout > 0 and not self.deterministic and self.has_rng("dropout"):
            x = nn.Dropout(self.dropout, deterministic=False)(x)
        x = x.astype(self.dtype)
        h = jax.lax.dot_general(x, a.astype(self.dtype), ((tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in))),
                                                          ((), ())))
        y = jnp.tensordot(h, b.astype(self.dtype), axes=1)
        return y * jnp.asarray(self.scale, self.dtype)


class Nf4Kernel(nn.Module):
    """The quantised kernel's stored arrays (nf4.py layout); returns the kernel in `dtype`."""

    in_axes: tuple
    out_axes: tuple
    block_size: int
    double_quant: bool

    @nn.compact
    def __call__(self, in_shape: tuple, out_shape: tuple, dtype) -> jax.Array:
        blocked = (self.in_axes[0],) + tuple(self.out_axes)
        axes = {"codes": blocked, "absmax": blocked, "absmax_q": blocked, "absmax_scale": (None,), "absmax_offset": ()}
        shapes = nf4.shapes((), in_shape, out_shape, block_size=self.block_size, double_quant=self.double_quant)
        q = {name: self.param(name, nn.with_logical_partitioning(nn.initializers.zeros, axes[name]), shape, dt)
             for name, (shape, dt) in shapes.items()}
        return nf4.dequantize(q, 0, in_shape, dtype)


def _quantized_dense(module: layers.Dense, x: jax.Array, quant: QuantConfig) -> jax.Array:
    """layers.Dense's computation with its kernel read from NF4 storage (the float kernel is never created)."""
    n_in = len(module.in_axes)
    in_shape, out_shape = tuple(x.shape[-n_in:]), tuple(module.out_shape)
    kernel = Nf4Kernel(tuple(module.in_axes), tuple(module.out_axes), quant.block_size, quant.double_quant,
                       parent=module, name=QUANT_CHILD)(in_shape, out_shape, module.dtype)
    y = jax.lax.dot_general(x.astype(module.dtype), kernel,
                            ((tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in))), ((), ())))
    if module.use_bias:
        bias = layers.param_with_axes(module, "bias", nn.initializers.zeros, out_shape, tuple(module.out_axes),
                                      module.param_dtype)
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
        if not isinstance(module, layers.Dense):
            raise TypeError(f"LoRA site {site.param_path} is a {type(module).__name__}, expected layers.Dense")
        x = args[0]
        y = _quantized_dense(module, x, plan.quant) if site.quantized else next_fun(*args, **kwargs)
        if site.lora:
            delta = LoraDelta(c.rank, c.scale, float(c.dropout), tuple(module.in_axes), tuple(module.out_axes),
                              tuple(module.out_shape), module.dtype, deterministic, parent=module, name=CHILD)(x)
            y = y + delta.astype(y.dtype)
        return y

    return intercept


class LoraModel(nn.Module):
    """`base` with LoRA (and NF4 storage for QLoRA): same call signature, same parameter paths
    plus `<dense>/ftc_lora/{a,b}` (and `<dense>/ftc_nf4/...` in place of quantised kernels).
    LoRA dropout applies when a "dropout" rng is given and `deterministic` is False."""

    base: nn.Module
    plan: LoraPlan
    deterministic: bool = False

    def setup(self):
        nn.share_scope(self, self.base)  # no extra "base/" level in parameter paths

    def __call__(self, *args, **kwargs):
        with nn.intercept_methods(interceptor(self.plan, self.deterministic)):
            return self.base(*args, **kwargs)


def adapt(family, arch, module: nn.Module, config: LoraConfig, *, quant: QuantConfig | None = None) -> LoraModel:
    """The transformed model: what the training core builds instead of `family.build(arch, dtype)`."""
    return LoraModel(module, plan_lora(family, arch, config, quant=quant))


def is_trainable(path: str) -> bool:
    """The trainable predicate over "/"-joined param paths: the LoRA factors only."""
    return CHILD in path.split("/")


# ---------------------------------------------------------------- parameters


def _get(tree: Mapping, path: tuple[str, ...]):
    for name in path:
        tree = tree[name]
    return tree


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value


def _copy(tree):
    return {k: _copy(v) for k, v in tree.items()} if isinstance(tree, Mapping) else tree


def abstract_model_params(model: LoraModel):
    """The transformed model's params as ShapeDtypeStructs (unboxed); nothing is allocated."""
    ids = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    return nn.unbox(jax.eval_shape(lambda i: model.init(jax.random.key(0), i), ids)["params"])


def init_params(model: LoraModel, base_params, rng: jax.Array, *, shardings=None, param_dtype=jnp.float32):
    """Base params plus fresh LoRA factors, with quantised sites' kernels replaced by NF4 storage.

    `base_params` is the family's tree (e.g. `load_model(...).params`, unboxed). The result does not
    reference the float kernels of quantised sites: drop the loaded tree to free them.
    `shardings`: optional tree of shardings for the full result (e.g. from the plan); the new arrays
    are created directly in theirs, base leaves keep their placement.
    """
    plan = model.plan
    base_params = nn.unbox(base_params)
    kernels = {s.module_path: _get(base_params, s.module_path)["kernel"] for s in plan.quant_sites}

    def create(kernels, rng):
        new: dict = {}
        for i, s in enumerate(plan.sites):
            lead = (len(s.hf_modules),) if s.stacked else ()
            if s.quantized:
                q = nf4.quantize(kernels[s.module_path], len(lead), s.n_in, block_size=plan.quant.block_size,
                                 double_quant=plan.quant.double_quant)
                _set(new, s.module_path + (QUANT_CHILD,), q)
            if s.lora:
                r = plan.config.rank
                a = lora_a_init(math.prod(s.in_shape))(jax.random.fold_in(rng, i), lead + s.in_shape + (r,))
                _set(new, s.module_path + (CHILD, "a"), a.astype(param_dtype))
                _set(new, s.module_path + (CHILD, "b"), jnp.zeros(lead + (r,) + s.out_shape, param_dtype))
        return new

    out_shardings = None
    if shardings is not None:
        abstract_new = jax.eval_shape(create, kernels, rng)
        out_shardings = jax.tree.map(lambda _, sh: sh, abstract_new, _subtree_like(shardings, abstract_new))
    new = jax.jit(create, out_shardings=out_shardings)(kernels, rng)
    params = _copy(base_params)
    for s in plan.quant_sites:
        del _get(params, s.module_path)["kernel"]
    params = _merge(params, new)
    _check_matches(params, abstract_model_params(model))
    return params


def _subtree_like(tree, like):
    if isinstance(like, Mapping):
        return {k: _subtree_like(tree[k], v) for k, v in like.items()}
    return tree


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for key, value in b.items():
        out[key] = _merge(a[key], value) if key in a and isinstance(value, dict) else value
    return out


def _check_matches(params, abstract) -> None:
    got = {k: (tuple(v.shape), jnp.dtype(v.dtype)) for k, v in traverse_util.flatten_dict(params, sep="/").items()}
    want = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(abstract, sep="/").items()}
    bad = sorted(set(got) ^ set(want)) + sorted(k for k in set(got) & set(want) if got[k][0] != want[k])
    if bad:
        raise ValueError(f"LoRA params do not match the transformed model at {bad[:5]} "
                         f"(got {[got.get(k) for k in bad[:5]]}, expected {[want.get(k) for k in bad[:5]]})")


def base_params(params) -> Any:
    """`params` without the LoRA subtrees (quantised sites keep their NF4 storage)."""
    if isinstance(params, Mapping):
        return {k: base_params(v) for k, v in params.items() if k != CHILD}
    return params


@dataclasses.dataclass(frozen=True)
class MethodSummary:
    """What the plan and the run report: counts of weights and the bytes the frozen base holds."""

    trainable: int          # LoRA factor values
    total: int              # every weight of the model (a quantised kernel counts its logical weights)
    base_bytes: int         # bytes held by the frozen base (NF4 codes and scales for quantised kernels)
    quantized_weights: int  # logical weights stored as NF4
    quantized_bytes: int    # bytes of their NF4 storage

    @property
    def quantized_vs_bf16(self) -> float:
        """NF4 bytes of the quantised kernels / the bytes the same kernels take in bfloat16."""
        return self.quantized_bytes / (2 * self.quantized_weights) if self.quantized_weights else float("nan")


def method_summary(params) -> MethodSummary:
    """Counts from a params tree (arrays or ShapeDtypeStructs, e.g. `abstract_model_params(model)`)."""
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
    """r * (in + out) per adapted layer."""
    r = plan.config.rank
    return sum(r * (math.prod(s.in_shape) + math.prod(s.out_shape)) * len(s.hf_modules) for s in plan.lora_sites)


# ---------------------------------------------------------------- merge


def _delta(s: Site, factors: Mapping, scale: float) -> jax.Array:
    """scale * A @ B in the kernel's flax layout (float32), stacked when the site is."""
    a, b = jnp.asarray(factors["a"], jnp.float32), jnp.asarray(factors["b"], jnp.float32)
    lead = a.shape[:1] if s.stacked else ()
    I, O, r = math.prod(s.in_shape), math.prod(s.out_shape), a.shape[-1]
    d = jnp.matmul(a.reshape(*lead, I, r), b.reshape(*lead, r, O)) * scale
    return d.reshape(*lead, *s.in_shape, *s.out_shape)


def dequantized_kernel(s: Site, params) -> jax.Array:
    q = _get(params, s.module_path)[QUANT_CHILD]
    return nf4.dequantize(q, 1 if s.stacked else 0, s.in_shape, jnp.float32)


def merged_params(plan: LoraPlan, params, *, include_lora: bool = True) -> Any:
    """The family's plain params: quantised kernels dequantised (float32) and, with `include_lora`,
    scale * A @ B added to each adapted kernel. What `save_hf` exports."""
    params = nn.unbox(params)
    out = _copy(base_params(params))
    fold = jax.jit(lambda kernel, factors, s: kernel + _delta(s, factors, plan.config.scale), static_argnums=2)
    for s in plan.sites:
        node = _get(out, s.module_path)
        kernel = dequantized_kernel(s, params) if s.quantized else node["kernel"]
        node.pop(QUANT_CHILD, None)
        if s.lora and include_lora:
            kernel = fold(jnp.asarray(kernel, jnp.float32), _get(params, s.module_path)[CHILD], s)
        node["kernel"] = kernel
    return out


def save_merged(out_dir: str | os.PathLike, family, arch, plan: LoraPlan, params, hf_config: dict, *,
                dtype: str = "bfloat16", tokenizer_dir=None):
    """A plain HF checkpoint of base + scale * A @ B (the QLoRA base dequantised first)."""
    from ftc.backends.jax.io.hf_checkpoint import save_hf

    return save_hf(out_dir, (family, arch, merged_params(plan, params), hf_config), dtype=dtype,
                   tokenizer_dir=tokenizer_dir)


# ---------------------------------------------------------------- PEFT adapter format


def _hf_layout(spec, s: Site) -> tuple[np.ndarray, np.ndarray, bool]:
    """(perm_in, perm_out, fan_in_fan_out) relating the flax kernel to its HF weight.

    The HF weight is `spec.to_hf(kernel)`; passing index arrays through it shows which flattened
    flax input (output) index each HF column (row) holds. torch.nn.Linear stores [out, in];
    transformers' Conv1D (GPT-2) stores [in, out], which PEFT calls fan_in_fan_out.
    """
    I, O = math.prod(s.in_shape), math.prod(s.out_shape)
    index = np.uint16 if max(I, O) < 2**16 else np.uint32
    ones_out, ones_in = (1,) * len(s.out_shape), (1,) * len(s.in_shape)
    e_in = np.broadcast_to(np.arange(I, dtype=index).reshape(s.in_shape + ones_out), s.kernel_shape)
    e_out = np.broadcast_to(np.arange(O, dtype=index).reshape(ones_in + s.out_shape), s.kernel_shape)
    m_in, m_out = np.asarray(spec.to_hf(np.array(e_in))), np.asarray(spec.to_hf(np.array(e_out)))
    if m_in.shape == (O, I) and (m_in == m_in[:1]).all() and (m_out == m_out[:, :1]).all():
        return m_in[0].astype(np.int64), m_out[:, 0].astype(np.int64), False
    if m_in.shape == (I, O) and (m_in == m_in[:, :1]).all() and (m_out == m_out[:1]).all():
        return m_in[:, 0].astype(np.int64), m_out[0].astype(np.int64), True
    raise ValueError(f"{s.hf_modules[0]}: the family's HF layout of {s.param_path}/kernel is not a linear "
                     f"weight ftc can express LoRA factors in (HF shape {m_in.shape}, flax {s.kernel_shape})")


def _target_modules(plan: LoraPlan, all_sites: list[Site]) -> list[str]:
    """PEFT target_modules: for each adapted site the shortest dotted suffix of its HF module names
    that selects no linear layer outside the adapted ones (PEFT matches `name == t or
    name.endswith("." + t)`)."""
    adapted = {m for s in plan.lora_sites for m in s.hf_modules}
    every = [m for s in all_sites for m in s.hf_modules]
    out = set()
    for s in plan.lora_sites:
        parts = s.hf_modules[0].split(".")
        for k in range(1, len(parts) + 1):
            suffix = ".".join(parts[-k:])
            selected = {m for m in every if m == suffix or m.endswith("." + suffix)}
            if selected <= adapted and set(s.hf_modules) <= selected:
                out.add(suffix)
                break
        else:
            out.update(s.hf_modules)
    return sorted(out)


def peft_config(plan: LoraPlan, family, arch, *, base_model_name_or_path: str, task_type: str = "CAUSAL_LM",
                fan_in_fan_out: bool = False) -> dict:
    c = plan.config
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": c.rank,
        "lora_alpha": c.alpha,
        "lora_dropout": float(c.dropout),
        "use_rslora": bool(c.rslora),
        "target_modules": _target_modules(plan, linear_sites(family, arch)),
        "fan_in_fan_out": fan_in_fan_out,
        "bias": "none",
        "modules_to_save": None,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_dora": False,
        "lora_bias": False,
    }


def _host(x) -> np.ndarray:
    from ftc.backends.jax.io.hf_checkpoint import _to_host

    return np.asarray(_to_host(x), np.float32)


def save_peft_adapter(out_dir: str | os.PathLike, family, arch, plan: LoraPlan, params, *,
                      base_model_name_or_path: str, task_type: str = "CAUSAL_LM", dtype=np.float32) -> str:
    """adapter_config.json + adapter_model.safetensors in PEFT's format (see the module docstring).
    Every process must call (gathering sharded factors is collective); process 0 writes."""
    from safetensors.numpy import save_file

    specs = family.hf_tensors(arch)
    params = nn.unbox(params)
    tensors: dict[str, np.ndarray] = {}
    conv1d = set()
    for s in plan.lora_sites:
        perm_in, perm_out, fan_in_fan_out = _hf_layout(specs[s.param_path + "/kernel"], s)
        conv1d.add(fan_in_fan_out)
        factors = _get(params, s.module_path)[CHILD]
        a, b = _host(factors["a"]), _host(factors["b"])
        if not s.stacked:
            a, b = a[None], b[None]
        r = a.shape[-1]
        for i, module in enumerate(s.hf_modules):
            a2 = a[i].reshape(-1, r)  # [I, r]
            b2 = b[i].reshape(r, -1)  # [r, O]
            prefix = f"base_model.model.{module}"
            tensors[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(a2[perm_in].T).astype(dtype)
            tensors[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(b2[:, perm_out].T).astype(dtype)
    if len(conv1d) > 1:
        raise ValueError("LoRA targets mix torch Linear and Conv1D layers; PEFT takes one fan_in_fan_out per adapter")
    config = peft_config(plan, family, arch, base_model_name_or_path=base_model_name_or_path,
                         task_type=task_type, fan_in_fan_out=conv1d == {True})
    if jax.process_index() != 0:
        return str(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, os.path.join(out_dir, WEIGHTS_FILE), metadata={"format": "pt"})
    with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    return str(out_dir)


def load_peft_adapter(adapter_dir: str | os.PathLike, family, arch, plan: LoraPlan, params) -> Any:
    """`params` (with LoRA factors) with the factors read from a PEFT LoRA adapter directory
    (e.g. to start from an earlier export). The adapter's r, alpha and rslora must match the plan."""
    from safetensors.numpy import load_file

    path = os.path.join(adapter_dir, CONFIG_FILE)
    with open(path) as f:
        config = json.load(f)
    c = plan.config
    saved = (config.get("peft_type"), config.get("r"), float(config.get("lora_alpha", 0)),
             bool(config.get("use_rslora", False)))
    if saved != ("LORA", c.rank, float(c.alpha), bool(c.rslora)):
        raise ValueError(f"{path}: adapter has peft_type/r/lora_alpha/use_rslora = {saved}, the spec asks for "
                         f"('LORA', {c.rank}, {float(c.alpha)}, {bool(c.rslora)})")
    tensors = load_file(os.path.join(adapter_dir, WEIGHTS_FILE))
    specs = family.hf_tensors(arch)
    out = _copy(nn.unbox(params))
    for s in plan.lora_sites:
        perm_in, perm_out, _ = _hf_layout(specs[s.param_path + "/kernel"], s)
        r = c.rank
        a_layers, b_layers = [], []
        for module in s.hf_modules:
            key = f"base_model.model.{module}"
            if f"{key}.lora_A.weight" not in tensors:
                raise ValueError(f"{adapter_dir}/{WEIGHTS_FILE}: no {key}.lora_A.weight (the adapter targets other "
                                 f"modules than [method].targets)")
            a_hf, b_hf = tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"]
            a2 = np.empty((len(perm_in), r), np.float32)
            a2[perm_in] = a_hf.T
            b2 = np.empty((r, len(perm_out)), np.float32)
            b2[:, perm_out] = b_hf.T
            a_layers.append(a2.reshape(s.in_shape + (r,)))
            b_layers.append(b2.reshape((r,) + s.out_shape))
        node = _get(out, s.module_path)[CHILD]
        for name, stack in (("a", a_layers), ("b", b_layers)):
            value = np.stack(stack) if s.stacked else stack[0]
            node[name] = jnp.asarray(value, node[name].dtype)
    return out


# ---------------------------------------------------------------- one call for tests and tools


@dataclasses.dataclass(frozen=True)
class Method:
    """A transformed model ready to train: `apply(params, input_ids, ...)` runs it."""

    plan: LoraPlan
    module: LoraModel
    params: Any
    mask: Any  # tree of bools over `params`: True = trainable

    def apply(self, params, *args, **kwargs):
        return self.module.apply({"params": params}, *args, **kwargs)


def init_method(loaded, config: LoraConfig, rng: jax.Array, *, dtype=jnp.float32,
                quant: QuantConfig | None = None, shardings=None) -> Method:
    """LoRA (or, with `quant`, QLoRA) on a `hf_checkpoint.LoadedModel`, computing in `dtype`."""
    model = adapt(loaded.family, loaded.arch, loaded.family.build(loaded.arch, dtype), config, quant=quant)
    params = init_params(model, loaded.params, rng, shardings=shardings)
    mask = jax.tree_util.tree_map_with_path(
        lambda p, _: is_trainable("/".join(str(k.key) for k in p)), params)
    return Method(model.plan, model, params, mask)
