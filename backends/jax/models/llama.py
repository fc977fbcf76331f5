"""Llama-style decoders: llama (2, 3, 3.1, 3.2), mistral, qwen2, qwen3 — and gemma through gemma.py.

One implementation, switched by a frozen `DecoderArch` read from config.json:
  llama    GQA, optional attention/mlp bias, rope default|linear|llama3, tied or untied head
  mistral  sliding-window attention
  qwen2    q/k/v bias (o_proj none), sliding window on layers >= max_window_layers if enabled
  qwen3    RMSNorm on q and k per head (before RoPE), explicit head_dim
  gemma    sqrt(hidden) embedding scale, (1 + w) RMSNorm, GeGLU (gelu-tanh), tied head

Parameter tree (flax path -> shape, logical axes; L = layers):
  embed_tokens/embedding                  [V, D]        vocab, embed
  layers/input_layernorm/weight           [L, D]        layers, norm
  layers/self_attn/{q,k,v}_proj/kernel    [L, D, N|K, H] layers, embed, heads|kv_heads, head_dim
  layers/self_attn/{q,k,v}_proj/bias      [L, N|K, H]   (when the arch has q/k/v bias)
  layers/self_attn/{q,k}_norm/weight      [L, H]        (qwen3)
  layers/self_attn/o_proj/kernel          [L, N, H, D]  layers, heads, head_dim, embed
  layers/post_attention_layernorm/weight  [L, D]
  layers/mlp/{gate,up}_proj/kernel        [L, D, F]     layers, embed, mlp
  layers/mlp/down_proj/kernel             [L, F, D]     layers, mlp, embed
  norm/weight                             [D]
  lm_head/kernel                          [D, V]        embed, vocab   (untied only)
Module names follow the Hugging Face ones so methods (LoRA targets) can name them the same way.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from ftc.backends.jax.models import layers
from ftc.backends.jax.models.family import Family, HfTensor, heads_bias, heads_in, heads_out, linear_t

# Class defaults of the transformers config for each model_type, for configs that omit keys.
_HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=None, head_dim=None, hidden_act="silu",
                  max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False,
                  attention_bias=False, mlp_bias=False),
    "mistral": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, head_dim=None, hidden_act="silu",
                    max_position_embeddings=4096 * 32, rms_norm_eps=1e-6, tie_word_embeddings=False,
                    sliding_window=4096),
    "qwen2": dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=32, head_dim=None, hidden_act="silu",
                  max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=False,
                  use_sliding_window=False, sliding_window=4096, max_window_layers=28),
    "qwen3": dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=32, head_dim=128, hidden_act="silu",
                  max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=False,
                  attention_bias=False, use_sliding_window=False, sliding_window=4096, max_window_layers=28),
    "gemma": dict(vocab_size=256000, hidden_size=3072, intermediate_size=24576, num_hidden_layers=28,
                  num_attention_heads=16, num_key_value_heads=16, head_dim=256, hidden_act="gelu_pytorch_tanh",
                  max_position_embeddings=8192, rms_norm_eps=1e-6, tie_word_embeddings=True,
                  attention_bias=False, use_bidirectional_attention=None),
}

@dataclasses.dataclass(frozen=True)
class DecoderArch:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: layers.Rope
    max_position_embeddings: int
    tie_word_embeddings: bool
    hidden_act: str = "silu"
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    # One flag per layer: does this layer use the sliding window (qwen2/3 mix both kinds).
    sliding_layers: tuple[bool, ...] = ()
    causal: bool = True
    # Gemma: x * sqrt(hidden) after the embedding, norms as x * (1 + w).
    scale_embeddings: bool = False
    norm_unit_offset: bool = False
    # Training-time choice, not part of the checkpoint: none | full | dots.
    remat: str = "none"

    def __post_init__(self):
        layers.check_remat(self.remat)
        layers.check_activation(self.hidden_act, "hidden_act")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of num_key_value_heads ({self.num_kv_heads})"
            )


def _with_defaults(hf_config: dict) -> dict:
    model_type = hf_config.get("model_type")
    if model_type not in _HF_DEFAULTS:
        raise ValueError(f"llama.py reads model_type in {sorted(_HF_DEFAULTS)}, got {model_type!r}")
    # An explicit null is meaningful (mistral sliding_window: null = no window), so it overrides.
    return {**_HF_DEFAULTS[model_type], **hf_config}


def _sliding_layers(c: dict) -> tuple[int | None, tuple[bool, ...]]:
    n = c["num_hidden_layers"]
    model_type = c["model_type"]
    if model_type == "mistral":
        window = c.get("sliding_window")
        return window, (window is not None,) * n
    if model_type in ("qwen2", "qwen3"):
        window = c.get("sliding_window") if c.get("use_sliding_window") else None
        layer_types = c.get("layer_types") or [
            "sliding_attention" if window is not None and i >= c["max_window_layers"] else "full_attention"
            for i in range(n)
        ]
        flags = tuple(t == "sliding_attention" and window is not None for t in layer_types)
        return (window if any(flags) else None), flags
    return None, (False,) * n


def config_from_hf(hf_config: dict) -> DecoderArch:
    """config.json (dict) -> DecoderArch, filling what the file omits with transformers' defaults."""
    c = _with_defaults(hf_config)
    model_type = c["model_type"]
    num_heads = c["num_attention_heads"]
    head_dim = c.get("head_dim") or c["hidden_size"] // num_heads
    window, sliding = _sliding_layers(c)
    hidden_act = c.get("hidden_activation") or c["hidden_act"]
    if model_type == "gemma" and hidden_act == "gelu":
        hidden_act = "gelu_pytorch_tanh"  # transformers does the same: Gemma's "gelu" meant the tanh form
    attention_bias = bool(c.get("attention_bias", False))
    return DecoderArch(
        model_type=model_type,
        vocab_size=c["vocab_size"],
        hidden_size=c["hidden_size"],
        intermediate_size=c["intermediate_size"],
        num_layers=c["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=c.get("num_key_value_heads") or num_heads,
        head_dim=head_dim,
        rms_norm_eps=float(c["rms_norm_eps"]),
        rope=layers.Rope.from_hf(c),
        max_position_embeddings=c["max_position_embeddings"],
        tie_word_embeddings=bool(c["tie_word_embeddings"]),
        hidden_act=hidden_act,
        qkv_bias=True if model_type == "qwen2" else attention_bias,
        o_bias=False if model_type == "qwen2" else attention_bias,
        mlp_bias=bool(c.get("mlp_bias", False)),
        qk_norm=model_type == "qwen3",
        sliding_window=window,
        sliding_layers=sliding,
        causal=not c.get("use_bidirectional_attention"),
        scale_embeddings=model_type == "gemma",
        norm_unit_offset=model_type == "gemma",
    )


def hf_config(arch: DecoderArch) -> dict:
    """The architecture keys of config.json (export merges them over the imported config)."""
    rope = arch.rope.to_hf()
    out: dict[str, Any] = {
        "model_type": arch.model_type,
        "vocab_size": arch.vocab_size,
        "hidden_size": arch.hidden_size,
        "intermediate_size": arch.intermediate_size,
        "num_hidden_layers": arch.num_layers,
        "num_attention_heads": arch.num_heads,
        "num_key_value_heads": arch.num_kv_heads,
        "head_dim": arch.head_dim,
        "hidden_act": arch.hidden_act,
        "max_position_embeddings": arch.max_position_embeddings,
        "rms_norm_eps": arch.rms_norm_eps,
        "tie_word_embeddings": arch.tie_word_embeddings,
        # transformers 5 reads rope_parameters; older readers (transformers 4, vLLM) read
        # rope_theta + rope_scaling. transformers 5 prefers rope_scaling when both are present,
        # so both carry the same settings.
        "rope_parameters": rope,
        "rope_theta": arch.rope.theta,
        "rope_scaling": None if arch.rope.kind == "default" else dict(rope),
    }
    if arch.model_type in ("llama", "qwen3", "gemma"):
        out["attention_bias"] = arch.qkv_bias
    if arch.model_type == "llama":
        out["mlp_bias"] = arch.mlp_bias
    if arch.model_type == "mistral":
        out["sliding_window"] = arch.sliding_window
    if arch.model_type in ("qwen2", "qwen3"):
        out["use_sliding_window"] = arch.sliding_window is not None
        out["sliding_window"] = arch.sliding_window
        out["layer_types"] = ["sliding_attention" if s else "full_attention" for s in arch.sliding_layers]
    if arch.model_type == "gemma":
        out["use_bidirectional_attention"] = None if arch.causal else True
    return out


# ---------------------------------------------------------------- modules


class Attention(nn.Module):
    arch: DecoderArch
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_BTD, cos_BTH, sin_BTH, mask_B1TS):
        a = self.arch
        N, K, H = a.num_heads, a.num_kv_heads, a.head_dim

        def proj(heads, head_axis, name):
            return layers.Dense((heads, H), in_axes=("embed",), out_axes=(head_axis, "head_dim"),
                                use_bias=a.qkv_bias, dtype=self.dtype, name=name)

        q_BTNH = proj(N, "heads", "q_proj")(x_BTD)
        k_BTKH = proj(K, "kv_heads", "k_proj")(x_BTD)
        v_BTKH = proj(K, "kv_heads", "v_proj")(x_BTD)
        if a.qk_norm:
            q_BTNH = layers.RMSNorm(a.rms_norm_eps, dtype=self.dtype, name="q_norm")(q_BTNH)
            k_BTKH = layers.RMSNorm(a.rms_norm_eps, dtype=self.dtype, name="k_norm")(k_BTKH)
        q_BTNH = layers.apply_rope(q_BTNH, cos_BTH, sin_BTH)
        k_BTKH = layers.apply_rope(k_BTKH, cos_BTH, sin_BTH)
        out_BTNH = layers.dot_product_attention(q_BTNH, k_BTKH, v_BTKH, mask_B1TS, scale=H**-0.5)
        return layers.Dense((a.hidden_size,), in_axes=("heads", "head_dim"), out_axes=("embed",),
                            use_bias=a.o_bias, dtype=self.dtype, name="o_proj")(out_BTNH)


