"""A tiny causal LM for the training-program tests, built from layers.py and keeping the family
contract (logical axis names on every parameter, layers scanned on a "layers" axis, the
`apply(..., segment_ids=, positions=, output=)` call). The real families replace it where a test
needs Hugging Face parity; these tests need a small model with every kind of sharded axis."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ftc.backends.jax import layers


class Block(nn.Module):
    heads: int
    head_dim: int
    mlp: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_BTD, carry_args):
        segment_ids_BT, positions_BT = carry_args
        D = x_BTD.shape[-1]
        h_BTD = layers.RMSNorm(dtype=self.dtype, name="attn_norm")(x_BTD)
        dense = lambda shape, i, o, name: layers.Dense(shape, i, o, dtype=self.dtype, name=name)
        q = dense((self.heads, self.head_dim), ("embed",), ("heads", "head_dim"), "q")(h_BTD)
        k = dense((self.heads, self.head_dim), ("embed",), ("kv_heads", "head_dim"), "k")(h_BTD)
        v = dense((self.heads, self.head_dim), ("embed",), ("kv_heads", "head_dim"), "v")(h_BTD)
        cos, sin = layers.rope_cos_sin(positions_BT, layers.Rope().inv_freq(self.head_dim), self.dtype)
        q, k = layers.apply_rope(q, cos, sin), layers.apply_rope(k, cos, sin)
        T = x_BTD.shape[1]
        mask = layers.make_attention_mask(segment_ids=segment_ids_BT, causal=True, q_len=T, kv_len=T)
        a_BTNH = layers.dot_product_attention(q, k, v, mask)
        x_BTD = x_BTD + dense((D,), ("heads", "head_dim"), ("embed",), "o")(a_BTNH)
        h_BTD = layers.RMSNorm(dtype=self.dtype, name="mlp_norm")(x_BTD)
        up_BTF = nn.gelu(dense((self.mlp,), ("embed",), ("mlp",), "up")(h_BTD))
        return x_BTD + dense((D,), ("mlp",), ("embed",), "down")(up_BTF), None


class TinyLM(nn.Module):
    vocab: int = 64
    embed: int = 32
    heads: int = 4
    mlp: int = 64
    num_layers: int = 2
    dtype: Any = jnp.float32
    remat: str = "none"

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, segment_ids=None, positions=None,
                 token_type_ids=None, output="logits"):
        if segment_ids is None:
            segment_ids = jnp.ones_like(input_ids) if attention_mask is None else attention_mask
        if positions is None:
            positions = layers.default_positions(input_ids, segment_ids)
        table_VD = layers.param_with_axes(self, "embedding", layers.default_kernel_init,
                                          (self.vocab, self.embed), ("vocab", "embed"), jnp.float32)
        x_BTD = table_VD.astype(self.dtype)[input_ids]
        block = Block
        if self.remat != "none":
            policy = jax.checkpoint_policies.dots_saveable if self.remat == "dots" else None
            block = nn.remat(Block, policy=policy, prevent_cse=False)
        stack = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                        in_axes=nn.broadcast, length=self.num_layers,
                        metadata_params={nn.PARTITION_NAME: "layers"})
        x_BTD, _ = stack(self.heads, self.embed // self.heads, self.mlp, self.dtype, name="layers")(
            x_BTD, (segment_ids, positions))
        x_BTD = layers.RMSNorm(dtype=self.dtype, name="final_norm")(x_BTD)
        if output == "hidden":
            return x_BTD
        return layers.Dense((self.vocab,), ("embed",), ("vocab",), dtype=self.dtype, name="lm_head")(x_BTD)


def init_params(model: TinyLM, seed: int = 0):
    """Concrete float32 parameters (unboxed) and the boxed abstract tree (for the axes)."""
    ids = jnp.zeros((1, 8), jnp.int32)
    boxed = model.init(jax.random.key(seed), ids)["params"]
    return nn.unbox(boxed), boxed


def random_batch(rng: np.random.Generator, batch: int, seq: int, vocab: int, *, pad_frac: float = 0.25) -> dict:
    """A packed causal-LM batch in the data pipeline's layout: two segments per row, padding at
    the end of some rows, weights 0 on padding and on some prompt tokens."""
    ids = rng.integers(1, vocab, size=(batch, seq + 1)).astype(np.int32)
    segment_ids = np.ones((batch, seq), np.int32)
    split = seq // 2
    segment_ids[:, split:] = 2
    positions = np.concatenate([np.arange(split), np.arange(seq - split)])[None].repeat(batch, 0).astype(np.int32)
    weights = np.ones((batch, seq), np.float32)
    weights[:, :3] = 0.0  # a "prompt"
    for b in range(batch):
        n_pad = int(rng.integers(0, int(seq * pad_frac) + 1))
        if n_pad:
            segment_ids[b, seq - n_pad:] = 0
            weights[b, seq - n_pad:] = 0.0
            positions[b, seq - n_pad:] = 0
    return {"input_ids": ids[:, :-1], "targets": ids[:, 1:], "weights": weights,
            "segment_ids": segment_ids, "positions": positions}
