"""Load ftc bottleneck adapters into a transformers PyTorch model (torch + transformers only).

ftc's adapter export (`ftc export` of a `[method] kind = "adapter"` run) is a directory with
  adapter_config.json          placement, reduction_factor, non_linearity, hidden_size,
                               bottleneck_size, base_model_type, modules (HF module names)
  adapter_model.safetensors    "<module>.ftc_adapter.{down,up}.{weight,bias}" (nn.Linear layout)
Each adapter follows one output projection (e.g. `model.layers.3.mlp.down_proj`):
    y = module(x);  y = y + up(act(down(y)))
This file is self-contained: copy it next to your serving code if you don't install ftc.

    model = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    handles = load_adapters(model, adapter_dir)   # attaches adapters, registers forward hooks
    model(**inputs)                               # adapted
    remove_adapters(model, handles)               # back to the base model
"""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_file  # a dependency of transformers

FORMAT = "ftc-bottleneck-adapter"
_ACTIVATIONS = {
    "relu": torch.nn.functional.relu,
    "gelu": torch.nn.functional.gelu,  # exact (erf) gelu, as ftc trains it
    "silu": torch.nn.functional.silu,
    "tanh": torch.tanh,
}
_CHILD = "ftc_adapter"


class Bottleneck(torch.nn.Module):
    def __init__(self, hidden_size: int, bottleneck_size: int, non_linearity: str):
        super().__init__()
        self.down = torch.nn.Linear(hidden_size, bottleneck_size)
        self.up = torch.nn.Linear(bottleneck_size, hidden_size)
        self.non_linearity = non_linearity

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return y + self.up(_ACTIVATIONS[self.non_linearity](self.down(y)))


def _resolve(model: torch.nn.Module, name: str) -> torch.nn.Module:
    """The module `name` names, allowing for a task head's base-model prefix (e.g. "bert.")."""
    modules = dict(model.named_modules())
    prefix = getattr(model, "base_model_prefix", "")
    candidates = [name]
    if prefix:
        candidates += [f"{prefix}.{name}", name[len(prefix) + 1 :] if name.startswith(prefix + ".") else None]
    for candidate in candidates:
        if candidate and candidate in modules:
            return modules[candidate]
    raise KeyError(f"adapter module {name!r} not found in {type(model).__name__} (tried {candidates})")


def _hook(module, inputs, output):
    adapter = getattr(module, _CHILD)
    if isinstance(output, tuple):  # GPT-2's Conv1D and Linear return a tensor; be safe anyway
        return (adapter(output[0]),) + tuple(output[1:])
    return adapter(output)


def load_adapters(model: torch.nn.Module, adapter_dir: str | os.PathLike) -> list:
    """Attaches the adapters in `adapter_dir` to `model` (as child `ftc_adapter` modules, moved to
    the target module's device and dtype) and returns the forward-hook handles."""
    with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
        config = json.load(f)
    if config.get("format") != FORMAT:
        raise ValueError(f"{adapter_dir}/adapter_config.json: format={config.get('format')!r}, expected {FORMAT!r}")
    if config["non_linearity"] not in _ACTIVATIONS:
        raise ValueError(f"{adapter_dir}/adapter_config.json: unknown non_linearity {config['non_linearity']!r}")
    state = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    handles = []
    for name in config["modules"]:
        target = _resolve(model, name)
        if hasattr(target, _CHILD):
            raise ValueError(f"{name} already has an ftc adapter; call remove_adapters(model, handles) first")
        weight = next(target.parameters())
        adapter = Bottleneck(config["hidden_size"], config["bottleneck_size"], config["non_linearity"])
        adapter.load_state_dict({k: state[f"{name}.{_CHILD}.{k}"] for k in adapter.state_dict()})
        target.add_module(_CHILD, adapter.to(device=weight.device, dtype=weight.dtype))
        handles.append(target.register_forward_hook(_hook))
    return handles


def remove_adapters(model: torch.nn.Module, handles: list) -> None:
    """Undoes `load_adapters`: removes the hooks and the attached adapter modules."""
    for handle in handles:
        handle.remove()
    for module in model.modules():
        if _CHILD in module._modules:
            del module._modules[_CHILD]
