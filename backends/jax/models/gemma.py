"""Gemma (1): the llama.py decoder with Gemma's three differences switched on by DecoderArch.

- embeddings multiplied by sqrt(hidden_size), rounded to the compute dtype as transformers does
  (`scale_embeddings`);
- RMSNorm as normalize(x) * (1 + weight), computed in float32 (`norm_unit_offset`);
- GeGLU MLP with the tanh GELU ("gelu_pytorch_tanh"; Gemma's config "gelu" means the same),
  explicit head_dim (256 in the released models, != hidden / heads), tied embeddings.
Parameter names and the HF tensor map are llama's (GemmaForCausalLM uses the same module names).
"""

from __future__ import annotations

from ftc.backends.jax.models import llama
from ftc.backends.jax.models.family import Family


def config_from_hf(hf_config: dict) -> llama.DecoderArch:
    if hf_config.get("model_type") != "gemma":
        raise ValueError(f"gemma.py reads model_type 'gemma', got {hf_config.get('model_type')!r}")
    return llama.config_from_hf(hf_config)


FAMILY = Family(
    name="gemma",
    model_types=("gemma",),
    config_from_hf=config_from_hf,
    build=llama.build,
    hf_tensors=llama.hf_tensors,
    hf_config=llama.hf_config,
    hf_architecture="GemmaForCausalLM",
    cache_layout=llama.cache_layout,
)
