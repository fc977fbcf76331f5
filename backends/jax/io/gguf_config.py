"""A transformers config.json rebuilt from a GGUF file's llama.cpp metadata (pure; no tensors read).

`config_from_gguf` maps `<arch>.*` keys (llama, qwen2, qwen3, gemma) onto the Llama-style config the HF
family reads; RoPE scaling comes from `rope.scaling.*` or, for Llama 3.1+, from the
`rope_freqs.weight` tensor the converter stores instead of its parameters.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class GgufArch:
    """How one llama.cpp architecture maps onto a transformers model."""

    model_type: str
    architecture: str
    permuted_qk: bool  # llama.cpp's converter permutes Q/K rows (Llama only)
    config_head_dim: bool = True  # the config class has a head_dim field
    required: tuple[str, ...] = ()  # per-layer HF tensors beyond the Llama core it always has
    extra_config: tuple[tuple[str, Any], ...] = ()
    norm_plus_one: bool = False  # norm weights stored as 1 + w (Gemma: llama.cpp multiplies by w, HF by 1 + w)


ARCHITECTURES = {
    "llama": GgufArch("llama", "LlamaForCausalLM", permuted_qk=True),
    "qwen2": GgufArch(
        "qwen2",
        "Qwen2ForCausalLM",
        permuted_qk=False,
        config_head_dim=False,
        required=("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
        extra_config=(("use_sliding_window", False),),
    ),
    "qwen3": GgufArch(
        "qwen3", "Qwen3ForCausalLM", permuted_qk=False, required=("self_attn.q_norm.weight", "self_attn.k_norm.weight")
    ),
    "gemma": GgufArch(
        "gemma",
        "GemmaForCausalLM",
        permuted_qk=False,
        extra_config=(("hidden_act", "gelu_pytorch_tanh"),),
        norm_plus_one=True,
    ),
}
SUPPORTED_ARCHITECTURES = tuple(ARCHITECTURES)
BY_MODEL_TYPE = {a.model_type: a for a in ARCHITECTURES.values()}


class GgufImportError(ValueError):
    """A GGUF file ftc cannot turn into a Hugging Face checkpoint; the message names the file."""


def read_metadata(reader) -> dict[str, Any]:
    """GGUF key/value metadata as Python values; the long tokenizer arrays are left out."""
    skip = {
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.merges",
        "tokenizer.ggml.token_type",
        "tokenizer.ggml.scores",
        "tokenizer.ggml.precompiled_charsmap",
    }
    out = {}
    for key, field in reader.fields.items():
        if key in skip:
            out[key] = len(field.data)  # a count is all the config needs (vocab size)
        else:
            out[key] = field.contents()
    return out


# Where llama.cpp's converter records the Hugging Face repository a GGUF was converted from.
HF_NAME_KEYS = (
    "general.source.huggingface.repository",
    "general.source.repo_url",
    "general.source.url",
    "general.repo_url",
    "general.url",
)
_HF_URL = re.compile(r"(?:https?://)?(?:www\.)?(?:huggingface\.co|hf\.co)/([\w.-]+/[\w.-]+)(?:[/?#].*)?")
_HF_REPO = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def hf_name(metadata: dict) -> str | None:
    """The Hugging Face model id (`org/name`) the GGUF says it was converted from, if it says."""
    for key in HF_NAME_KEYS:
        value = metadata.get(key)
        if not isinstance(value, str):
            continue
        value = value.strip()
        if m := _HF_URL.fullmatch(value):
            return m.group(1)
        if key == HF_NAME_KEYS[0] and _HF_REPO.fullmatch(value):
            return value
    return None


def _float(value: float) -> float:
    # GGUF stores float32; write the shortest decimal that is the same float32 (1e-05, not 9.99e-06).
    return float(str(np.float32(value)))


def config_from_gguf(
    metadata: dict[str, Any],
    tensor_names: tuple[str, ...],
    *,
    source: str = "GGUF",
    rope_freqs: np.ndarray | None = None,
) -> dict:
    """A transformers config dict from llama.cpp metadata (pure; `source` names the file in errors).

    `rope_freqs` is the file's `rope_freqs.weight` tensor, when it has one (Llama 3.1+ RoPE scaling).
    """
    arch = metadata.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise GgufImportError(
            f"{source}: general.architecture={arch!r} is not supported; ftc imports GGUF architectures "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}"
        )

    def key(name: str, default: Any = ...) -> Any:
        full = f"{arch}.{name}"
        if full in metadata:
            return metadata[full]
        if default is ...:
            raise GgufImportError(f"{source}: metadata key {full!r} is missing (needed for config.json)")
        return default

    if key("expert_count", 0):
        raise GgufImportError(
            f"{source}: mixture-of-experts GGUF ({arch}.expert_count="
            f"{key('expert_count')}) is not supported; ftc imports dense models"
        )
    if "rope_freqs.weight" in tensor_names and rope_freqs is None:
        raise GgufImportError(f"{source}: the rope_freqs.weight tensor is needed to rebuild the RoPE config")

    hidden = key("embedding_length")
    heads = key("attention.head_count")
    kv_heads = key("attention.head_count_kv", heads)
    head_dim = key("attention.key_length", hidden // heads)
    if key("attention.value_length", head_dim) != head_dim:
        raise GgufImportError(
            f"{source}: key_length {head_dim} != value_length {key('attention.value_length')}; Llama needs them equal"
        )
    rope_dims = key("rope.dimension_count", head_dim)
    if rope_dims != head_dim:
        raise GgufImportError(
            f"{source}: {arch}.rope.dimension_count={rope_dims} but head_dim={head_dim}; "
            "partial rotary embeddings are not a Llama architecture"
        )
    if isinstance(kv_heads, list):  # per-layer head counts (hybrid models)
        raise GgufImportError(f"{source}: per-layer {arch}.attention.head_count_kv is not supported")

    vocab = key("vocab_size", None)
    if vocab is None:
        vocab = metadata.get("tokenizer.ggml.tokens")
    if vocab is None:
        raise GgufImportError(f"{source}: neither {arch}.vocab_size nor tokenizer.ggml.tokens gives the vocab size")

    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": _float(key("rope.freq_base", 10000.0))}
    scaling = key("rope.scaling.type", "none")
    if rope_freqs is not None:
        if arch != "llama":
            raise GgufImportError(f"{source}: rope_freqs.weight in a {arch} model is not supported")
        rope = llama3_rope_from_factors(
            rope_freqs,
            rope["rope_theta"],
            head_dim,
            source=source,
            original=key("rope.scaling.original_context_length", None),
        )
    elif scaling == "linear":
        rope.update(rope_type="linear", factor=_float(key("rope.scaling.factor")))
    elif scaling not in ("none", None):
        raise GgufImportError(
            f"{source}: {arch}.rope.scaling.type={scaling!r} is not supported (supported: none, linear)"
        )

    spec = ARCHITECTURES[arch]
    if not spec.config_head_dim and head_dim != hidden // heads:
        raise GgufImportError(
            f"{source}: head_dim {head_dim} != hidden {hidden} / heads {heads}, which "
            f"{spec.model_type} configs cannot express"
        )
    config = {
        "architectures": [spec.architecture],
        "model_type": spec.model_type,
        "hidden_size": hidden,
        "intermediate_size": key("feed_forward_length"),
        "num_hidden_layers": key("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": _float(key("attention.layer_norm_rms_epsilon")),
        "rope_parameters": rope,
        "max_position_embeddings": key("context_length"),
        "vocab_size": vocab,
        # llama.cpp writes output.weight only when the LM head is not the embedding matrix.
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "attention_bias": "blk.0.attn_q.bias" in tensor_names,
        "mlp_bias": "blk.0.ffn_up.bias" in tensor_names,  # Llama only; dropped below for the others
        "bos_token_id": metadata.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": metadata.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": metadata.get("tokenizer.ggml.padding_token_id"),
        "torch_dtype": "float32",
        **dict(spec.extra_config),
    }
    if not spec.config_head_dim:
        del config["head_dim"]
    if spec.model_type != "llama":  # no MLP-bias switch; a bias tensor there is refused as unknown
        del config["mlp_bias"]
    if spec.model_type == "qwen2":  # Qwen2 always has q/k/v biases and no others: no switch
        del config["attention_bias"]
    return config


# Llama 3.1's RoPE scaling as Meta ships it; llama.cpp reads original_max_position_embeddings from
# the top level of config.json, where Llama 3.x has none, so its files always use 8192.
_LLAMA3_ROPE_CANDIDATES = ({"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},)


def llama3_rope_factors(
    theta: float,
    head_dim: int,
    factor: float,
    low_freq_factor: float,
    high_freq_factor: float,
    original_max_position_embeddings: int,
) -> np.ndarray:
    """The per-frequency divisors llama.cpp's converter stores as rope_freqs.weight (float32)."""
    freqs = (
        np.float32(1.0) / (np.float32(theta) ** (np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)))
    ).astype(np.float32)
    old = original_max_position_embeddings
    low_wavelen, high_wavelen = old / low_freq_factor, old / high_freq_factor
    out = []
    for freq in freqs:
        wavelen = np.float32(2 * np.pi) / freq
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def llama3_rope_from_factors(
    rope_freqs: np.ndarray, theta: float, head_dim: int, *, source: str, original: int | None = None
) -> dict:
    """HF `rope_parameters` (rope_type llama3) that give exactly these rope_freqs, or an error.

    The file stores only the result, not the parameters: the factor is its largest entry, and the
    rest must be one of the known settings that reproduces every entry.
    """
    factors = np.asarray(rope_freqs, dtype=np.float32).reshape(-1)
    if factors.shape != (head_dim // 2,):
        raise GgufImportError(
            f"{source}: rope_freqs.weight has {factors.size} entries, head_dim {head_dim} needs {head_dim // 2}"
        )
    if np.all(factors == 1.0):
        return {"rope_type": "default", "rope_theta": theta}
    factor = float(factors.max())
    candidates = list(_LLAMA3_ROPE_CANDIDATES)
    if original:
        candidates.insert(0, {**candidates[0], "original_max_position_embeddings": int(original)})
    for params in candidates:
        if np.allclose(llama3_rope_factors(theta, head_dim, factor, **params), factors, rtol=1e-6, atol=0):
            return {"rope_type": "llama3", "rope_theta": theta, "factor": _float(factor), **params}
    raise GgufImportError(
        f"{source}: rope_freqs.weight (min {factors.min():.4g}, max {factor:.4g}) matches no Llama 3 RoPE "
        f"scaling ftc knows ({candidates}); convert the original HF checkpoint instead"
    )
