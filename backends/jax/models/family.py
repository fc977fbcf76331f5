"""The contract every model family implements.

A family module (llama.py, gpt2.py, bert.py, ...) defines a `FAMILY = Family(...)` and one line in
the registry (`FAMILY_MODULES` in models/__init__.py) makes it known. Everything generic (HF
import/export, GGUF, sharding, methods such as LoRA) works through this contract and never
imports a family directly.

Conventions every family keeps:
- Parameters are float32 unless asked otherwise; the compute dtype is given to `build`.
- Every parameter is created with `flax.linen.with_logical_partitioning` over the logical axis
  names in `LOGICAL_AXES`, so the compiler can shard it by rules without knowing the family.
- An architecture dataclass may carry a `remat: str` field (one of layers.REMAT_POLICIES); the training
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
  states [B, T, embed] after the last norm (what probes and classification heads read);
  a causal LM also takes `output="logits_and_hidden"`: (logits, hidden) of one forward pass
  (what PPO's value head reads beside the policy's logits).
- A causal LM that generates also takes `output="last_logits"` (the last position's logits,
  [B, 1, vocab]) and `kv_cache=` (kv_cache.py: then it returns (output, advanced cache)), and
  its Family sets `cache_layout`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

# Logical axis names a parameter may carry; compiler/ maps them to mesh axes.
LOGICAL_AXES = (
    "layers",
    "vocab",
    "embed",
    "mlp",
    "heads",
    "kv_heads",
    "head_dim",
    "norm",
    "position",
    "expert",
)


@dataclasses.dataclass(frozen=True)
class HfTensor:
    """Where a flax parameter lives in a Hugging Face state dict.

    `names` has one HF tensor name, or one per layer for a scanned stack (stacked on axis 0).
    `to_flax` maps one HF tensor (numpy, as stored) to the flax layout of one slice;
    `to_hf` is its exact inverse, so import -> export is bitwise.
    An entry of `names` may itself be a tuple: one slice stored as several tensors (a MoE layer's
    experts, one tensor per expert and projection); `to_flax` then takes the tuple of arrays and
    `to_hf` returns one, in the same order.
    `fused`: the same weights as transformers holds them in memory, one tensor per slice (MoE
    experts: `mlp.experts.gate_up_proj` [E, 2F, D]); what PEFT's `target_parameters` address, and a
    layout some checkpoints store (import reads it when `names` are absent).
    """

    names: tuple[str | tuple[str, ...], ...]
    to_flax: Callable[[Any], np.ndarray] = lambda a: a
    to_hf: Callable[[np.ndarray], Any] = lambda a: a
    fused: HfTensor | None = None

    def stored_names(self) -> list[str]:
        """Every HF tensor name this parameter reads or writes (tuples flattened)."""
        return [n for entry in self.names for n in ((entry,) if isinstance(entry, str) else entry)]


def linear_t() -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    """torch.nn.Linear stores weight as (out, in); flax Dense kernels are (in, out)."""
    return {"to_flax": lambda a: np.ascontiguousarray(a.T), "to_hf": lambda a: np.ascontiguousarray(a.T)}


# Attention projections keep their heads as kernel axes (layers.Dense with in/out shapes).
def heads_in(n_heads: int, head_dim: int) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    """torch Linear (n*h, D) <-> flax kernel (D, n, h)."""
    return dict(
        to_flax=lambda a: np.ascontiguousarray(a.T).reshape(a.shape[1], n_heads, head_dim),
        to_hf=lambda a: np.ascontiguousarray(a.reshape(a.shape[0], n_heads * head_dim).T),
    )


def heads_out(n_heads: int, head_dim: int) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    """torch Linear (D, n*h) <-> flax kernel (n, h, D)."""
    return dict(
        to_flax=lambda a: np.ascontiguousarray(a.T).reshape(n_heads, head_dim, a.shape[0]),
        to_hf=lambda a: np.ascontiguousarray(a.reshape(n_heads * head_dim, a.shape[-1]).T),
    )


def heads_bias(n_heads: int, head_dim: int) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    """torch bias (n*h,) <-> flax bias (n, h)."""
    return dict(to_flax=lambda a: a.reshape(n_heads, head_dim), to_hf=lambda a: a.reshape(n_heads * head_dim))


@dataclasses.dataclass(frozen=True)
class Family:
    name: str  # "llama"
    model_types: tuple[str, ...]  # config.json "model_type" values this family reads
    config_from_hf: Callable[[dict], Any]  # HF config dict -> frozen architecture dataclass
    build: Callable[[Any, Any], Any]  # (arch, compute dtype) -> flax.linen.Module
    hf_tensors: Callable[[Any], dict[str, HfTensor]]  # "/"-joined param path -> its HF source
    hf_config: Callable[[Any], dict]  # arch -> config.json transformers reads on export
    hf_architecture: str = ""  # e.g. "LlamaForCausalLM", written on export
    # arch -> kv_cache.CacheLayout, for a causal LM whose module decodes with `kv_cache=` (see
    # kv_cache.py); None: the family does not generate (an encoder)
    cache_layout: Callable[[Any], Any] | None = None
