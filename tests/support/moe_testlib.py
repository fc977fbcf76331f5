"""Tiny random Hugging Face mixture-of-experts decoders (PyTorch), for the MoE family tests.

Every config: hidden 64, 2 layers, 4 heads, 2 kv heads, vocab 256, 4 experts, 2 per token. Each
case switches on what its family adds: Mixtral a sliding window, Qwen2-MoE a shared expert and a
sliding window on one layer, Qwen3-MoE q/k norm and renormalised top-k weights.
"""

from __future__ import annotations

import torch
from hf_decoders import TINY

MOE_CASES = ("mixtral", "qwen2_moe", "qwen3_moe")
EXPERTS = 4


def moe_config(case: str, **extra):
    """The transformers config of `case`; `extra` overrides any key (e.g. vocab_size)."""
    import transformers as tf

    if case == "mixtral":
        keys = dict(TINY, num_local_experts=EXPERTS, num_experts_per_tok=2, sliding_window=4)
        return tf.MixtralConfig(**{**keys, **extra})
    common = dict(TINY, moe_intermediate_size=64, num_experts=EXPERTS, num_experts_per_tok=2)
    if case == "qwen2_moe":
        # sliding window on layer 0 only (Qwen2-MoE's rule: odd i + 1 below max_window_layers).
        window = dict(use_sliding_window=True, sliding_window=4, max_window_layers=2)
        return tf.Qwen2MoeConfig(**{**common, "shared_expert_intermediate_size": 96, **window, **extra})
    if case == "qwen3_moe":
        return tf.Qwen3MoeConfig(**{**common, "head_dim": 32, "norm_topk_prob": True, **extra})
    raise KeyError(case)


def make_moe_model(case: str, seed: int = 0, **extra):
    """A tiny random transformers MoE model with every parameter perturbed (router included, which
    Qwen initialises to zeros: every token would tie)."""
    import transformers as tf

    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(moe_config(case, **extra)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model
