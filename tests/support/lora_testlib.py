"""Helpers shared by test_lora.py and test_qlora.py: tiny saved HF models, configs, logits, training steps."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
import transformers
from hf_decoders import make_hf_model
from method_testlib import config as method_config

from ftc.backends.jax.io import hf_checkpoint
from ftc.backends.jax.methods import lora, qlora
from ftc.backends.jax.train.optimizer import merge_params, split_params, trainable_mask

CLASSES = {
    "llama": transformers.LlamaForCausalLM,
    "qwen2": transformers.Qwen2ForCausalLM,
    "gpt2": transformers.GPT2LMHeadModel,
}


def make_model(case: str, path):
    """Save a tiny random HF model (every weight perturbed) to `path`; returns its LoadedModel."""
    if case == "gpt2":
        torch.manual_seed(0)
        config = transformers.GPT2Config(
            vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0
        )
        model = transformers.GPT2LMHeadModel(config).eval()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    else:
        model = make_hf_model(case)
    model.save_pretrained(path)
    return hf_checkpoint.load_model(path)


def lora_config(**keys) -> lora.LoraConfig:
    """[method] kind = "lora" with `keys`, the rest the schema's defaults."""
    return method_config(lora.LoraConfig, "lora", **keys)


def qlora_config(**keys) -> qlora.QLoraConfig:
    return method_config(qlora.QLoraConfig, "qlora", **keys)


def torch_logits(model, ids, mask=None) -> np.ndarray:
    with torch.no_grad():
        kw = {} if mask is None else {"attention_mask": torch.tensor(mask)}
        return model(torch.tensor(ids, dtype=torch.long), **kw).logits.float().numpy()


def batch(seed=0, B=2, T=12):
    rs = np.random.RandomState(seed)
    ids = rs.randint(3, 256, (B, T)).astype(np.int32)
    mask = np.ones((B, T), np.int32)
    mask[1, T - 4 :] = 0  # one right-padded row
    return ids, mask


def randomize_factors(params, seed: int, std: float = 0.1):
    """Non-zero random A and B everywhere (a fresh B is zero, which would hide layout errors)."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    keys = jax.random.split(jax.random.key(seed), len(flat))
    out = []
    for key, (path, x) in zip(keys, flat):
        names = [str(getattr(k, "key", k)) for k in path]
        out.append(jax.random.normal(key, x.shape, jnp.float32) * std if lora.CHILD in names else x)
    return jax.tree_util.tree_unflatten(treedef, out)


def train(method: lora.Initialized, params, ids, mask, steps=4, lr=3e-2):
    """A few AdamW steps (weight decay would move any leaked base weight) the way the training
    core takes them: gradients of the trainable subtree only, frozen leaves passed through."""
    mask_tree = trainable_mask(params, lora.is_trainable)
    trainable, frozen = split_params(params, mask_tree)
    tx = optax.adamw(lr, weight_decay=0.1)
    opt_state = tx.init(trainable)

    def loss_fn(tr):
        logits = method.apply(merge_params(tr, frozen, mask_tree), ids, attention_mask=mask)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1].astype(jnp.float32), ids[:, 1:])
        return jnp.sum(losses * mask[:, 1:]) / jnp.sum(mask[:, 1:])

    @jax.jit
    def step(trainable, opt_state):
        loss, grads = jax.value_and_grad(loss_fn)(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    losses = []
    for _ in range(steps):
        trainable, opt_state, loss = step(trainable, opt_state)
        losses.append(float(loss))
    return merge_params(trainable, frozen, mask_tree), losses


def flat(tree) -> dict[str, np.ndarray]:
    return {
        "/".join(str(getattr(k, "key", k)) for k in path): np.asarray(x)
        for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]
    }
