"""Model families: the Family contract (family.py), shared layers, one file per family.

The registry: one line per config.json `model_type` in FAMILY_MODULES names the module that reads
it. That module defines `FAMILY = Family(...)`, or `FAMILIES = {model_type: Family(...)}` when it
reads several model types that export under their own names (llama.py: llama, mistral, qwen2,
qwen3). Modules are imported when first asked for; a name without a leading dot is an absolute
module name. Everything generic (HF import/export, GGUF, sharding, methods such as LoRA) finds a
family through `family_for` and never imports one directly.
"""

from __future__ import annotations

import importlib

from ftc.backends.jax.models.family import Family

FAMILY_MODULES = {
    "llama": ".llama",
    "mistral": ".llama",
    "qwen2": ".llama",
    "qwen3": ".llama",
    "gemma": ".gemma",
    "gpt2": ".gpt2",
    "bert": ".bert",
    "mixtral": ".mixtral",
    "qwen2_moe": ".qwen2_moe",
    "qwen3_moe": ".qwen3_moe",
}


def supported_model_types() -> tuple[str, ...]:
    return tuple(sorted(FAMILY_MODULES))


def family_for(hf_config: dict) -> Family:
    """The family that reads this HF config, or a ValueError naming what is supported."""
    model_type = hf_config.get("model_type")
    if model_type not in FAMILY_MODULES:
        raise ValueError(
            f"unsupported architecture model_type={model_type!r} "
            f"(architectures={hf_config.get('architectures')}); "
            f"ftc supports model_type in: {', '.join(supported_model_types())}"
        )
    module = importlib.import_module(FAMILY_MODULES[model_type], __name__)
    family = getattr(module, "FAMILIES", {}).get(model_type)
    if family is None and model_type in module.FAMILY.model_types:
        family = module.FAMILY
    if family is None:
        raise ValueError(f"module {module.__name__} does not read model_type={model_type!r}")
    return family
