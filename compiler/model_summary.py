"""The architecture numbers a plan prints and counts with, read from config.json (HF key aliases)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class ModelSummary:
    family: str
    model_type: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    max_position_embeddings: int | None
    tied_embeddings: bool
    experts: int = 0  # mixture-of-experts models: experts per MoE layer (0: dense)
    experts_per_token: int = 0
    expert_intermediate: int = 0  # one routed expert's MLP width (Qwen MoE: moe_intermediate_size)
    shared_intermediate: int = 0  # Qwen2-MoE's shared expert's MLP width (0: none)

    @property
    def active_fraction(self) -> float:
        """The share of each expert weight a token runs through (top-k of E)."""
        return self.experts_per_token / self.experts if self.experts else 1.0


def _first(cfg: dict, *keys, default=None):
    for key in keys:
        if cfg.get(key) is not None:
            return cfg[key]
    return default


# transformers' class defaults that differ from the generic ones below, for configs that omit the
# key (the families fill them the same way): Gemma's head_dim 256 (not hidden / heads) and tied
# head, Qwen3's head_dim 128, GPT-2's tied head.
_TYPE_DEFAULTS = {
    "gemma": {"head_dim": 256, "tie_word_embeddings": True},
    "qwen3": {"head_dim": 128},
    "gpt2": {"tie_word_embeddings": True},
}


def model_summary(hf_config: dict, family: str) -> ModelSummary:
    """The architecture numbers the plan prints, read from config.json (HF key aliases), for a
    model of the named family."""
    text = hf_config.get("text_config") or {}
    cfg = {**_TYPE_DEFAULTS.get(hf_config.get("model_type"), {}), **text, **hf_config}
    hidden = int(_first(cfg, "hidden_size", "n_embd", "d_model", default=0))
    heads = int(_first(cfg, "num_attention_heads", "n_head", default=1))
    experts = int(_first(cfg, "num_local_experts", "num_experts", default=0))
    return ModelSummary(
        family=family,
        model_type=str(hf_config.get("model_type")),
        layers=int(_first(cfg, "num_hidden_layers", "n_layer", "num_layers", default=0)),
        hidden=hidden,
        heads=heads,
        kv_heads=int(_first(cfg, "num_key_value_heads", default=heads)),
        head_dim=int(_first(cfg, "head_dim", default=hidden // max(heads, 1))),
        intermediate=int(_first(cfg, "intermediate_size", "n_inner", default=4 * hidden)),
        vocab=int(_first(cfg, "vocab_size", default=0)),
        max_position_embeddings=_first(cfg, "max_position_embeddings", "n_positions"),
        tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        experts=experts,
        experts_per_token=int(_first(cfg, "num_experts_per_tok", default=0)),
        expert_intermediate=int(_first(cfg, "moe_intermediate_size", "intermediate_size", default=0)) if experts else 0,
        shared_intermediate=int(_first(cfg, "shared_expert_intermediate_size", default=0)) if experts else 0,
    )
