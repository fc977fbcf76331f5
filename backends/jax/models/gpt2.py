"""GPT-2 (model_type "gpt2"): learned positions, pre-LN blocks, fused qkv, tied LM head.

Matches transformers' GPT2LMHeadModel in float32. Shape suffixes as in layers.py
(B batch, T length, D embed, N heads, H head dim, F mlp hidden, V vocab, P positions, L layers).

HF stores GPT-2's projections as Conv1D, whose weight is already (in, out): the flax kernels
are the same numbers reshaped, never transposed. c_attn stays fused, laid out [D, 3, N, H]
(q, k, v along axis 1, exactly HF's split), so one HF tensor maps to one flax parameter and
import -> export is a pure reshape, hence bitwise.

Tensor names carry the prefix the source architecture uses ("transformer." under a head such as
GPT2LMHeadModel, none for a bare GPT2Model), read from config.json "architectures"; export keeps
the names it imported and writes GPT2LMHeadModel, which transformers loads either way.

Outputs: "logits" [B, T, V] and "hidden" (after ln_f) [B, T, D]. Dropout is not applied.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from ftc.backends.jax.models import kv_cache as kv_cache_lib
from ftc.backends.jax.models.family import Family, HfTensor, linear_t
from ftc.backends.jax.models.layers import (
    Dense,
    LayerNorm,
    activation,
    check_activation,
    check_remat,
    default_positions,
    dot_product_attention,
    make_attention_mask,
    param_with_axes,
    remat_block,
)

Dtype = Any


@dataclasses.dataclass(frozen=True)
class GPT2Arch:
    vocab_size: int
    n_positions: int
    n_embd: int
    n_layer: int
    n_head: int
    n_inner: int
    activation_function: str = "gelu_new"
    layer_norm_epsilon: float = 1e-5
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    reorder_and_upcast_attn: bool = False
    tie_word_embeddings: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    # Where the model's tensors live in the HF state dict: "transformer." under a head
    # (GPT2LMHeadModel, GPT2ForSequenceClassification, ...), "" for a bare GPT2Model.
    hf_prefix: str = "transformer."
    # Training-time choice, not part of the checkpoint: none | full | dots (layers.REMAT_POLICIES).
    remat: str = "none"

    def __post_init__(self):
        check_remat(self.remat)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


def config_from_hf(cfg: dict) -> GPT2Arch:
    """GPT2Arch from a config.json dict, refusing settings this implementation does not compute."""
    if cfg.get("add_cross_attention"):
        raise ValueError("config.json add_cross_attention=true: GPT-2 cross-attention is not supported")
    activation = cfg.get("activation_function", "gelu_new")
    check_activation(activation, "activation_function")
    n_embd, n_head = int(cfg.get("n_embd", 768)), int(cfg.get("n_head", 12))
    if n_embd % n_head:
        raise ValueError(f"config.json n_embd={n_embd} is not a multiple of n_head={n_head}")
    eos = cfg.get("eos_token_id", 50256)
    if isinstance(eos, list):  # several end ids (a fine-tuned chat model's): kept, as a hashable tuple
        eos = tuple(eos) if len(eos) > 1 else (eos[0] if eos else None)
    architectures = cfg.get("architectures") or ["GPT2LMHeadModel"]
    return GPT2Arch(
        vocab_size=int(cfg.get("vocab_size", 50257)),
        n_positions=int(cfg.get("n_positions", 1024)),
        n_embd=n_embd,
        n_layer=int(cfg.get("n_layer", 12)),
        n_head=n_head,
        n_inner=int(cfg.get("n_inner") or 4 * n_embd),
        activation_function=activation,
        layer_norm_epsilon=float(cfg.get("layer_norm_epsilon", 1e-5)),
        scale_attn_weights=bool(cfg.get("scale_attn_weights", True)),
        scale_attn_by_inverse_layer_idx=bool(cfg.get("scale_attn_by_inverse_layer_idx", False)),
        # Upcasting changes nothing here: attention logits and softmax are float32 already.
        reorder_and_upcast_attn=bool(cfg.get("reorder_and_upcast_attn", False)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        bos_token_id=cfg.get("bos_token_id", 50256),
        eos_token_id=eos,
        pad_token_id=cfg.get("pad_token_id"),
        hf_prefix="" if architectures[0] == "GPT2Model" else "transformer.",
    )


def hf_config(arch: GPT2Arch) -> dict:
    """The architecture keys of config.json (export merges them over the imported config)."""
    return {
        "model_type": "gpt2",
        "vocab_size": arch.vocab_size,
        "n_positions": arch.n_positions,
        "n_embd": arch.n_embd,
        "n_layer": arch.n_layer,
        "n_head": arch.n_head,
        "n_inner": arch.n_inner,
        "activation_function": arch.activation_function,
        "layer_norm_epsilon": arch.layer_norm_epsilon,
        "scale_attn_weights": arch.scale_attn_weights,
        "scale_attn_by_inverse_layer_idx": arch.scale_attn_by_inverse_layer_idx,
        "reorder_and_upcast_attn": arch.reorder_and_upcast_attn,
        "tie_word_embeddings": arch.tie_word_embeddings,
        "bos_token_id": arch.bos_token_id,
        "eos_token_id": list(arch.eos_token_id) if isinstance(arch.eos_token_id, tuple) else arch.eos_token_id,
        "pad_token_id": arch.pad_token_id,
    }


# ---------------------------------------------------------------- model


class GPT2Attention(nn.Module):
    arch: GPT2Arch
    dtype: Dtype

    @nn.compact
    def __call__(self, x_BTD, mask_B1TS, layer_index, layer_kv=None, cache_index=None):
        """[B, T, D]; with `layer_kv` (decoding, kv_cache.py) also returns the layer's new cache."""
        a = self.arch
        N, H = a.n_head, a.head_dim
        qkv_BT3NH = Dense(
            (3, N, H), ("embed",), (None, "heads", "head_dim"), use_bias=True, dtype=self.dtype, name="c_attn"
        )(x_BTD)
        q_BTNH, k_BTNH, v_BTNH = qkv_BT3NH[:, :, 0], qkv_BT3NH[:, :, 1], qkv_BT3NH[:, :, 2]
        scale = H**-0.5 if a.scale_attn_weights else 1.0
        if a.scale_attn_by_inverse_layer_idx:
            # The per-layer factor is traced (the layer index is a scan input), so it goes on q.
            q_BTNH = q_BTNH / (layer_index + 1).astype(q_BTNH.dtype)
        c_proj = Dense((a.n_embd,), ("heads", "head_dim"), ("embed",), use_bias=True, dtype=self.dtype, name="c_proj")
        if layer_kv is not None:  # decoding: attend over the key/value cache (kv_cache.py)
            o_BTNH, layer_kv = kv_cache_lib.attend(
                q_BTNH, k_BTNH, v_BTNH, layer_kv, cache_index, mask_B1TS, scale=scale
            )
            return c_proj(o_BTNH), layer_kv
        o_BTNH = dot_product_attention(q_BTNH, k_BTNH, v_BTNH, mask_B1TS, scale=scale)
        return c_proj(o_BTNH)


