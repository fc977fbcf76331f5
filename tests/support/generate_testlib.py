"""Tiny HF decoders of every family ftc generates with, loaded in ftc, and transformers' greedy
`generate` on the same left-padded prompts: the reference the sampler tests compare with."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import torch
import transformers
from hf_decoders import CASES, make_hf_model

from ftc.backends.jax.generate.sampler import make_sampler
from ftc.backends.jax.io import hf_checkpoint

GPT2_CASES = {
    "gpt2": dict(),
    "gpt2-untied-scaled": dict(tie_word_embeddings=False, scale_attn_by_inverse_layer_idx=True, n_inner=48),
}
ALL_CASES = CASES + tuple(GPT2_CASES)


def make_model(case: str, **config_keys):
    """A tiny perturbed HF causal LM (vocab 256) of `case`; `config_keys` override its config's."""
    if case not in GPT2_CASES:
        return make_hf_model(case, **config_keys)
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=256, n_positions=128, n_embd=32, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=2
    )
    if "max_position_embeddings" in config_keys:  # GPT-2's name for it
        config_keys["n_positions"] = config_keys.pop("max_position_embeddings")
    for key, value in {**GPT2_CASES[case], **config_keys}.items():
        setattr(config, key, value)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def saved(case: str, path):
    """(HF model, ftc LoadedModel) of `case`, saved to `path`."""
    model = make_model(case)
    model.save_pretrained(path)
    return model, hf_checkpoint.load_model(path)


def sampler_for(loaded, dtype=jnp.float32, mesh=None):
    module = loaded.family.build(loaded.arch, dtype)
    context = loaded.hf_config.get("max_position_embeddings") or loaded.hf_config.get("n_positions")
    return make_sampler(loaded.family, loaded.arch, module, context=context, mesh=mesh)


def prompts(lengths=(5, 11, 1, 17), seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(3, 256, n)] for n in lengths]


def hf_greedy(model, prompts, max_new_tokens: int, eos_token_id=None, pad_id: int = 0) -> list[list[int]]:
    """transformers' generate(do_sample=False) on the prompts left-padded into one batch; each
    row's new tokens up to and including its first EOS."""
    P = max(map(len, prompts))
    ids = np.full((len(prompts), P), pad_id, np.int64)
    mask = np.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, P - len(p) :] = p
        mask[i, P - len(p) :] = 1
    model.generation_config.eos_token_id = eos_token_id  # None: no EOS, every row runs to the end
    model.generation_config.pad_token_id = pad_id
    with torch.no_grad():
        out = model.generate(
            torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False, max_new_tokens=max_new_tokens
        )
    rows = []
    eos = set([] if eos_token_id is None else np.atleast_1d(eos_token_id).tolist())
    for row in out[:, P:].numpy().tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        rows.append(row[:cut])
    return rows
