"""config.json read and checked before anything is built from it, every problem named with the file.

`read_hf_config` refuses custom code (`auto_map`, `trust_remote_code`: ftc never runs code shipped
with a model) and what `check_hf_config` finds.

The families read config.json leniently (missing keys take transformers' class defaults), so a
value of the wrong type or out of range used to surface deep inside jax as a shape error or an
overflow ("internal error", or a message about `scan` lengths). `check_hf_config` refuses those
first: each size key a family reads must be a positive integer that fits an int32 array
dimension, each epsilon / rope base a positive number; then the family reads the config, and what
it refuses (heads that do not divide, an unsupported rope type) is prefixed with the file.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from ftc.backends.jax.models import family_for, supported_model_types

# Dimensions and counts the families read (any family: a key absent from a config is skipped).
# null stays allowed: transformers reads it as "derive it" (num_key_value_heads, head_dim, n_inner).
SIZE_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
    "type_vocab_size",
    "n_embd",
    "n_layer",
    "n_head",
    "n_positions",
    "n_inner",
    "num_local_experts",
    "num_experts",
    "num_experts_per_tok",
    "moe_intermediate_size",
    "shared_expert_intermediate_size",
    "decoder_sparse_step",
)
POSITIVE_NUMBERS = ("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", "rope_theta")
TABLES = ("rope_scaling", "rope_parameters")  # JSON objects (or null)
MAX_SIZE = 2**31 - 1  # jax indexes array dimensions with int32


def _custom_code(config: dict) -> str | None:
    """What in a config.json asks for the model's own code (`auto_map`, `trust_remote_code`), or None."""
    if "auto_map" in config:
        auto_map = config["auto_map"]
        return f"key 'auto_map' {sorted(auto_map) if isinstance(auto_map, dict) else auto_map!r}"
    if config.get("trust_remote_code"):
        return f"key 'trust_remote_code': {json.dumps(config['trust_remote_code'])}"
    return None


def parse_config_json(config_path: str | os.PathLike) -> dict:
    """The object in `config_path`; a ValueError starting with the path when it cannot be read, is
    not a JSON object, or asks for custom model code (auto_map / trust_remote_code)."""
    try:
        data = Path(config_path).read_bytes()
    except OSError as e:
        raise ValueError(f"{config_path}: cannot be read ({e.strerror or e})") from None
    try:
        config = json.loads(data)
    except ValueError as e:
        raise ValueError(f"{config_path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_path}: expected a JSON object")
    code = _custom_code(config)
    if code:
        raise ValueError(
            f"{config_path}: {code} asks for custom model code (trust_remote_code); ftc never runs code "
            f"from a checkpoint. Supported built-in model_type values: {', '.join(supported_model_types())}"
        )
    return config


def read_hf_config(model_dir: str | os.PathLike) -> dict:
    """config.json of a local HF directory, refusing custom code (auto_map / trust_remote_code)."""
    config_path = Path(model_dir) / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"{model_dir}: no config.json (expected a Hugging Face model directory)")
    config = parse_config_json(config_path)
    check_hf_config(config, config_path)  # bad sizes named here, not as a jax shape error later
    return config


def config_problems(config: dict) -> list[str]:
    """What in `config` no family can build a model from, one line per key."""
    problems = []
    for key in SIZE_KEYS:
        value = config.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(f"{key}: expected a positive integer, got {_shown(value)}")
        elif not 1 <= value <= MAX_SIZE:
            problems.append(f"{key}: expected an integer from 1 to {MAX_SIZE}, got {value}")
    for key in POSITIVE_NUMBERS:
        value = config.get(key)
        if value is None:
            continue
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not number or not math.isfinite(value) or value <= 0:
            problems.append(f"{key}: expected a positive number, got {_shown(value)}")
    for key in TABLES:
        value = config.get(key)
        if value is not None and not isinstance(value, dict):
            problems.append(f"{key}: expected a JSON object or null, got {_shown(value)}")
    return problems


def check_hf_config(config: dict, where: str | os.PathLike) -> None:
    """A ValueError naming `where` (the config.json) and every bad value, or what the family that
    reads `config` refuses in it; None when a model can be built from it."""
    problems = config_problems(config)
    if problems:
        raise ValueError(f"{where}: " + "; ".join(problems))
    try:
        arch = family_for(config).config_from_hf(config)
    except KeyError as e:  # a key the family needs and has no default for (e.g. rope_scaling.factor)
        raise ValueError(f"{where}: missing key {e} for model_type {config.get('model_type')!r}") from None
    except (ValueError, TypeError, AttributeError) as e:
        message = str(e).removeprefix("config.json ")  # the families' own messages say which file
        raise ValueError(f"{where}: {message}") from None
    # Rotary embeddings turn pairs of a head's dimensions: an odd head_dim, or 0 (hidden_size under
    # num_attention_heads), failed inside jax as a shape error or a division by zero.
    head_dim = getattr(arch, "head_dim", None)
    if getattr(arch, "rope", None) is not None and isinstance(head_dim, int) and (head_dim < 2 or head_dim % 2):
        source = "head_dim" if config.get("head_dim") else "hidden_size // num_attention_heads"
        raise ValueError(f"{where}: {source}={head_dim}: rotary embeddings need an even head size of 2 or more")


def _shown(value) -> str:
    text = repr(value) if isinstance(value, str) else str(value).lower() if isinstance(value, bool) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