class GPT2MLP(nn.Module):
    arch: GPT2Arch
    dtype: Dtype

    @nn.compact
    def __call__(self, x_BTD):
        a = self.arch
        h_BTF = Dense((a.n_inner,), ("embed",), ("mlp",), use_bias=True, dtype=self.dtype, name="c_fc")(x_BTD)
        h_BTF = activation(a.activation_function, h_BTF)
        return Dense((a.n_embd,), ("mlp",), ("embed",), use_bias=True, dtype=self.dtype, name="c_proj")(h_BTF)


class GPT2Block(nn.Module):
    """Pre-LN block; called by nn.scan as (carry, per-layer input) -> (carry, None)."""

    arch: GPT2Arch
    dtype: Dtype

    @nn.compact
    def __call__(self, x_BTD, layer_index, mask_B1TS, layer_kv=None, cache_index=None):
        eps = self.arch.layer_norm_epsilon
        h_BTD = LayerNorm(eps=eps, dtype=self.dtype, name="ln_1")(x_BTD)
        h_BTD = GPT2Attention(self.arch, self.dtype, name="attn")(h_BTD, mask_B1TS, layer_index, layer_kv, cache_index)
        if layer_kv is not None:
            h_BTD, layer_kv = h_BTD
        x_BTD = x_BTD + h_BTD
        h_BTD = LayerNorm(eps=eps, dtype=self.dtype, name="ln_2")(x_BTD)
        x_BTD = x_BTD + GPT2MLP(self.arch, self.dtype, name="mlp")(h_BTD)
        return x_BTD, layer_kv


