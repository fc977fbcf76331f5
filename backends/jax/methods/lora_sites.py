"""LoRA's configuration and plan: which Dense layers get factors, which are stored NF4 (QLoRA).

Targets (`[method].targets`): "all-linear" (every Dense inside the scanned blocks: not the LM head,
not embeddings, as PEFT's "all-linear"; in a mixture-of-experts model also every expert projection,
which PEFT reaches with `target_parameters`, but never the router), or a list where each entry is
either a module name matched PEFT's way against the Hugging Face module names (`q_proj`,
`self_attn.o_proj`, `attn.c_proj`: whole dotted components at the end) or the flax path
(`mlp/down_proj`), or a regular expression (any entry with other characters) that must fully
match an HF module name or a flax module path.
The factors of a scanned stack are one array, so a target selects a projection in every layer.
An expert projection (`moe.ExpertKernel`, [E, *in, *out]) is a site with `experts` = E: its factors
are per expert, its HF names the fused parameter transformers holds in memory
(`model.layers.{i}.mlp.experts.gate_up_proj`), which PEFT's `target_parameters` address.
Everything here is data (hashable, no arrays); the sites come from an abstract trace of the model.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from ftc.backends.jax.io.hf_checkpoint import abstract_params, logical_axes
from ftc.backends.jax.methods import nf4
from ftc.backends.jax.models import layers, moe

CHILD = "ftc_lora"
QUANT_CHILD = "ftc_nf4"
ALL_LINEAR = "all-linear"
_NAME = re.compile(r"^[A-Za-z0-9_.]+$")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """The spec's [method] keys for kind = "lora" (their defaults are the schema's)."""

    rank: int
    alpha: float
    dropout: float
    rslora: bool
    targets: str | tuple[str, ...]

    def __post_init__(self):
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise ValueError(f"[method].rank={self.rank!r}: expected an integer >= 1")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"[method].dropout={self.dropout!r}: expected 0 <= dropout < 1")
        if isinstance(self.targets, list):
            object.__setattr__(self, "targets", tuple(self.targets))
        if not self.targets:
            raise ValueError('[method].targets is empty: expected "all-linear" or module names/regexes')

    @classmethod
    def from_spec(cls, method) -> LoraConfig:
        """From an ftc.spec MethodSpec (spec validation fills every key)."""
        return cls(**{f.name: getattr(method, f.name) for f in dataclasses.fields(cls)})

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """NF4 storage of the frozen base kernels (QLoRA)."""

    block_size: int
    double_quant: bool


@dataclasses.dataclass(frozen=True)
class Site:
    """One Dense the method touches: where it is in flax and in the HF checkpoint."""

    module_path: tuple[str, ...]  # ("layers", "self_attn", "q_proj")
    hf_modules: tuple[str, ...]  # one per layer for a scanned stack: "model.layers.3.self_attn.q_proj"
    stacked: bool  # params carry a leading "layers" axis
    kernel_shape: tuple[int, ...]  # one layer's kernel: in dims + out dims
    n_in: int  # how many leading kernel dims are inputs
    lora: bool
    quantized: bool
    experts: int = 0  # an expert projection: one kernel (and one pair of factors) per expert

    @property
    def lead(self) -> tuple[int, ...]:
        """The leading dims of the site's params before one kernel: layers, then experts."""
        return ((len(self.hf_modules),) if self.stacked else ()) + ((self.experts,) if self.experts else ())

    @property
    def in_shape(self) -> tuple[int, ...]:
        return self.kernel_shape[: self.n_in]

    @property
    def out_shape(self) -> tuple[int, ...]:
        return self.kernel_shape[self.n_in :]

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
def _dense_inputs(family, arch) -> dict[tuple[str, ...], tuple[int, int]]:
    """Module path -> (number of input dims, experts or 0), for every layers.Dense and every
    moe.ExpertKernel the model calls (abstract trace)."""
    seen: dict[tuple[str, ...], tuple[int, int]] = {}

    def record(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name == "__call__" and isinstance(module, layers.Dense | moe.ExpertKernel):
            experts = module.num_experts if isinstance(module, moe.ExpertKernel) else 0
            seen[tuple(module.path)] = (len(module.in_axes), experts)
        return next_fun(*args, **kwargs)

    module = family.build(arch, jnp.float32)
    with nn.intercept_methods(record):
        jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))
    return seen