class GatedMlp(nn.Module):
    arch: DecoderArch
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_BTD):
        a = self.arch

        def dense(features, in_axis, out_axis, name):
            return layers.Dense((features,), in_axes=(in_axis,), out_axes=(out_axis,),
                                use_bias=a.mlp_bias, dtype=self.dtype, name=name)

        gate_BTF = dense(a.intermediate_size, "embed", "mlp", "gate_proj")(x_BTD)
        up_BTF = dense(a.intermediate_size, "embed", "mlp", "up_proj")(x_BTD)
        h_BTF = layers.ACTIVATIONS[a.hidden_act](gate_BTF) * up_BTF
        return dense(a.hidden_size, "mlp", "embed", "down_proj")(h_BTF)


class DecoderBlock(nn.Module):
    """Pre-norm block; called by nn.scan with one `is_sliding` flag per layer."""

    arch: DecoderArch
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_BTD, is_sliding, cos_BTH, sin_BTH, full_mask_B1TS, sliding_mask_B1TS):
        a = self.arch
        if not any(a.sliding_layers):
            mask_B1TS = full_mask_B1TS
        elif all(a.sliding_layers):
            mask_B1TS = sliding_mask_B1TS
        else:
            mask_B1TS = jnp.where(is_sliding, sliding_mask_B1TS, full_mask_B1TS)

        def norm(name):
            return layers.RMSNorm(a.rms_norm_eps, unit_offset=a.norm_unit_offset, dtype=self.dtype, name=name)

        h_BTD = Attention(a, self.dtype, name="self_attn")(norm("input_layernorm")(x_BTD), cos_BTH, sin_BTH, mask_B1TS)
        x_BTD = x_BTD + h_BTD
        x_BTD = x_BTD + GatedMlp(a, self.dtype, name="mlp")(norm("post_attention_layernorm")(x_BTD))
        return x_BTD, None


