"""Bottleneck adapters as a transformation of any family's model (no fork of the model code).

An adapter is `y + up(act(down(y)))` applied to the output `y` of a sub-layer's output
projection, before that sub-layer's residual add (Houlsby et al. 2019):
  - houlsby: after the attention output projection and after the FFN down projection;
  - pfeiffer: after the FFN down projection only (Pfeiffer et al. 2020's single site).
(AdapterHub's own Pfeiffer config also re-applies the sub-layer's LayerNorm around the adapter;
ftc does not: its adapter sees exactly the projection output, which is what the PyTorch hooks in
`ftc.backends.torch_adapters` reproduce.)

`down` maps D -> D // reduction_factor, `up` maps back; `up` is zero-initialised, so an adapted
model starts equal to its base.

How it transforms a model: `adapt` wraps the base module in `intercept.Intercepted` with an
interceptor that adds an adapter to the output of each planned projection's `__call__`. The
adapter's weights are created as a child `ftc_adapter` of that projection, in the ordinary
"params" collection, e.g.
    layers/mlp/down_proj/ftc_adapter/{down,up}/{kernel,bias}
so the family's `nn.scan` stacks them per layer like any other parameter, and the training core
(one params tree + a path predicate, see optimizer.trainable_mask) trains them with
`is_trainable` as the predicate: everything else stays frozen.

The sites are found from the family's HF tensor map (`Family.hf_tensors`): a flax module whose
kernel maps to an HF module named like an attention output (`self_attn.o_proj`,
`attention.output.dense`, `attn.c_proj`) or an FFN output (`mlp.down_proj`,
`layer.N.output.dense`, `mlp.c_proj`) gets an adapter. A family with HF-standard module names
needs no change here.

Export (`export_adapters`, the `adapters` format; format `hf` writes the base as an HF checkpoint
with this directory as its `ftc_adapters/`) is a directory a PyTorch user loads without JAX:
  adapter_config.json          {"format": "ftc-bottleneck-adapter", "version": 1, placement,
                                reduction_factor, non_linearity, hidden_size, bottleneck_size,
                                base_model_type, modules: [HF module names]}
  adapter_model.safetensors    "<hf module>.ftc_adapter.down.weight" [r, D], ".down.bias" [r],
                               "<hf module>.ftc_adapter.up.weight" [D, r], ".up.bias" [D]
                               (torch.nn.Linear layout: weight is [out, in])
`ftc.backends.torch_adapters.load_adapters(model, dir)` hooks them onto a transformers model.
The AdapterHub `adapters` package is not used: adapters 1.3.0 pins transformers~=4.57.6, which
conflicts with the transformers 5 ftc needs (`pip install --dry-run adapters` would downgrade it).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ftc.backends.jax.io import export_common as ex
from ftc.backends.jax.io import verify
from ftc.backends.jax.methods.adapter_io import (
    CHILD,
    CONFIG_FILE,
    FORMAT,
    export_adapters,
    import_adapters,
)
from ftc.backends.jax.methods.contract import ExportFormat, Method
from ftc.backends.jax.methods.intercept import Intercepted, layer_count, merge, only_child, without_child

PLACEMENTS = ("houlsby", "pfeiffer")
HF_SUBDIR = "ftc_adapters"  # in an `hf` export (transformers would read a top-level adapter_config.json as PEFT's)

# gelu is the exact (erf) form, which is torch.nn.functional.gelu's default.
NON_LINEARITIES: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "silu": jax.nn.silu,
    "tanh": jnp.tanh,
}

# HF module names (without ".weight") of the two sub-layer output projections, across families.
_ATTENTION_OUTPUT = re.compile(r"(?:^|\.)(?:self_attn\.o_proj|attention\.output\.dense|attn\.c_proj)$")
_FFN_OUTPUT = re.compile(r"(?:^|\.)(?:mlp\.down_proj|layer\.\d+\.output\.dense|mlp\.c_proj)$")
_DOWN_INIT_STDDEV = 1e-2


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
    """The spec's [method] keys for kind = "adapter" (their defaults are the schema's)."""

    placement: str
    reduction_factor: int
    non_linearity: str

    def __post_init__(self):
        if self.placement not in PLACEMENTS:
            raise ValueError(f"[method].placement={self.placement!r}: expected one of {', '.join(PLACEMENTS)}")
        if self.non_linearity not in NON_LINEARITIES:
            raise ValueError(
                f"[method].non_linearity={self.non_linearity!r}: expected one of {', '.join(NON_LINEARITIES)}"
            )
        if (
            not isinstance(self.reduction_factor, int)
            or isinstance(self.reduction_factor, bool)
            or self.reduction_factor < 1
        ):
            raise ValueError(f"[method].reduction_factor={self.reduction_factor!r}: expected an integer >= 1")

    @classmethod
    def from_spec(cls, method) -> AdapterConfig:
        """From an ftc.spec MethodSpec (spec validation fills every key)."""
        return cls(**{f.name: getattr(method, f.name) for f in dataclasses.fields(cls)})

    def bottleneck(self, hidden_size: int) -> int:
        size = hidden_size // self.reduction_factor
        if size < 1:
            raise ValueError(
                f"[method].reduction_factor={self.reduction_factor} leaves no bottleneck for hidden size "
                f"{hidden_size}: expected reduction_factor <= {hidden_size}"
            )
        return size


@dataclasses.dataclass(frozen=True)
class Site:
    """One adapted projection: its flax module path and the HF module(s) it maps to."""

    module_path: tuple[str, ...]  # e.g. ("layers", "self_attn", "o_proj"); nn.scan stacks it per layer
    position: str  # "attention" | "ffn"
    hf_modules: tuple[str, ...]  # one per layer for a scanned stack, e.g. "model.layers.3.self_attn.o_proj"


@dataclasses.dataclass(frozen=True)
class AdapterPlan:
    """Where adapters go in one model, and how they are shaped. Hashable, no arrays."""

    config: AdapterConfig
    sites: tuple[Site, ...]
    model_type: str = ""


def plan_adapters(family, arch, config: AdapterConfig) -> AdapterPlan:
    """Finds the adapter sites of a family's architecture from its HF tensor map."""
    wanted = {"attention": _ATTENTION_OUTPUT, "ffn": _FFN_OUTPUT}
    if config.placement == "pfeiffer":
        wanted.pop("attention")
    sites = []
    for param_path, tensor in sorted(family.hf_tensors(arch).items()):
        parts = tuple(param_path.split("/"))
        if parts[-1] != "kernel" or not all(isinstance(n, str) and n.endswith(".weight") for n in tensor.names):
            continue
        hf_modules = tuple(name[: -len(".weight")] for name in tensor.names)
        for position, pattern in wanted.items():
            if all(pattern.search(m) for m in hf_modules):
                sites.append(Site(parts[:-1], position, hf_modules))
    missing = [p for p in wanted if p not in {s.position for s in sites}]
    if "ffn" in missing and any("/experts/" in path for path in family.hf_tensors(arch)):
        # A mixture-of-experts FFN ends in a routed sum over experts, not one down projection an
        # adapter (and torch_adapters' hook) could sit after: name the method that does cover it.
        raise ValueError(
            f'[method] kind="adapter": {family.name!r} is a mixture-of-experts model, whose FFN output is a '
            f"routed sum of expert projections with no single output projection for a bottleneck adapter; "
            f'expected a dense model, or kind = "lora" / "qlora" (which adapt the experts)'
        )
    if missing:
        raise ValueError(
            f'[method] kind="adapter": family {family.name!r} has no {" or ".join(missing)} output projection '
            f"ftc recognises (HF module names matching {', '.join(wanted[p].pattern for p in missing)})"
        )
    return AdapterPlan(config, tuple(sites), family.model_types[0])


