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

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ftc.backends.jax.models import kv_cache as kv_cache_lib
from ftc.backends.jax.models import layers, moe
from ftc.backends.jax.models.decoder_config import DecoderArch, config_from_hf, hf_config
from ftc.backends.jax.models.family import Family, HfTensor, heads_bias, heads_in, heads_out, linear_t

# ---------------------------------------------------------------- modules


class Attention(nn.Module):
    arch: DecoderArch
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_BTD, cos_BTH, sin_BTH, mask_B1TS, layer_kv=None, cache_index=None):
        """[B, T, D]; with `layer_kv` (decoding, kv_cache.py) also returns the layer's new cache."""
        a = self.arch
        N, K, H = a.num_heads, a.num_kv_heads, a.head_dim

        def proj(heads, head_axis, name):
            return layers.Dense(
                (heads, H),
                in_axes=("embed",),
                out_axes=(head_axis, "head_dim"),
                use_bias=a.qkv_bias,
                dtype=self.dtype,
                name=name,
            )

        q_BTNH = proj(N, "heads", "q_proj")(x_BTD)
        k_BTKH = proj(K, "kv_heads", "k_proj")(x_BTD)
        v_BTKH = proj(K, "kv_heads", "v_proj")(x_BTD)
        if a.qk_norm:
            q_BTNH = layers.RMSNorm(a.rms_norm_eps, dtype=self.dtype, name="q_norm")(q_BTNH)
            k_BTKH = layers.RMSNorm(a.rms_norm_eps, dtype=self.dtype, name="k_norm")(k_BTKH)
        q_BTNH = layers.apply_rope(q_BTNH, cos_BTH, sin_BTH)
        k_BTKH = layers.apply_rope(k_BTKH, cos_BTH, sin_BTH)
        o_proj = layers.Dense(
            (a.hidden_size,),
            in_axes=("heads", "head_dim"),
            out_axes=("embed",),
            use_bias=a.o_bias,
            dtype=self.dtype,
            name="o_proj",
        )
        if layer_kv is not None:  # decoding: attend over the key/value cache (kv_cache.py)
            out_BTNH, layer_kv = kv_cache_lib.attend(
                q_BTNH, k_BTKH, v_BTKH, layer_kv, cache_index, mask_B1TS, scale=H**-0.5
            )
            return o_proj(out_BTNH), layer_kv
        out_BTNH = layers.dot_product_attention(q_BTNH, k_BTKH, v_BTKH, mask_B1TS, scale=H**-0.5)
        return o_proj(out_BTNH)


class GatedMlp(nn.Module):
    arch: DecoderArch
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_BTD):
        a = self.arch

        def dense(features, in_axis, out_axis, name):
            return layers.Dense(
                (features,), in_axes=(in_axis,), out_axes=(out_axis,), use_bias=a.mlp_bias, dtype=self.dtype, name=name
            )

        gate_BTF = dense(a.intermediate_size, "embed", "mlp", "gate_proj")(x_BTD)
        up_BTF = dense(a.intermediate_size, "embed", "mlp", "up_proj")(x_BTD)
        h_BTF = layers.gated(layers.ACTIVATIONS[a.hidden_act], gate_BTF, up_BTF)
        return dense(a.hidden_size, "mlp", "embed", "down_proj")(h_BTF)


class DecoderBlock(nn.Module):
    """Pre-norm block; called by nn.scan with one `is_sliding` flag per layer."""

    arch: DecoderArch
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self, x_BTD, is_sliding, cos_BTH, sin_BTH, full_mask_B1TS, sliding_mask_B1TS, layer_kv=None, cache_index=None
    ):
        a = self.arch
        if not any(a.sliding_layers):
            mask_B1TS = full_mask_B1TS
        elif all(a.sliding_layers):
            mask_B1TS = sliding_mask_B1TS
        else:
            mask_B1TS = layers.select_mask(is_sliding, sliding_mask_B1TS, full_mask_B1TS)

        def norm(name):
            return layers.RMSNorm(a.rms_norm_eps, unit_offset=a.norm_unit_offset, dtype=self.dtype, name=name)

        h_BTD = Attention(a, self.dtype, name="self_attn")(
            norm("input_layernorm")(x_BTD), cos_BTH, sin_BTH, mask_B1TS, layer_kv, cache_index
        )
        if layer_kv is not None:
            h_BTD, layer_kv = h_BTD
        x_BTD = x_BTD + h_BTD
        h_BTD = norm("post_attention_layernorm")(x_BTD)
        if a.moe is None:
            h_BTD = GatedMlp(a, self.dtype, name="mlp")(h_BTD)
        else:
            h_BTD = moe.MoeMlp(a, self.dtype, name="mlp")(h_BTD, full_mask_B1TS)
        return x_BTD + h_BTD, layer_kv


