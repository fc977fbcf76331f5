"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): Qwen3's attention (RMSNorm on q and k per head,
explicit head_dim, bias per `attention_bias`, a sliding window on every layer when
`use_sliding_window`) with a MoE feed-forward and no shared expert. Routing weights are
renormalised only with `norm_topk_prob` and applied in the compute dtype (models/moe.py).

Stored as `model.layers.{i}.mlp.gate.weight` and `mlp.experts.{e}.gate_proj|up_proj|down_proj.weight`
(moe_hf.py).
"""

from __future__ import annotations

from ftc.backends.jax.models import llama, moe_hf
from ftc.backends.jax.models.decoder_config import DecoderArch
from ftc.backends.jax.models.family import Family
from ftc.backends.jax.models.moe import MoeArch

# transformers' Qwen3MoeConfig defaults, for configs that omit keys.
_DEFAULTS = dict(
    vocab_size=151936,
    hidden_size=2048,
    intermediate_size=6144,
    num_hidden_layers=24,
    num_attention_heads=32,
    num_key_value_heads=4,
    hidden_act="silu",
    max_position_embeddings=32768,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    attention_bias=False,
    use_sliding_window=False,
    sliding_window=4096,
    decoder_sparse_step=1,
    moe_intermediate_size=768,
    num_experts_per_tok=8,
    num_experts=128,
    norm_topk_prob=False,
    output_router_logits=False,
    router_aux_loss_coef=0.001,
    mlp_only_layers=[],
    rope_theta=10000.0,
)


def config_from_hf(hf_config: dict) -> DecoderArch:
    c = moe_hf.with_defaults(hf_config, "qwen3_moe", _DEFAULTS)
    moe_hf.check_all_layers_sparse(c)
    moe = MoeArch(
        num_experts=moe_hf.num_experts(c),
        experts_per_token=c["num_experts_per_tok"],
        expert_intermediate_size=c["moe_intermediate_size"],
        norm_topk_prob=bool(c["norm_topk_prob"]),
        router_aux_loss_coef=float(c["router_aux_loss_coef"]),
        output_router_logits=bool(c["output_router_logits"]),
        route_weights_float32=False,
    )
    window = c.get("sliding_window") if c.get("use_sliding_window") else None
    bias = bool(c["attention_bias"])
    return moe_hf.decoder_arch(
        c,
        moe=moe,
        sliding_window=window,
        sliding_layers=(window is not None,) * c["num_hidden_layers"],
        qkv_bias=bias,
        o_bias=bias,
        qk_norm=True,
    )


def hf_config(arch: DecoderArch) -> dict:
    m = arch.moe
    return moe_hf.hf_config(
        arch,
        {
            "num_experts": m.num_experts,
            "moe_intermediate_size": m.expert_intermediate_size,
            "norm_topk_prob": m.norm_topk_prob,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
            "attention_bias": arch.qkv_bias,
            "use_sliding_window": arch.sliding_window is not None,
            "sliding_window": arch.sliding_window,
        },
    )


def hf_tensors(arch: DecoderArch):
    return moe_hf.hf_tensors(arch, stored_block="mlp", projections=("gate_proj", "up_proj", "down_proj"))


FAMILY = Family(
    name="qwen3_moe",
    model_types=("qwen3_moe",),
    config_from_hf=config_from_hf,
    build=llama.build,
    cache_layout=llama.cache_layout,  # llama's attention and KV cache: the sampler decodes it
    hf_tensors=hf_tensors,
    hf_config=hf_config,
    hf_architecture="Qwen3MoeForCausalLM",
)