class _Linear(nn.Module):
    """kernel [in, out] + bias [out], float32 parameters with logical axes, computed in x's dtype."""

    features: int
    axes: tuple  # (in axis name, out axis name)
    kernel_init: Callable = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(self.kernel_init, self.axes),
            (x.shape[-1], self.features),
            jnp.float32,
        )
        bias = self.param(
            "bias", nn.with_logical_partitioning(nn.initializers.zeros, self.axes[1:]), (self.features,), jnp.float32
        )
        return x @ kernel.astype(x.dtype) + bias.astype(x.dtype)


class Bottleneck(nn.Module):
    """y + up(act(down(y)))."""

    bottleneck: int
    non_linearity: str

    @nn.compact
    def __call__(self, y_BTD: jax.Array) -> jax.Array:
        down = _Linear(self.bottleneck, ("embed", None), nn.initializers.normal(_DOWN_INIT_STDDEV), name="down")
        # up starts at zero: the adapted model equals its base until the adapter trains.
        up = _Linear(y_BTD.shape[-1], (None, "embed"), nn.initializers.zeros, name="up")
        return y_BTD + up(NON_LINEARITIES[self.non_linearity](down(y_BTD)))


def interceptor(plan: AdapterPlan, deterministic: bool = False):
    """The `nn.intercept_methods` interceptor that adds adapters to the planned sites' outputs
    (they have no training-only noise: `deterministic` changes nothing)."""
    by_path = {site.module_path: site for site in plan.sites}

    def intercept(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        module = context.module
        if context.method_name != "__call__" or tuple(module.path) not in by_path:
            return out
        bottleneck = plan.config.bottleneck(out.shape[-1])
        return Bottleneck(bottleneck, plan.config.non_linearity, parent=module, name=CHILD)(out)

    return intercept


def adapt(family, arch, module: nn.Module, config: AdapterConfig) -> Intercepted:
    """The transformed model: what the training core builds instead of `family.build(arch, dtype)`."""
    return Intercepted(module, plan_adapters(family, arch, config), interceptor)


def is_trainable(path: str) -> bool:
    """The trainable predicate over "/"-joined param paths: adapter weights only."""
    return CHILD in path.split("/")


def init_params(
    adapted: Intercepted, base_params, rng: jax.Array, *, seq_len: int = 8, shardings=None, param_dtype=jnp.float32
):
    """Base params plus freshly initialised adapter weights (unboxed); base leaves are passed through.

    `shardings`: optional tree of shardings for the full (base + adapter) params; the adapters are
    then created directly in theirs (the base keeps its own placement). One jitted forward on
    dummy tokens creates them; only the adapters are outputs, so XLA drops the rest.
    """
    input_ids = jnp.zeros((1, seq_len), jnp.int32)

    def create(base, rng):
        _, variables = adapted.apply({"params": base}, input_ids, mutable=["params"], rngs={"params": rng})
        new = only_child(nn.unbox(variables["params"]), CHILD)
        return jax.tree.map(lambda x: x.astype(param_dtype), new)

    out_shardings = only_child(shardings, CHILD) if shardings is not None else None
    new = jax.jit(create, out_shardings=out_shardings)(base_params, rng)
    if not new:
        raise ValueError("adapters: the forward pass never reached a planned site (module paths changed?)")
    return merge(nn.unbox(base_params), new)


def base_params(params) -> Any:
    """`params` without the adapter subtrees (what save_hf exports for the base model)."""
    return without_child(params, CHILD)


def num_trainable(plan: AdapterPlan, hidden_size: int) -> int:
    """2·D·r + r + D per site and layer (down kernel + bias, up kernel + bias)."""
    r = plan.config.bottleneck(hidden_size)
    per_layer = 2 * hidden_size * r + r + hidden_size
    return per_layer * sum(len(site.hf_modules) for site in plan.sites)


def detail(model) -> str:
    c, sites = model.plan.config, model.plan.sites
    return (
        f"{c.placement} placement, reduction factor {c.reduction_factor}, {c.non_linearity}, "
        f"{len(sites)} site(s) x {layer_count(sites)} layer(s)"
    )


def _write_hf(trained, out: Path, dtype: str) -> None:
    """The base as an HF checkpoint, the adapters in its ftc_adapters/ (served on that base: ".")."""
    ex.save_hf(trained, out, base_params(nn.unbox(trained.params)), dtype)
    export_adapters(trained.model.plan, trained.params, out / HF_SUBDIR, dtype=ex.np_dtype(dtype))
    ex.update_json(out / HF_SUBDIR / CONFIG_FILE, base_model_name_or_path=".")


def _write_adapters(trained, out: Path, dtype: str) -> None:
    ex.copy_tokenizer(trained.tokenizer_dir, out)
    export_adapters(trained.model.plan, trained.params, out, dtype=ex.np_dtype(dtype))
    ex.update_json(out / CONFIG_FILE, base_model_name_or_path=trained.base_name)


def _reload_hf(trained, out: Path, scratch, causal: bool):
    from ftc.backends import torch_adapters  # torch: only when verifying

    reference = verify.load_reference(out, causal=causal)
    torch_adapters.load_adapters(reference, out / HF_SUBDIR)
    return reference


def _reload_adapters(trained, out: Path, scratch, causal: bool):
    from ftc.backends import torch_adapters

    reference = verify.load_reference(ex.base_dir(trained), causal=causal)
    torch_adapters.load_adapters(reference, out)
    return reference


METHOD = Method(
    kind="adapter",
    config=AdapterConfig.from_spec,
    trainable=is_trainable,
    detail=detail,
    formats={
        "hf": ExportFormat(
            write=_write_hf,
            ftc_side=ex.every_weight_exported,
            reload=_reload_hf,
            how_to_load=lambda out, base_name, auto: (
                f"model = {auto}.from_pretrained({str(out)!r}); "
                f"ftc.backends.torch_adapters.load_adapters(model, "
                f"{str(out / HF_SUBDIR)!r})"
            ),
        ),
        "adapters": ExportFormat(
            write=_write_adapters,
            ftc_side=ex.trained_weights_exported,
            reload=_reload_adapters,
            how_to_load=lambda out, base_name, auto: (
                "{}model = {}; ftc.backends.torch_adapters.load_adapters(model, {!r})".format(
                    *ex.load_base(base_name, auto), str(out)
                )
            ),
        ),
    },
    format_hint="bottleneck adapters cannot be merged into the base weights; 'hf' writes the base plus "
    "ftc_adapters/, 'adapters' the adapters only",
    transform=adapt,
    init_params=init_params,
    base_params=base_params,
    zero_is_base=True,  # up(act(down(y))) = 0 with up = 0 (and act(0) = 0 for every NON_LINEARITIES entry)
    reads_init_dir=lambda adapter_config: adapter_config.get("format") == FORMAT,
    load_trained=lambda model, directory, params: import_adapters(model.plan, directory, params),
    init_subdir=HF_SUBDIR,
)
