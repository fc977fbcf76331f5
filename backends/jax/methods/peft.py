"""LoRA factors in Hugging Face PEFT's adapter format, written and read back.

adapter_config.json + adapter_model.safetensors, with `base_model.model.<hf module>.lora_A.weight`
[r, in] and `.lora_B.weight` [out, r], which `peft.PeftModel.from_pretrained` and vLLM load. The HF
layout of each factor is derived from the family's `hf_tensors` (`to_hf` of the kernel), never
written per family.

Expert projections of a MoE model go to PEFT's `target_parameters` (the fused in-memory parameter,
`model.layers.{i}.mlp.experts.gate_up_proj` [E, out, in]): lora_A [r * E, in] (expert-major rows)
and lora_B [out, r * E] (rank-major columns), as PEFT's ParamWrapper stores them, under the
experts module with one `base_layer.` per parameter of that module PEFT wraps after it.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ftc.backends.jax.io.hf_checkpoint import _to_host
from ftc.backends.jax.methods.intercept import copy_tree, node
from ftc.backends.jax.methods.lora_sites import CHILD, LoraPlan, Site, linear_sites

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


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
    raise ValueError(
        f"{s.hf_modules[0]}: the family's HF layout of {s.param_path}/kernel is not a linear "
        f"weight ftc can express LoRA factors in (HF shape {m_in.shape}, flax {s.kernel_shape})"
    )


def _expert_layout(spec, s: Site) -> tuple[np.ndarray, np.ndarray]:
    """(perm_in, perm_out) of an expert site's kernel in transformers' fused [E, out, in] parameter
    (`spec` = the kernel's `HfTensor.fused`), found as `_hf_layout` finds a Linear's."""
    I, O, E = math.prod(s.in_shape), math.prod(s.out_shape), s.experts
    shape = (E,) + s.kernel_shape
    ones_out, ones_in = (1,) * len(s.out_shape), (1,) * len(s.in_shape)
    e_in = np.broadcast_to(np.arange(I).reshape((1,) + s.in_shape + ones_out), shape)
    e_out = np.broadcast_to(np.arange(O).reshape((1,) + ones_in + s.out_shape), shape)
    m_in, m_out = np.asarray(spec.to_hf(np.array(e_in))), np.asarray(spec.to_hf(np.array(e_out)))
    if m_in.shape == (E, O, I) and (m_in == m_in[:1, :1]).all() and (m_out == m_out[:1, :, :1]).all():
        return m_in[0, 0].astype(np.int64), m_out[0, :, 0].astype(np.int64)
    raise ValueError(f"{s.hf_modules[0]}: not an [experts, out, in] parameter PEFT's target_parameters can adapt")


def _peft_prefix(s: Site, i: int, plan: LoraPlan, order: list[str]) -> str:
    """The state-dict prefix of layer i of site `s`: PEFT wraps a module's targeted parameters in
    their registration order (`order`, the family's tensor map order), the first innermost."""
    module, _, name = s.hf_modules[i].rpartition(".")
    if not s.experts:
        return f"base_model.model.{s.hf_modules[i]}"
    later = [t for t in plan.lora_sites if t.experts and t.hf_modules[i].rpartition(".")[0] == module]
    rank = {path: i for i, path in enumerate(order)}
    wrappers = sum(rank[t.param_path + "/kernel"] > rank[s.param_path + "/kernel"] for t in later)
    return f"base_model.model.{module}" + ".base_layer" * wrappers


def _target_parameters(plan: LoraPlan) -> list[str]:
    """PEFT target_parameters: each adapted expert parameter by the dotted suffix its layers share
    (`mlp.experts.gate_up_proj`), which no other parameter ends with."""
    out = set()
    for s in plan.lora_sites:
        if s.experts:
            parts = [name.split(".") for name in s.hf_modules]
            n = next((k for k in range(1, len(parts[0]) + 1) if len({tuple(p[-k:]) for p in parts}) > 1), None)
            out.add(".".join(parts[0][-(n - 1) :] if n else parts[0]))
    return sorted(out)


def _target_modules(plan: LoraPlan, all_sites: list[Site], *, experts: bool = False) -> list[str]:
    """PEFT target_modules (with `experts`: target_parameters): for each adapted site the shortest
    dotted suffix of its HF names that selects no layer outside the adapted ones (PEFT matches
    `name == t or name.endswith("." + t)`)."""
    lora_sites = [s for s in plan.lora_sites if bool(s.experts) == experts]
    all_sites = [s for s in all_sites if bool(s.experts) == experts]
    adapted = {m for s in lora_sites for m in s.hf_modules}
    every = [m for s in all_sites for m in s.hf_modules]
    out = set()
    for s in lora_sites:
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


def peft_config(
    plan: LoraPlan,
    family,
    arch,
    *,
    base_model_name_or_path: str,
    task_type: str = "CAUSAL_LM",
    fan_in_fan_out: bool = False,
) -> dict:
    c = plan.config
    sites = linear_sites(family, arch)
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
        "target_modules": _target_modules(plan, sites) or None,
        "target_parameters": _target_parameters(plan) or None,
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
    return np.asarray(_to_host(x), np.float32)


def save_peft_adapter(
    out_dir: str | os.PathLike,
    family,
    arch,
    plan: LoraPlan,
    params,
    *,
    base_model_name_or_path: str,
    task_type: str = "CAUSAL_LM",
    dtype=np.float32,
) -> str:
    """adapter_config.json + adapter_model.safetensors in PEFT's format (see the module docstring).
    Every process must call (gathering sharded factors is collective); process 0 writes."""
    from safetensors.numpy import save_file

    specs = family.hf_tensors(arch)
    params = nn.unbox(params)
    tensors: dict[str, np.ndarray] = {}
    conv1d = set()
    order = list(specs)
    for s in plan.lora_sites:
        spec = specs[s.param_path + "/kernel"]
        factors = node(params, s.module_path)[CHILD]
        a, b = _host(factors["a"]), _host(factors["b"])
        if not s.stacked:
            a, b = a[None], b[None]
        r = a.shape[-1]
        if s.experts:
            perm_in, perm_out = _expert_layout(spec.fused, s)
        else:
            perm_in, perm_out, fan_in_fan_out = _hf_layout(spec, s)
            conv1d.add(fan_in_fan_out)
        for i in range(len(s.hf_modules)):
            prefix = _peft_prefix(s, i, plan, order)
            if s.experts:  # A [E*r, I] expert-major, B [O, r*E] rank-major
                a2, b2 = a[i].reshape(s.experts, -1, r), b[i].reshape(s.experts, r, -1)
                a_hf = a2[:, perm_in].transpose(0, 2, 1).reshape(-1, len(perm_in))
                b_hf = b2[:, :, perm_out].transpose(2, 1, 0).reshape(len(perm_out), -1)
            else:
                a_hf, b_hf = a[i].reshape(-1, r)[perm_in].T, b[i].reshape(r, -1)[:, perm_out].T
            tensors[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(a_hf).astype(dtype)
            tensors[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(b_hf).astype(dtype)
    if len(conv1d) > 1:
        raise ValueError("LoRA targets mix torch Linear and Conv1D layers; PEFT takes one fan_in_fan_out per adapter")
    config = peft_config(
        plan,
        family,
        arch,
        base_model_name_or_path=base_model_name_or_path,
        task_type=task_type,
        fan_in_fan_out=conv1d == {True},
    )
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
    saved = (
        config.get("peft_type"),
        config.get("r"),
        float(config.get("lora_alpha", 0)),
        bool(config.get("use_rslora", False)),
    )
    if saved != ("LORA", c.rank, float(c.alpha), bool(c.rslora)):
        raise ValueError(
            f"{path}: adapter has peft_type/r/lora_alpha/use_rslora = {saved}, the spec asks for "
            f"('LORA', {c.rank}, {float(c.alpha)}, {bool(c.rslora)})"
        )
    tensors = load_file(os.path.join(adapter_dir, WEIGHTS_FILE))
    specs = family.hf_tensors(arch)
    out = copy_tree(nn.unbox(params))
    order = list(specs)
    for s in plan.lora_sites:
        spec = specs[s.param_path + "/kernel"]
        perm_in, perm_out = _expert_layout(spec.fused, s) if s.experts else _hf_layout(spec, s)[:2]
        r, E = c.rank, (s.experts,) if s.experts else ()
        a_layers, b_layers = [], []
        for i in range(len(s.hf_modules)):
            key = _peft_prefix(s, i, plan, order)
            if f"{key}.lora_A.weight" not in tensors:
                raise ValueError(
                    f"{adapter_dir}/{WEIGHTS_FILE}: no {key}.lora_A.weight (the adapter targets other "
                    f"modules than [method].targets)"
                )
            a_hf, b_hf = tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"]
            if s.experts:  # inverse of save_peft_adapter's layout
                a_hf = a_hf.reshape(s.experts, r, -1).transpose(0, 2, 1)  # [E, I_hf, r]
                b_hf = b_hf.reshape(-1, r, s.experts).transpose(2, 1, 0)  # [E, r, O_hf]
            else:
                a_hf, b_hf = a_hf.T, b_hf.T
            a2 = np.empty(E + (len(perm_in), r), np.float32)
            a2[..., perm_in, :] = a_hf
            b2 = np.empty(E + (r, len(perm_out)), np.float32)
            b2[..., perm_out] = b_hf
            a_layers.append(a2.reshape(E + s.in_shape + (r,)))
            b_layers.append(b2.reshape(E + (r,) + s.out_shape))
        factors = node(out, s.module_path)[CHILD]
        for name, stack in (("a", a_layers), ("b", b_layers)):
            value = np.stack(stack) if s.stacked else stack[0]
            factors[name] = jnp.asarray(value, factors[name].dtype)
    return out
