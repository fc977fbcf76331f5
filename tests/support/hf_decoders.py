"""Tiny random Hugging Face decoders (PyTorch) saved to a directory, and logits to compare with.

Shared by test_llama.py, test_gemma.py and test_hf_checkpoint.py. Every config: hidden 64,
2 layers, 4 heads, 2 kv heads, vocab 256.
"""

from __future__ import annotations

import numpy as np
import torch

TINY = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=256,
    intermediate_size=128,
    max_position_embeddings=128,
)


def hf_config(case: str):
    """A transformers config for one of CASES."""
    import transformers as tf

    if case == "llama":
        return tf.LlamaConfig(**TINY)
    if case == "llama-tied-llama3-rope":
        return tf.LlamaConfig(
            **TINY,
            tie_word_embeddings=True,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        )
    if case == "llama-linear-rope-bias":
        return tf.LlamaConfig(
            **TINY,
            attention_bias=True,
            mlp_bias=True,
            rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
        )
    if case == "mistral":
        return tf.MistralConfig(**TINY, sliding_window=4)
    if case == "qwen2":
        # sliding window on layer 1 only: one scanned stack with two kinds of layers.
        return tf.Qwen2Config(**TINY, use_sliding_window=True, sliding_window=4, max_window_layers=1)
    if case == "qwen3":
        return tf.Qwen3Config(**TINY, head_dim=32)
    if case == "gemma":
        return tf.GemmaConfig(**TINY, head_dim=32)
    raise KeyError(case)


CASES = ("llama", "llama-tied-llama3-rope", "llama-linear-rope-bias", "mistral", "qwen2", "qwen3", "gemma")


def make_hf_model(case: str, seed: int = 0, **config_keys):
    """A perturbed random model of `case`; `config_keys` override its config's (e.g. max_position_embeddings)."""
    import transformers as tf

    config = hf_config(case)
    for key, value in config_keys.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    # Random init leaves norms at 1 (or 0 for Gemma): perturb every parameter so a wrong norm,
    # bias or layout cannot hide.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def hf_logits(model, input_ids, attention_mask=None, position_ids=None) -> np.ndarray:
    as_t = lambda a: None if a is None else torch.as_tensor(np.asarray(a))
    with torch.no_grad():
        return (
            model(as_t(input_ids), attention_mask=as_t(attention_mask), position_ids=as_t(position_ids))
            .logits.float()
            .numpy()
        )


def padded_batch(seed: int = 0, T: int = 10):
    """Row 0 full, row 1 right-padded (last 3 pad), row 2 left-padded (first 4 pad)."""
    rng = np.random.default_rng(seed)
    input_ids = rng.integers(0, 256, (3, T)).astype(np.int32)
    mask = np.ones((3, T), np.int32)
    mask[1, T - 3 :] = 0
    mask[2, :4] = 0
    # Positions count real tokens (what generate() passes for left padding).
    positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None).astype(np.int32)
    return input_ids, mask, positions


def max_diff_on_real_tokens(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    return float(np.abs(a - b)[mask.astype(bool)].max())
