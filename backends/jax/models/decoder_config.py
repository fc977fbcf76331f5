"""The dense decoder architecture (llama, mistral, qwen2, qwen3, gemma) as a frozen `DecoderArch`,
read from and written back to a transformers config.json (keys transformers omits get its class
defaults per model_type). llama.py builds the model from it."""

from __future__ import annotations

import dataclasses
from typing import Any

from ftc.backends.jax.models import layers

# Class defaults of the transformers config for each model_type, for configs that omit keys.
_HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=None,
        head_dim=None,
        hidden_act="silu",
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
    ),
    "mistral": dict(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=None,
        hidden_act="silu",
        max_position_embeddings=4096 * 32,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        sliding_window=4096,
    ),
    "qwen2": dict(
        vocab_size=151936,
        hidden_size=4096,
        intermediate_size=22016,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        head_dim=None,
        hidden_act="silu",
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        use_sliding_window=False,
        sliding_window=4096,
        max_window_layers=28,
    ),
    "qwen3": dict(
        vocab_size=151936,
        hidden_size=4096,
        intermediate_size=22016,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        head_dim=128,
        hidden_act="silu",
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        attention_bias=False,
        use_sliding_window=False,
        sliding_window=4096,
        max_window_layers=28,
    ),
    "gemma": dict(
        vocab_size=256000,
        hidden_size=3072,
        intermediate_size=24576,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=16,
        head_dim=256,
        hidden_act="gelu_pytorch_tanh",
        max_position_embeddings=8192,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        attention_bias=False,
        use_bidirectional_attention=None,
    ),
}


@dataclasses.dataclass(frozen=True)
class DecoderArch:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: layers.Rope
    max_position_embeddings: int
    tie_word_embeddings: bool
    hidden_act: str = "silu"
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    # One flag per layer: does this layer use the sliding window (qwen2/3 mix both kinds).
    sliding_layers: tuple[bool, ...] = ()
    causal: bool = True
    # Gemma: x * sqrt(hidden) after the embedding, norms as x * (1 + w).
    scale_embeddings: bool = False
    norm_unit_offset: bool = False
    # Training-time choice, not part of the checkpoint: none | full | dots.
    remat: str = "none"
    # Mixture-of-Experts feed-forward (models/moe.py MoeArch) in place of the dense mlp.
    moe: Any = None

    def __post_init__(self):
        layers.check_remat(self.remat)
        layers.check_activation(self.hidden_act, "hidden_act")
        window = self.sliding_window
        if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
            # A window of 0 would mask every key: finite, meaningless logits (transformers crashes).
            raise ValueError(
                f"config.json sliding_window={window!r}: expected a positive integer (how many keys a query "
                f"sees, itself included) or null for no window"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )


def _with_defaults(hf_config: dict) -> dict:
    model_type = hf_config.get("model_type")
    if model_type not in _HF_DEFAULTS:
        raise ValueError(f"llama.py reads model_type in {sorted(_HF_DEFAULTS)}, got {model_type!r}")
    # An explicit null is meaningful (mistral sliding_window: null = no window), so it overrides.
    return {**_HF_DEFAULTS[model_type], **hf_config}


def _sliding_layers(c: dict) -> tuple[int | None, tuple[bool, ...]]:
    n = c["num_hidden_layers"]
    model_type = c["model_type"]
    if model_type == "mistral":
        window = c.get("sliding_window")
        return window, (window is not None,) * n
    if model_type in ("qwen2", "qwen3"):
        window = c.get("sliding_window") if c.get("use_sliding_window") else None
        layer_types = c.get("layer_types") or [
            "sliding_attention" if window is not None and i >= c["max_window_layers"] else "full_attention"
            for i in range(n)
        ]
        flags = tuple(t == "sliding_attention" and window is not None for t in layer_types)
        return (window if any(flags) else None), flags
    return None, (False,) * n


_TANH_GELU = ("gelu_pytorch_tanh", "gelu_new", "gelu_fast")  # one function under three names


