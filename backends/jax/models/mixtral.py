"""Mixtral: Mistral's attention (GQA, optional sliding window on every layer) with a sparse MoE
feed-forward: `num_local_experts` experts, `num_experts_per_tok` per token, routing weights always
renormalised over the chosen experts and applied in float32 (models/moe.py).

Stored as `model.layers.{i}.block_sparse_moe.gate.weight` and
`block_sparse_moe.experts.{e}.w1|w3|w2.weight` (gate, up, down), as transformers writes it
(moe_hf.py). `router_jitter_noise` (training-time noise on the router input) is read and written
back but not applied: ftc trains Mixtral without it.
"""

from __future__ import annotations

from ftc.backends.jax.models import llama, moe_hf
from ftc.backends.jax.models.decoder_config import DecoderArch
from ftc.backends.jax.models.family import Family
from ftc.backends.jax.models.moe import MoeArch

# transformers' MixtralConfig defaults, for configs that omit keys.
_DEFAULTS = dict(
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=None,
    hidden_act="silu",
    max_position_embeddings=4096 * 32,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    sliding_window=None,
    num_experts_per_tok=2,
    num_local_experts=8,
    router_aux_loss_coef=0.001,
    output_router_logits=False,
    rope_theta=1e6,
)


def config_from_hf(hf_config: dict) -> DecoderArch:
    c = moe_hf.with_defaults(hf_config, "mixtral", _DEFAULTS)
    moe = MoeArch(
        num_experts=moe_hf.num_experts(c),
        experts_per_token=c["num_experts_per_tok"],
        expert_intermediate_size=c["intermediate_size"],
        norm_topk_prob=True,
        router_aux_loss_coef=float(c["router_aux_loss_coef"]),
        output_router_logits=bool(c["output_router_logits"]),
        route_weights_float32=True,
    )
    window = c.get("sliding_window")
    return moe_hf.decoder_arch(
        c, moe=moe, sliding_window=window, sliding_layers=(window is not None,) * c["num_hidden_layers"]
    )


def hf_config(arch: DecoderArch) -> dict:
    return moe_hf.hf_config(arch, {"num_local_experts": arch.moe.num_experts, "sliding_window": arch.sliding_window})


def hf_tensors(arch: DecoderArch):
    return moe_hf.hf_tensors(arch, stored_block="block_sparse_moe", projections=("w1", "w3", "w2"))


FAMILY = Family(
    name="mixtral",
    model_types=("mixtral",),
    config_from_hf=config_from_hf,
    build=llama.build,
    cache_layout=llama.cache_layout,  # llama's attention and KV cache: the sampler decodes it
    hf_tensors=hf_tensors,
    hf_config=hf_config,
    hf_architecture="MixtralForCausalLM",
)
