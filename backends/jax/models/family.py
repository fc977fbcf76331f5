"""The contract every model family implements, and the registry that finds one for a config.

A family module (llama.py, gpt2.py, bert.py, ...) defines a `FAMILY = Family(...)` and one line in
`_FAMILY_MODULES` below makes it known. A module that reads several model types and must export
each under its own name ("architectures", "model_type") may instead define
`FAMILIES = {model_type: Family(...)}` (llama.py does: llama, mistral, qwen2, qwen3).
Everything generic (HF import/export, GGUF, sharding, methods such as LoRA) works through this
contract and never imports a family directly.

Conventions every family keeps:
- Parameters are float32 unless asked otherwise; the compute dtype is given to `build`.
- Every parameter is created with `flax.linen.with_logical_partitioning` over the logical axis
  names in `LOGICAL_AXES`, so the compiler can shard it by rules without knowing the family.
- An architecture dataclass may carry a `remat: str` field ("none" | "full" | "dots"); the training
  core sets it with `dataclasses.replace(arch, remat=...)` before `build`. It is a training
  choice: `hf_config` ignores it.
- `hf_tensors` may leave out tensors a checkpoint carries (rotary buffers, a tied `lm_head`,
  unused heads): import ignores them and logs their names; export writes only what it lists.
- Transformer blocks are scanned (`nn.scan`, params stacked on a leading "layers" axis), which
  keeps compile time flat in depth; an `HfTensor` with one name per layer maps such a stack.
- The module is called as
      module.apply({"params": params}, input_ids, attention_mask=None, segment_ids=None,
                   positions=None, token_type_ids=None, output="logits")
  with int32 [batch, seq] inputs: attention_mask 1 for real tokens, segment_ids > 0 naming packed
  sequences (tokens never attend across segments; 0 = padding), positions restarting per segment.
  `output="logits"` returns [B, T, vocab] (causal LMs) and `output="hidden"` the final hidden
  states [B, T, embed] after the last norm (what probes and classification heads read).
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable

import numpy as np

# Logical axis names a parameter may carry; compiler/ maps them to mesh axes.
LOGICAL_AXES = ("layers", "vocab", "embed", "mlp", "heads", "kv_heads", "head_dim", "norm", "position")


@dataclasses.dataclass(frozen=True)
class HfTensor:
    """Where a flax parameter lives in a Hugging Face state dict.

    `names` has one HF tensor name, or one per layer for a scanned stack (stacked on axis 0).
    `to_flax` maps one HF tensor (numpy, as stored) to the flax layout of one slice;
    `to_hf` is its exact inverse, so import -> export is bitwise.
    """

    names: tuple[str, ...]
    to_flax: Callable[[np.ndarray], np.ndarray] = lambda a: a
    to_hf: Callable[[np.ndarray], np.ndarray] = lambda a: a


def linear_t() -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    """torch.nn.Linear stores weight as (out, in); flax Dense kernels are (in, out)."""
    return {"to_flax": lambda a: np.ascontiguousarray(a.T), "to_hf": lambda a: np.ascontiguousarray(a.T)}


@dataclasses.dataclass(frozen=True)
class Family:
    name: str                                   # "llama"
    model_types: tuple[str, ...]                # config.json "model_type" values this family reads
    config_from_hf: Callable[[dict], Any]       # HF config dict -> frozen architecture dataclass
    build: Callable[[Any, Any], Any]            # (arch, compute dtype) -> flax.linen.Module
    hf_tensors: Callable[[Any], dict[str, HfTensor]]  # "/"-joined param path -> its HF source
    hf_config: Callable[[Any], dict]            # arch -> config.json transformers reads on export
    hf_architecture: str = ""                   # e.g. "LlamaForCausalLM", written on export


_FAMILY_MODULES = {
    # model_type -> module in this package defining FAMILY
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "qwen3": "llama",
    "gemma": "gemma",
    "gpt2": "gpt2",
    "bert": "bert",
}


def supported_model_types() -> tuple[str, ...]:
    return tuple(sorted(_FAMILY_MODULES))


def family_for(hf_config: dict) -> Family:
    """The family that reads this HF config, or a ValueError naming what is supported."""
    model_type = hf_config.get("model_type")
    if model_type not in _FAMILY_MODULES:
        raise ValueError(
            f"unsupported architecture model_type={model_type!r} "
            f"(architectures={hf_config.get('architectures')}); "
            f"ftc supports model_type in: {', '.join(supported_model_types())}"
        )
    module = importlib.import_module(f"{__package__}.{_FAMILY_MODULES[model_type]}")
    family = getattr(module, "FAMILIES", {}).get(model_type)
    if family is None and model_type in module.FAMILY.model_types:
        family = module.FAMILY
    if family is None:
        raise ValueError(f"module {module.__name__} does not read model_type={model_type!r}")
    return family