class Decoder(nn.Module):
    arch: DecoderArch
    dtype: Any = jnp.float32
    # Blocks as one module each (params "layers_0" ... from `per_layer_params`) instead of scanned:
    # generate/sampler.py's CPU decode loop, where a scanned stack copies each layer's weights
    # out of the stacked arrays for every token.
    unrolled: bool = False

    @nn.compact
    def __call__(
        self,
        input_ids,
        attention_mask=None,
        segment_ids=None,
        positions=None,
        token_type_ids=None,
        output="logits",
        kv_cache=None,
    ):
        """See family.py; with `kv_cache` (kv_cache.py) returns (output, the advanced cache)."""
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
        if kv_cache is not None:
            full_mask_B1TS, sliding_mask_B1TS = kv_cache_lib.masks(kv_cache, T, a.sliding_window)
        else:
            mask_args = dict(attention_mask=attention_mask, segment_ids=segment_ids, causal=a.causal, q_len=T, kv_len=T)
            full_mask_B1TS = layers.make_attention_mask(**mask_args)
            sliding_mask_B1TS = (
                layers.make_attention_mask(**mask_args, sliding_window=a.sliding_window)
                if a.sliding_window is not None
                else full_mask_B1TS
            )

        layers_kv = None if kv_cache is None else kv_cache_lib.layer_slices(kv_cache)
        cache_index = None if kv_cache is None else kv_cache["index"]
        block_args = (cos_BTH, sin_BTH, full_mask_B1TS, sliding_mask_B1TS)
        if layers_kv is not None and kv_cache_lib.is_per_layer(layers_kv) and not self.unrolled:
            raise ValueError("a per-layer kv cache (kv_cache.per_layer) needs Decoder(unrolled=True)")
        if self.unrolled:
            x_BTD, layers_kv = _unrolled(a, self.dtype, x_BTD, block_args, layers_kv, cache_index)
        else:
            Stack = nn.scan(
                layers.remat_block(DecoderBlock, a.remat),
                variable_axes={"params": 0, "intermediates": 0},  # intermediates: MoE router statistics
                split_rngs={"params": True, "dropout": True},
                in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, 0, nn.broadcast),
                length=a.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            is_sliding_L = jnp.asarray(a.sliding_layers, dtype=bool)
            x_BTD, layers_kv = Stack(a, self.dtype, name="layers")(
                x_BTD, is_sliding_L, *block_args, layers_kv, cache_index
            )
        if output == "last_logits":
            x_BTD = kv_cache_lib.last_position(x_BTD)
        x_BTD = layers.RMSNorm(a.rms_norm_eps, unit_offset=a.norm_unit_offset, dtype=self.dtype, name="norm")(x_BTD)
        if output == "hidden":
            out = x_BTD
        elif output not in ("logits", "last_logits", "logits_and_hidden"):
            raise ValueError(f"output={output!r}; expected 'logits', 'last_logits', 'hidden' or 'logits_and_hidden'")
        elif a.tie_word_embeddings:
            out = jnp.einsum("BTD,VD->BTV", x_BTD, embedding_VD.astype(self.dtype))
        else:
            out = layers.Dense(
                (a.vocab_size,), in_axes=("embed",), out_axes=("vocab",), dtype=self.dtype, name="lm_head"
            )(x_BTD)
        if output == "logits_and_hidden":
            out = (out, x_BTD)
        return out if kv_cache is None else (out, kv_cache_lib.advanced(kv_cache, layers_kv, T))


class Embedding(nn.Module):
    """The token table [V, D] (float32 parameter; callers cast)."""

    vocab_size: int
    features: int

    @nn.compact
    def __call__(self):
        return layers.param_with_axes(
            self,
            "embedding",
            layers.default_kernel_init,
            (self.vocab_size, self.features),
            ("vocab", "embed"),
            jnp.float32,
        )


def _unrolled(a: DecoderArch, dtype, x_BTD, block_args, layers_kv, cache_index):
    """The blocks one after another, each its own module with its own parameter buffers; the
    cache's per-layer keys and values read and written at static layer indices."""
    out_kv = []
    for i in range(a.num_layers):
        layer_kv = None if layers_kv is None else {k: c[i] for k, c in layers_kv.items()}
        x_BTD, layer_kv = DecoderBlock(a, dtype, name=f"layers_{i}")(
            x_BTD, jnp.asarray(a.sliding_layers[i]), *block_args, layer_kv, cache_index
        )
        out_kv.append(layer_kv)
    if layers_kv is None:
        return x_BTD, None
    if kv_cache_lib.is_per_layer(layers_kv):  # each layer's buffer written in place: nothing stacked
        return x_BTD, {k: tuple(kv[k] for kv in out_kv) for k in layers_kv}
    return x_BTD, {k: jnp.stack([kv[k] for kv in out_kv]) for k in layers_kv}


def per_layer_params(params: dict, num_layers: int) -> dict:
    """A scanned Decoder's params ("layers": every block's stacked on a leading axis) as an
    unrolled one's ("layers_0", "layers_1", ...): a copy of the block weights, a buffer each."""
    out = {k: v for k, v in params.items() if k != "layers"}
    for i in range(num_layers):
        out[f"layers_{i}"] = jax.tree.map(lambda w, i=i: w[i], params["layers"])
    return out


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


def cache_layout(arch: DecoderArch) -> kv_cache_lib.CacheLayout:
    """What the decode cache holds per layer (generate/); a bidirectional model does not decode."""
    if not arch.causal:
        raise ValueError(
            f"{arch.model_type} with use_bidirectional_attention=true is not a causal LM: it cannot generate"
        )
    return kv_cache_lib.CacheLayout(arch.num_layers, arch.num_kv_heads, arch.head_dim)


def _family(model_type: str, architecture: str) -> Family:
    return Family(
        name=model_type,
        model_types=(model_type,),
        config_from_hf=config_from_hf,
        build=build,
        hf_tensors=hf_tensors,
        hf_config=hf_config,
        hf_architecture=architecture,
        cache_layout=cache_layout,
    )


# One Family per model_type, so export writes the right "architectures" entry.
FAMILIES = {
    "llama": _family("llama", "LlamaForCausalLM"),
    "mistral": _family("mistral", "MistralForCausalLM"),
    "qwen2": _family("qwen2", "Qwen2ForCausalLM"),
    "qwen3": _family("qwen3", "Qwen3ForCausalLM"),
}
FAMILY = FAMILIES["llama"]
