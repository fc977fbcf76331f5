"""The plan's architecture numbers agree with the model the family builds when config.json omits
keys whose transformers default is particular to the model type (the plan printed Gemma and GPT-2
as untied and Gemma / Qwen3 with head_dim = hidden / heads)."""

from __future__ import annotations

import pytest

from ftc.backends.jax.models import family_for
from ftc.compiler.model_summary import model_summary

SIZES = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=256)


@pytest.mark.parametrize(
    "config",
    [
        dict(SIZES, model_type="gemma", intermediate_size=128),
        dict(SIZES, model_type="qwen3", intermediate_size=128),
        dict(model_type="gpt2", vocab_size=256, n_embd=32, n_layer=2, n_head=4, n_positions=64),
    ],
    ids=lambda c: c["model_type"],
)
def test_summary_takes_the_model_types_defaults_for_omitted_keys(config):
    family = family_for(config)
    arch = family.config_from_hf(config)
    summary = model_summary(config, family.name)
    assert summary.head_dim == arch.head_dim
    assert summary.tied_embeddings == arch.tie_word_embeddings == (config["model_type"] != "qwen3")