class GPT2(nn.Module):
    arch: GPT2Arch
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        input_ids,
        attention_mask=None,
        segment_ids=None,
        positions=None,
        token_type_ids=None,
        output: str = "logits",
        kv_cache=None,
    ):
        """See family.py; with `kv_cache` (kv_cache.py) returns (output, the advanced cache)."""
        if output not in ("logits", "last_logits", "hidden", "logits_and_hidden"):
            raise ValueError(
                f"GPT-2 output={output!r}: expected 'logits', 'last_logits', 'hidden' or 'logits_and_hidden'"
            )
        a = self.arch
        T = input_ids.shape[1]
        init = nn.initializers.normal(stddev=0.02)
        wte_VD = param_with_axes(self, "wte", init, (a.vocab_size, a.n_embd), ("vocab", "embed"), jnp.float32)
        wpe_PD = param_with_axes(self, "wpe", init, (a.n_positions, a.n_embd), ("position", "embed"), jnp.float32)
        if positions is None:
            positions = default_positions(input_ids, segment_ids)
        x_BTD = jnp.take(wte_VD, input_ids, axis=0) + jnp.take(wpe_PD, positions, axis=0)
        if token_type_ids is not None:
            # GPT-2 has no token-type table: transformers embeds token types with wte.
            x_BTD = x_BTD + jnp.take(wte_VD, token_type_ids, axis=0)
        x_BTD = x_BTD.astype(self.dtype)

        if kv_cache is not None:
            mask_B1TS, _ = kv_cache_lib.masks(kv_cache, T, None)
        else:
            mask_B1TS = make_attention_mask(
                attention_mask=attention_mask, segment_ids=segment_ids, causal=True, q_len=T, kv_len=T
            )
        blocks = nn.scan(
            remat_block(GPT2Block, a.remat),
            variable_axes={"params": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=(0, nn.broadcast, 0, nn.broadcast),
            length=a.n_layer,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        layers_kv = None if kv_cache is None else kv_cache_lib.layer_slices(kv_cache)
        cache_index = None if kv_cache is None else kv_cache["index"]
        x_BTD, layers_kv = blocks(a, self.dtype, name="layers")(
            x_BTD, jnp.arange(a.n_layer), mask_B1TS, layers_kv, cache_index
        )
        if output == "last_logits":
            x_BTD = kv_cache_lib.last_position(x_BTD)
        x_BTD = LayerNorm(eps=a.layer_norm_epsilon, dtype=self.dtype, name="ln_f")(x_BTD)
        if output == "hidden":
            out = x_BTD
        elif a.tie_word_embeddings:
            out = jnp.einsum("btd,vd->btv", x_BTD, wte_VD.astype(self.dtype))
        else:
            out = Dense((a.vocab_size,), ("embed",), ("vocab",), dtype=self.dtype, name="lm_head")(x_BTD)
        if output == "logits_and_hidden":
            out = (out, x_BTD)
        return out if kv_cache is None else (out, kv_cache_lib.advanced(kv_cache, layers_kv, T))


def build(arch: GPT2Arch, dtype=jnp.float32) -> GPT2:
    return GPT2(arch, dtype)


# ---------------------------------------------------------------- HF tensor map


def hf_tensors(arch: GPT2Arch) -> dict[str, HfTensor]:
    D, N, H, L = arch.n_embd, arch.n_head, arch.head_dim, arch.n_layer
    p = arch.hf_prefix

    def per_layer(suffix: str, **fns) -> HfTensor:
        return HfTensor(tuple(f"{p}h.{i}.{suffix}" for i in range(L)), **fns)

    def reshape(flax_shape, hf_shape):
        return {
            "to_flax": lambda a: np.ascontiguousarray(a.reshape(flax_shape)),
            "to_hf": lambda a: np.ascontiguousarray(a.reshape(hf_shape)),
        }

    tensors = {
        "wte": HfTensor((f"{p}wte.weight",)),
        "wpe": HfTensor((f"{p}wpe.weight",)),
        "ln_f/weight": HfTensor((f"{p}ln_f.weight",)),
        "ln_f/bias": HfTensor((f"{p}ln_f.bias",)),
        "layers/ln_1/weight": per_layer("ln_1.weight"),
        "layers/ln_1/bias": per_layer("ln_1.bias"),
        "layers/ln_2/weight": per_layer("ln_2.weight"),
        "layers/ln_2/bias": per_layer("ln_2.bias"),
        # Conv1D weights are (in, out) already: reshape only.
        "layers/attn/c_attn/kernel": per_layer("attn.c_attn.weight", **reshape((D, 3, N, H), (D, 3 * D))),
        "layers/attn/c_attn/bias": per_layer("attn.c_attn.bias", **reshape((3, N, H), (3 * D,))),
        "layers/attn/c_proj/kernel": per_layer("attn.c_proj.weight", **reshape((N, H, D), (D, D))),
        "layers/attn/c_proj/bias": per_layer("attn.c_proj.bias"),
        "layers/mlp/c_fc/kernel": per_layer("mlp.c_fc.weight"),
        "layers/mlp/c_fc/bias": per_layer("mlp.c_fc.bias"),
        "layers/mlp/c_proj/kernel": per_layer("mlp.c_proj.weight"),
        "layers/mlp/c_proj/bias": per_layer("mlp.c_proj.bias"),
    }
    if not arch.tie_word_embeddings:
        tensors["lm_head/kernel"] = HfTensor(("lm_head.weight",), **linear_t())
    return tensors


FAMILY = Family(
    name="gpt2",
    model_types=("gpt2",),
    config_from_hf=config_from_hf,
    build=build,
    hf_tensors=hf_tensors,
    hf_config=hf_config,
    hf_architecture="GPT2LMHeadModel",
    cache_layout=lambda arch: kv_cache_lib.CacheLayout(arch.n_layer, arch.n_head, arch.head_dim),
)