class Decoder(nn.Module):
    arch: DecoderArch
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, segment_ids=None, positions=None,
                 token_type_ids=None, output="logits"):
        a = self.arch
        T = input_ids.shape[1]
        embedding_VD = Embedding(a.vocab_size, a.hidden_size, name="embed_tokens")()
        x_BTD = jnp.take(embedding_VD, input_ids, axis=0).astype(self.dtype)
        if a.scale_embeddings:
            # HF multiplies by sqrt(hidden) rounded to the compute dtype.
            x_BTD = x_BTD * jnp.asarray(a.hidden_size**0.5, dtype=self.dtype)

        if positions is None:
            positions = layers.default_positions(input_ids, segment_ids)
        cos_BTH, sin_BTH = layers.rope_cos_sin(positions, a.rope.inv_freq(a.head_dim), self.dtype)
        mask_args = dict(attention_mask=attention_mask, segment_ids=segment_ids, causal=a.causal, q_len=T, kv_len=T)
        full_mask_B1TS = layers.make_attention_mask(**mask_args)
        sliding_mask_B1TS = (
            layers.make_attention_mask(**mask_args, sliding_window=a.sliding_window)
            if a.sliding_window is not None else full_mask_B1TS
        )

        Stack = nn.scan(
            layers.remat_block(DecoderBlock, a.remat),
            variable_axes={"params": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
            length=a.num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        is_sliding_L = jnp.asarray(a.sliding_layers, dtype=bool)
        x_BTD, _ = Stack(a, self.dtype, name="layers")(
            x_BTD, is_sliding_L, cos_BTH, sin_BTH, full_mask_B1TS, sliding_mask_B1TS
        )
        x_BTD = layers.RMSNorm(a.rms_norm_eps, unit_offset=a.norm_unit_offset, dtype=self.dtype, name="norm")(x_BTD)
        if output == "hidden":
            return x_BTD
        if output != "logits":
            raise ValueError(f"output={output!r}; expected 'logits' or 'hidden'")
        if a.tie_word_embeddings:
            return jnp.einsum("BTD,VD->BTV", x_BTD, embedding_VD.astype(self.dtype))
        return layers.Dense((a.vocab_size,), in_axes=("embed",), out_axes=("vocab",),
                            dtype=self.dtype, name="lm_head")(x_BTD)


class Embedding(nn.Module):
    """The token table [V, D] (float32 parameter; callers cast)."""

    vocab_size: int
    features: int

    @nn.compact
    def __call__(self):
        return layers.param_with_axes(self, "embedding", layers.default_kernel_init,
                                      (self.vocab_size, self.features), ("vocab", "embed"), jnp.float32)


def build(arch: DecoderArch, dtype=jnp.float32) -> Decoder:
    return Decoder(arch, dtype)


# ---------------------------------------------------------------- HF tensor map


def hf_tensors(arch: DecoderArch) -> dict[str, HfTensor]:
    N, K, H = arch.num_heads, arch.num_kv_heads, arch.head_dim

    def per_layer(suffix: str) -> tuple[str, ...]:
        return tuple(f"model.layers.{i}.{suffix}" for i in range(arch.num_layers))

    out = {
        "embed_tokens/embedding": HfTensor(("model.embed_tokens.weight",)),
        "norm/weight": HfTensor(("model.norm.weight",)),
        "layers/input_layernorm/weight": HfTensor(per_layer("input_layernorm.weight")),
        "layers/post_attention_layernorm/weight": HfTensor(per_layer("post_attention_layernorm.weight")),
        "layers/self_attn/q_proj/kernel": HfTensor(per_layer("self_attn.q_proj.weight"), **heads_in(N, H)),
        "layers/self_attn/k_proj/kernel": HfTensor(per_layer("self_attn.k_proj.weight"), **heads_in(K, H)),
        "layers/self_attn/v_proj/kernel": HfTensor(per_layer("self_attn.v_proj.weight"), **heads_in(K, H)),
        "layers/self_attn/o_proj/kernel": HfTensor(per_layer("self_attn.o_proj.weight"), **heads_out(N, H)),
    }
    for name in ("gate_proj", "up_proj", "down_proj"):
        out[f"layers/mlp/{name}/kernel"] = HfTensor(per_layer(f"mlp.{name}.weight"), **linear_t())
        if arch.mlp_bias:
            out[f"layers/mlp/{name}/bias"] = HfTensor(per_layer(f"mlp.{name}.bias"))
    if arch.qkv_bias:
        out["layers/self_attn/q_proj/bias"] = HfTensor(per_layer("self_attn.q_proj.bias"), **heads_bias(N, H))
        out["layers/self_attn/k_proj/bias"] = HfTensor(per_layer("self_attn.k_proj.bias"), **heads_bias(K, H))
        out["layers/self_attn/v_proj/bias"] = HfTensor(per_layer("self_attn.v_proj.bias"), **heads_bias(K, H))
    if arch.o_bias:
        out["layers/self_attn/o_proj/bias"] = HfTensor(per_layer("self_attn.o_proj.bias"))
    if arch.qk_norm:
        out["layers/self_attn/q_norm/weight"] = HfTensor(per_layer("self_attn.q_norm.weight"))
        out["layers/self_attn/k_norm/weight"] = HfTensor(per_layer("self_attn.k_norm.weight"))
    if not arch.tie_word_embeddings:
        out["lm_head/kernel"] = HfTensor(("lm_head.weight",), **linear_t())
    return out


def _family(model_type: str, architecture: str) -> Family:
    return Family(
        name=model_type,
        model_types=(model_type,),
        config_from_hf=config_from_hf,
        build=build,
        hf_tensors=hf_tensors,
        hf_config=hf_config,
        hf_architecture=architecture,
    )


# One Family per model_type, so export writes the right "architectures" entry.
FAMILIES = {
    "llama": _family("llama", "LlamaForCausalLM"),
    "mistral": _family("mistral", "MistralForCausalLM"),
    "qwen2": _family("qwen2", "Qwen2ForCausalLM"),
    "qwen3": _family("qwen3", "Qwen3ForCausalLM"),
}
FAMILY = FAMILIES["llama"]
