"""`shapes.abstract_boxed_params` traces a module's init once per distinct module: a LoRA run used
to trace the same model four times at start-up (plan, method, shardings, checks)."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from ftc.backends.jax.methods import lora
from ftc.backends.jax.models import family_for, shapes

HF_CONFIG = {
    "model_type": "llama",
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}


def _lora_model(rank: int):
    family = family_for(HF_CONFIG)
    arch = family.config_from_hf(HF_CONFIG)
    config = lora.LoraConfig(rank=rank, alpha=8.0, dropout=0.0, rslora=False, targets=lora.ALL_LINEAR)
    return lora.adapt(family, arch, family.build(arch, jnp.float32), config)


def _count_inits(monkeypatch) -> list:
    calls = []
    init = nn.Module.init

    def counted(self, *a, **k):
        calls.append(type(self).__name__)
        return init(self, *a, **k)

    monkeypatch.setattr(nn.Module, "init", counted)
    return calls


def test_equal_modules_are_traced_once_and_different_ones_again(monkeypatch):
    models = [_lora_model(rank=3), _lora_model(rank=3), _lora_model(rank=5)]  # two equal, one not
    calls = _count_inits(monkeypatch)
    first = shapes.abstract_boxed_params(models[0])
    again = shapes.abstract_boxed_params(models[1])
    assert len(calls) == 1
    assert jnp.shape(nn.unbox(again)["layers"]["self_attn"]["q_proj"]["ftc_lora"]["a"])[-1] == 3
    other = shapes.abstract_boxed_params(models[2])
    assert len(calls) == 2
    assert nn.unbox(other)["layers"]["self_attn"]["q_proj"]["ftc_lora"]["a"].shape[-1] == 5
    assert nn.unbox(first)["layers"]["self_attn"]["q_proj"]["ftc_lora"]["a"].shape[-1] == 3


def test_a_caller_changing_its_tree_does_not_change_the_next_callers(monkeypatch):
    model = _lora_model(rank=2)
    tree = shapes.abstract_boxed_params(model)
    tree.clear()
    tree2 = shapes.abstract_boxed_params(model)
    assert "layers" in tree2
    tree2["layers"].pop("self_attn")
    assert "self_attn" in shapes.abstract_boxed_params(model)["layers"]