def linear_sites(family, arch) -> list[Site]:
    """Every layers.Dense of the model with its HF module names (lora/quantized unset)."""
    tensors = family.hf_tensors(arch)
    n_in = _dense_inputs(family, arch)
    flat_params = traverse_util.flatten_dict(abstract_params(family, arch), sep="/")
    flat_axes = traverse_util.flatten_dict(
        logical_axes(family, arch), sep="/", is_leaf=lambda k, v: isinstance(v, tuple)
    )
    sites = []
    for path, (n, experts) in sorted(n_in.items()):
        key = "/".join(path) + "/kernel"
        spec = tensors.get(key)
        if experts and spec is not None and spec.fused is not None:
            hf_modules = spec.fused.names  # the fused parameters, as PEFT's target_parameters name them
        elif spec is not None and all(isinstance(name, str) and name.endswith(".weight") for name in spec.names):
            hf_modules = tuple(name[: -len(".weight")] for name in spec.names)
        else:
            continue
        stacked = flat_axes[key][:1] == ("layers",)
        shape = tuple(flat_params[key].shape)[(1 if stacked else 0) + (1 if experts else 0) :]
        sites.append(Site(path, hf_modules, stacked, shape, n, lora=False, quantized=False, experts=experts))
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
            raise ValueError('[method].targets="all-linear": the model has no linear layers inside its blocks')
        return chosen
    entries = (targets,) if isinstance(targets, str) else tuple(targets)
    chosen = set()
    for target in entries:
        if target == ALL_LINEAR:
            raise ValueError('[method].targets: "all-linear" must be given alone, not inside a list')
        hit = {s.module_path for s in sites if _target_matches(target, s)}
        if not hit:
            names = sorted({s.hf_modules[0].split(".")[-1] for s in sites})
            # A model whose output layer reuses the input embeddings (tie_word_embeddings) has no
            # lm_head weight of its own: say so, or "lm_head" reads like a misspelling.
            tied = "lm_head" not in names and re.search(r"(^|[.^/])lm_head\b", target)
            raise ValueError(
                f"[method].targets entry {target!r} matches no linear layer of this model; its linear "
                f"layers are named {', '.join(names)} (flax paths: "
                f"{', '.join('/'.join(s.module_path) for s in sites)})"
                + (
                    "; it has no lm_head of its own (the output layer, if any, is the input embedding "
                    "matrix, tie_word_embeddings), which LoRA here does not adapt"
                    if tied
                    else ""
                )
            )
        chosen |= hit
    return chosen


def plan_lora(family, arch, config: LoraConfig, *, quant: QuantConfig | None = None) -> LoraPlan:
    """The sites for `config.targets`; with `quant`, every Dense inside the blocks is also stored
    NF4-quantised (QLoRA quantises all linear layers, LoRA targets or not; the LM head stays)."""
    sites = linear_sites(family, arch)
    chosen = select_targets(sites, config.targets)
    merged = [s for s in sites if s.experts and s.module_path in chosen]
    if merged and config.dropout:
        raise ValueError(
            f"[method].dropout={config.dropout}: LoRA on expert weights ({merged[0].hf_modules[0]}) adds its "
            f"per-expert update to the experts' kernels, as PEFT's target_parameters do, which cannot apply "
            f"dropout to the LoRA input; set dropout = 0 or leave the experts out of [method].targets"
        )
    out = []
    for s in sites:
        quantized = quant is not None and s.stacked
        if quantized:
            nf4.check_shape(math.prod(s.in_shape), quant.block_size, f"{s.hf_modules[0]} ({s.param_path}/kernel)")
        if s.module_path in chosen or quantized:
            out.append(dataclasses.replace(s, lora=s.module_path in chosen, quantized=quantized))
    return LoraPlan(config, tuple(out), quant, family.model_types[0])
