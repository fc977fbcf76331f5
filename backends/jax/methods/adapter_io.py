"""Bottleneck adapters on disk: adapter_config.json + adapter_model.safetensors (the "adapters"
export format and what an adapter run reads back as `model.init_from`). The layout is described
in adapter.py's docstring; ftc.backends.torch_adapters reads the same files in PyTorch."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ftc.backends.jax.methods.intercept import node

CHILD = "ftc_adapter"
FORMAT = "ftc-bottleneck-adapter"
FORMAT_VERSION = 1
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


def export_adapters(plan, params, out_dir: str | os.PathLike, *, dtype=np.float32) -> str:
    """Writes adapter_config.json + adapter_model.safetensors for `plan` (an adapter.AdapterPlan)."""
    from safetensors.numpy import save_file

    params = nn.unbox(params)
    tensors: dict[str, np.ndarray] = {}
    hidden = bottleneck = None
    modules = []
    for site in plan.sites:
        adapter = node(params, site.module_path + (CHILD,))
        host = {
            f"{g}.{k}": np.asarray(jax.device_get(v), np.float32) for g in ("down", "up") for k, v in adapter[g].items()
        }
        stacked = host["down.kernel"].ndim == 3
        for i, hf_module in enumerate(site.hf_modules):
            layer = {k: (v[i] if stacked else v) for k, v in host.items()}
            prefix = f"{hf_module}.{CHILD}"
            # torch.nn.Linear keeps weight as [out, in]; flax kernels are [in, out].
            for g in ("down", "up"):
                tensors[f"{prefix}.{g}.weight"] = np.ascontiguousarray(layer[f"{g}.kernel"].T).astype(dtype)
                tensors[f"{prefix}.{g}.bias"] = layer[f"{g}.bias"].astype(dtype)
            hidden, bottleneck = layer["down.kernel"].shape
            modules.append(hf_module)
    config = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "placement": plan.config.placement,
        "reduction_factor": plan.config.reduction_factor,
        "non_linearity": plan.config.non_linearity,
        "hidden_size": int(hidden),
        "bottleneck_size": int(bottleneck),
        "base_model_type": plan.model_type,
        "modules": modules,
    }
    if jax.process_index() != 0:
        return str(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, os.path.join(out_dir, WEIGHTS_FILE), metadata={"format": FORMAT})
    with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    return str(out_dir)


def import_adapters(plan, adapter_dir: str | os.PathLike, params) -> Any:
    """`params` (base + adapters, unboxed) with the adapter weights read from an export directory."""
    from safetensors.numpy import load_file

    path = os.path.join(adapter_dir, CONFIG_FILE)
    with open(path) as f:
        config = json.load(f)
    if config.get("format") != FORMAT:
        raise ValueError(f"{path}: format={config.get('format')!r}, expected {FORMAT!r}")
    saved = dataclasses.replace(
        plan.config,
        placement=config["placement"],
        reduction_factor=config["reduction_factor"],
        non_linearity=config["non_linearity"],
    )
    if saved != plan.config:
        raise ValueError(f"{path}: adapters were trained with {saved}, the spec asks for {plan.config}")
    tensors = load_file(os.path.join(adapter_dir, WEIGHTS_FILE))
    out = jax.tree.map(lambda x: x, nn.unbox(params))  # fresh containers; leaves shared
    for site in plan.sites:
        adapter = node(out, site.module_path + (CHILD,))
        for g in ("down", "up"):
            for k, torch_name in (("kernel", "weight"), ("bias", "bias")):
                layers = [tensors[f"{m}.{CHILD}.{g}.{torch_name}"] for m in site.hf_modules]
                if k == "kernel":
                    layers = [a.T for a in layers]
                like = adapter[g][k]
                value = np.stack(layers) if like.ndim == layers[0].ndim + 1 else layers[0]
                if value.shape != like.shape:
                    raise ValueError(
                        f"{path}: {site.hf_modules[0]}.{CHILD}.{g}.{torch_name} has shape "
                        f"{value.shape}, the model expects {like.shape}"
                    )
                adapter[g][k] = jnp.asarray(value, like.dtype)
    return out


# ---------------------------------------------------------------- the method record
