"""BERT (model_type "bert"): a post-LN bidirectional encoder with an optional pooler.

Matches transformers' BertModel in float32 (last hidden states and pooler output).
Shape suffixes as in layers.py (B batch, T length, D embed, N heads, H head dim, F mlp hidden,
V vocab, P positions, Y token types).

Outputs: "hidden" is the last encoder layer [B, T, D] (BERT's last op is a LayerNorm, so these
are already normed); "pooled" is tanh(dense(hidden[:, 0])), BERT's pooler on the first token
[B, D] (with packed rows that is the first segment's CLS only: read other segments' CLS from
"hidden"). BERT has no language-model head here, so "logits" is refused.

A checkpoint saved from a head that drops the pooler (BertForMaskedLM, BertForTokenClassification,
...) has no pooler weights: the architecture records that and "pooled" is then refused.
Tensor names carry the prefix of the source architecture ("bert." under a head, none for a bare
BertModel), read from config.json "architectures"; the MLM/classifier heads themselves are not
read. Export keeps the imported names and writes "BertModel", which transformers loads either way.
Dropout is not applied.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from ftc.backends.jax.models.family import Family, HfTensor, heads_bias, heads_in, heads_out, linear_t
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

# transformers builds these with BertModel(config, add_pooling_layer=False): no pooler weights.
_NO_POOLER_ARCHITECTURES = frozenset(
    {"BertForMaskedLM", "BertLMHeadModel", "BertForTokenClassification", "BertForQuestionAnswering"}
)

# Architectures whose BertModel sits under "bert."; a bare BertModel has no prefix.
_BARE_ARCHITECTURE = "BertModel"


@dataclasses.dataclass(frozen=True)
class BertArch:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    pad_token_id: int | None = 0
    pooler: bool = True
    # Where the encoder's tensors live in the HF state dict: "" for BertModel, "bert." for heads.
    hf_prefix: str = ""
    # Training-time choice, not part of the checkpoint: none | full | dots (layers.REMAT_POLICIES).
    remat: str = "none"

    def __post_init__(self):
        check_remat(self.remat)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


def config_from_hf(cfg: dict) -> BertArch:
    """BertArch from a config.json dict, refusing settings this implementation does not compute."""
    if cfg.get("is_decoder") or cfg.get("add_cross_attention"):
        raise ValueError("config.json is_decoder/add_cross_attention=true: only the BERT encoder is supported")
    position_type = cfg.get("position_embedding_type", "absolute")
    if position_type != "absolute":
        raise ValueError(
            f"config.json position_embedding_type={position_type!r} is not supported; ftc reads 'absolute'"
        )
    activation = cfg.get("hidden_act", "gelu")
    check_activation(activation, "hidden_act")
    hidden, heads = int(cfg.get("hidden_size", 768)), int(cfg.get("num_attention_heads", 12))
    if hidden % heads:
        raise ValueError(f"config.json hidden_size={hidden} is not a multiple of num_attention_heads={heads}")
    architectures = cfg.get("architectures") or [_BARE_ARCHITECTURE]
    architecture = architectures[0]
    return BertArch(
        vocab_size=int(cfg.get("vocab_size", 30522)),
        hidden_size=hidden,
        num_hidden_layers=int(cfg.get("num_hidden_layers", 12)),
        num_attention_heads=heads,
        intermediate_size=int(cfg.get("intermediate_size", 3072)),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 512)),
        type_vocab_size=int(cfg.get("type_vocab_size", 2)),
        hidden_act=activation,
        layer_norm_eps=float(cfg.get("layer_norm_eps", 1e-12)),
        pad_token_id=cfg.get("pad_token_id", 0),
        pooler=architecture not in _NO_POOLER_ARCHITECTURES,
        hf_prefix="" if architecture == _BARE_ARCHITECTURE else "bert.",
    )


def hf_config(arch: BertArch) -> dict:
    """The architecture keys of config.json (export merges them over the imported config)."""
    return {
        "model_type": "bert",
        "vocab_size": arch.vocab_size,
        "hidden_size": arch.hidden_size,
        "num_hidden_layers": arch.num_hidden_layers,
        "num_attention_heads": arch.num_attention_heads,
        "intermediate_size": arch.intermediate_size,
        "max_position_embeddings": arch.max_position_embeddings,
        "type_vocab_size": arch.type_vocab_size,
        "hidden_act": arch.hidden_act,
        "layer_norm_eps": arch.layer_norm_eps,
        "pad_token_id": arch.pad_token_id,
    }


# ---------------------------------------------------------------- model


class BertSelfAttention(nn.Module):
    arch: BertArch
    dtype: Dtype

    @nn.compact
    def __call__(self, x_BTD, mask_B1TS):
        N, H = self.arch.num_attention_heads, self.arch.head_dim

        def project(name):
            return Dense((N, H), ("embed",), ("heads", "head_dim"), use_bias=True, dtype=self.dtype, name=name)(x_BTD)

        return dot_product_attention(project("query"), project("key"), project("value"), mask_B1TS, scale=H**-0.5)


class BertOutput(nn.Module):
    """dense -> residual add -> LayerNorm (BertSelfOutput and BertOutput share this shape)."""

    arch: BertArch
    dtype: Dtype
    in_axes: tuple

    @nn.compact
    def __call__(self, h, residual_BTD):
        D = self.arch.hidden_size
        y_BTD = Dense((D,), self.in_axes, ("embed",), use_bias=True, dtype=self.dtype, name="dense")(h)
        return LayerNorm(eps=self.arch.layer_norm_eps, dtype=self.dtype, name="LayerNorm")(y_BTD + residual_BTD)


class BertAttention(nn.Module):
    arch: BertArch
    dtype: Dtype

    @nn.compact
    def __call__(self, x_BTD, mask_B1TS):
        o_BTNH = BertSelfAttention(self.arch, self.dtype, name="self")(x_BTD, mask_B1TS)
        return BertOutput(self.arch, self.dtype, ("heads", "head_dim"), name="output")(o_BTNH, x_BTD)


class BertIntermediate(nn.Module):
    arch: BertArch
    dtype: Dtype

    @nn.compact
    def __call__(self, x_BTD):
        F = self.arch.intermediate_size
        h_BTF = Dense((F,), ("embed",), ("mlp",), use_bias=True, dtype=self.dtype, name="dense")(x_BTD)
        return activation(self.arch.hidden_act, h_BTF)


class BertLayer(nn.Module):
    """Post-LN layer; called by nn.scan as (carry, broadcast mask) -> (carry, None)."""

    arch: BertArch
    dtype: Dtype

    @nn.compact
    def __call__(self, x_BTD, mask_B1TS):
        x_BTD = BertAttention(self.arch, self.dtype, name="attention")(x_BTD, mask_B1TS)
        h_BTF = BertIntermediate(self.arch, self.dtype, name="intermediate")(x_BTD)
        return BertOutput(self.arch, self.dtype, ("mlp",), name="output")(h_BTF, x_BTD), None


class BertEmbeddings(nn.Module):
    arch: BertArch
    dtype: Dtype

    @nn.compact
    def __call__(self, input_ids_BT, positions_BT, token_type_ids_BT):
        a = self.arch
        init = nn.initializers.normal(stddev=0.02)
        word_VD = param_with_axes(
            self, "word_embeddings", init, (a.vocab_size, a.hidden_size), ("vocab", "embed"), jnp.float32
        )
        position_PD = param_with_axes(
            self,
            "position_embeddings",
            init,
            (a.max_position_embeddings, a.hidden_size),
            ("position", "embed"),
            jnp.float32,
        )
        type_YD = param_with_axes(
            self, "token_type_embeddings", init, (a.type_vocab_size, a.hidden_size), (None, "embed"), jnp.float32
        )
        # Summed in transformers' order (word + type, then + position): float addition is not associative.
        x_BTD = jnp.take(word_VD, input_ids_BT, axis=0) + jnp.take(type_YD, token_type_ids_BT, axis=0)
        x_BTD = x_BTD + jnp.take(position_PD, positions_BT, axis=0)
        return LayerNorm(eps=a.layer_norm_eps, dtype=self.dtype, name="LayerNorm")(x_BTD)


class Bert(nn.Module):
    arch: BertArch
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        input_ids,
        attention_mask=None,
        segment_ids=None,
        positions=None,
        token_type_ids=None,
        output: str = "hidden",
    ):
        if output not in ("hidden", "pooled"):
            raise ValueError(
                f"BERT output={output!r}: expected 'hidden' (last hidden states [B, T, D]) or 'pooled' "
                f"(pooler on the first token [B, D]); BERT has no language-model head, so no 'logits'"
            )
        a = self.arch
        if output == "pooled" and not a.pooler:
            raise ValueError("BERT output='pooled': this checkpoint has no pooler weights (pooler.dense.*)")
        T = input_ids.shape[1]
        if positions is None:
            positions = default_positions(input_ids, segment_ids)
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        x_BTD = BertEmbeddings(a, self.dtype, name="embeddings")(input_ids, positions, token_type_ids)
        mask_B1TS = make_attention_mask(
            attention_mask=attention_mask, segment_ids=segment_ids, causal=False, q_len=T, kv_len=T
        )
        layers = nn.scan(
            remat_block(BertLayer, a.remat),
            variable_axes={"params": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=(nn.broadcast,),
            length=a.num_hidden_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        x_BTD, _ = layers(a, self.dtype, name="layers")(x_BTD, mask_B1TS)
        # The pooler is created even for output="hidden" so its weights are always in the tree.
        pooled_BD = None
        if a.pooler:
            dense = Dense((a.hidden_size,), ("embed",), (None,), use_bias=True, dtype=self.dtype, name="pooler")
            pooled_BD = jnp.tanh(dense(x_BTD[:, 0]))
        return x_BTD if output == "hidden" else pooled_BD


def build(arch: BertArch, dtype=jnp.float32) -> Bert:
    return Bert(arch, dtype)


# ---------------------------------------------------------------- HF tensor map


def hf_tensors(arch: BertArch) -> dict[str, HfTensor]:
    N, H, L = arch.num_attention_heads, arch.head_dim, arch.num_hidden_layers
    p = arch.hf_prefix

    def per_layer(suffix: str, **fns) -> HfTensor:
        return HfTensor(tuple(f"{p}encoder.layer.{i}.{suffix}" for i in range(L)), **fns)

    # torch Linear (out, in) <-> kernel (in, *out) with the heads split out of the feature axis.
    to_heads, from_heads, head_bias = heads_in(N, H), heads_out(N, H), heads_bias(N, H)

    tensors = {
        "embeddings/word_embeddings": HfTensor((f"{p}embeddings.word_embeddings.weight",)),
        "embeddings/position_embeddings": HfTensor((f"{p}embeddings.position_embeddings.weight",)),
        "embeddings/token_type_embeddings": HfTensor((f"{p}embeddings.token_type_embeddings.weight",)),
        "embeddings/LayerNorm/weight": HfTensor((f"{p}embeddings.LayerNorm.weight",)),
        "embeddings/LayerNorm/bias": HfTensor((f"{p}embeddings.LayerNorm.bias",)),
        "layers/attention/output/dense/kernel": per_layer("attention.output.dense.weight", **from_heads),
        "layers/attention/output/dense/bias": per_layer("attention.output.dense.bias"),
        "layers/attention/output/LayerNorm/weight": per_layer("attention.output.LayerNorm.weight"),
        "layers/attention/output/LayerNorm/bias": per_layer("attention.output.LayerNorm.bias"),
        "layers/intermediate/dense/kernel": per_layer("intermediate.dense.weight", **linear_t()),
        "layers/intermediate/dense/bias": per_layer("intermediate.dense.bias"),
        "layers/output/dense/kernel": per_layer("output.dense.weight", **linear_t()),
        "layers/output/dense/bias": per_layer("output.dense.bias"),
        "layers/output/LayerNorm/weight": per_layer("output.LayerNorm.weight"),
        "layers/output/LayerNorm/bias": per_layer("output.LayerNorm.bias"),
    }
    for name in ("query", "key", "value"):
        tensors[f"layers/attention/self/{name}/kernel"] = per_layer(f"attention.self.{name}.weight", **to_heads)
        tensors[f"layers/attention/self/{name}/bias"] = per_layer(f"attention.self.{name}.bias", **head_bias)
    if arch.pooler:
        tensors["pooler/kernel"] = HfTensor((f"{p}pooler.dense.weight",), **linear_t())
        tensors["pooler/bias"] = HfTensor((f"{p}pooler.dense.bias",))
    return tensors


FAMILY = Family(
    name="bert",
    model_types=("bert",),
    config_from_hf=config_from_hf,
    build=build,
    hf_tensors=hf_tensors,
    hf_config=hf_config,
    hf_architecture="BertModel",
)