def _gemma_activation(c: dict) -> str:
    """Gemma's MLP activation. transformers 5 computes it from hidden_act, reading "gelu" as the
    tanh form (what the released checkpoints meant); transformers 4 read hidden_activation instead
    and ignored hidden_act. Released configs name the tanh form both ways ("gelu" read as it, as ftc
    always has); a file whose two keys name different functions is refused, since the two would
    build different models from it."""
    legacy = lambda name: "gelu_pytorch_tanh" if name == "gelu" else name  # "gelu" meant the tanh form
    act, other = legacy(c["hidden_act"]), c.get("hidden_activation")
    if other is not None and legacy(other) != act and not (legacy(other) in _TANH_GELU and act in _TANH_GELU):
        raise ValueError(
            f"config.json hidden_act={c['hidden_act']!r} and hidden_activation={other!r} name different "
            f"activations (transformers 5 computes Gemma's MLP with hidden_act, transformers 4 with "
            f"hidden_activation); expected the two to agree, e.g. both 'gelu_pytorch_tanh'"
        )
    return act


def config_from_hf(hf_config: dict) -> DecoderArch:
    """config.json (dict) -> DecoderArch, filling what the file omits with transformers' defaults."""
    c = _with_defaults(hf_config)
    model_type = c["model_type"]
    num_heads = c["num_attention_heads"]
    head_dim = c.get("head_dim") or c["hidden_size"] // num_heads
    window, sliding = _sliding_layers(c)
    hidden_act = _gemma_activation(c) if model_type == "gemma" else c["hidden_act"]
    # Only the model types whose transformers module reads a bias key honour it; the others build
    # their projections without bias whatever the file says (a config may carry the key all the same).
    attention_bias = model_type in ("llama", "qwen3", "gemma") and bool(c.get("attention_bias", False))
    return DecoderArch(
        model_type=model_type,
        vocab_size=c["vocab_size"],
        hidden_size=c["hidden_size"],
        intermediate_size=c["intermediate_size"],
        num_layers=c["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=c.get("num_key_value_heads") or num_heads,
        head_dim=head_dim,
        rms_norm_eps=float(c["rms_norm_eps"]),
        rope=layers.Rope.from_hf(c),
        max_position_embeddings=c["max_position_embeddings"],
        tie_word_embeddings=bool(c["tie_word_embeddings"]),
        hidden_act=hidden_act,
        qkv_bias=True if model_type == "qwen2" else attention_bias,
        o_bias=False if model_type == "qwen2" else attention_bias,
        mlp_bias=model_type == "llama" and bool(c.get("mlp_bias", False)),
        qk_norm=model_type == "qwen3",
        sliding_window=window,
        sliding_layers=sliding,
        causal=not c.get("use_bidirectional_attention"),
        scale_embeddings=model_type == "gemma",
        norm_unit_offset=model_type == "gemma",
    )


def hf_config(arch: DecoderArch) -> dict:
    """The architecture keys of config.json (export merges them over the imported config)."""
    rope = arch.rope.to_hf()
    out: dict[str, Any] = {
        "model_type": arch.model_type,
        "vocab_size": arch.vocab_size,
        "hidden_size": arch.hidden_size,
        "intermediate_size": arch.intermediate_size,
        "num_hidden_layers": arch.num_layers,
        "num_attention_heads": arch.num_heads,
        "num_key_value_heads": arch.num_kv_heads,
        "head_dim": arch.head_dim,
        "hidden_act": arch.hidden_act,
        "max_position_embeddings": arch.max_position_embeddings,
        "rms_norm_eps": arch.rms_norm_eps,
        "tie_word_embeddings": arch.tie_word_embeddings,
        # transformers 5 reads rope_parameters; older readers (transformers 4, vLLM) read
        # rope_theta + rope_scaling. transformers 5 prefers rope_scaling when both are present,
        # so both carry the same settings.
        "rope_parameters": rope,
        "rope_theta": arch.rope.theta,
        "rope_scaling": None if arch.rope.kind == "default" else dict(rope),
    }
    if arch.model_type in ("llama", "qwen3", "gemma"):
        out["attention_bias"] = arch.qkv_bias
    if arch.model_type == "llama":
        out["mlp_bias"] = arch.mlp_bias
    if arch.model_type == "mistral":
        out["sliding_window"] = arch.sliding_window
    if arch.model_type in ("qwen2", "qwen3"):
        out["use_sliding_window"] = arch.sliding_window is not None
        out["sliding_window"] = arch.sliding_window
        out["layer_types"] = ["sliding_attention" if s else "full_attention" for s in arch.sliding_layers]
    if arch.model_type == "gemma":
        out["use_bidirectional_attention"] = None if arch.causal else True
    return out
