"""Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B): Qwen2's attention (q/k/v bias per `qkv_bias`, sliding
window on the layers `layer_types` names) with a MoE feed-forward plus a shared expert: a dense
gated MLP of `shared_expert_intermediate_size` every token runs, scaled by
sigmoid(shared_expert_gate(x)). Routing weights are renormalised only with `norm_topk_prob` and
applied in the compute dtype (models/moe.py).

Stored as `model.layers.{i}.mlp.gate.weight`, `mlp.experts.{e}.gate_proj|up_proj|down_proj.weight`,
`mlp.shared_expert.*_proj.weight` and `mlp.shared_expert_gate.weight` (moe_hf.py).
"""

from __future__ import annotations

from ftc.backends.jax.models import llama, moe_hf
from ftc.backends.jax.models.decoder_config import DecoderArch
from ftc.backends.jax.models.family import Family
from ftc.backends.jax.models.moe import MoeArch

# transformers' Qwen2MoeConfig defaults, for configs that omit keys.
_DEFAULTS = dict(
    vocab_size=151936,
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=24,
    num_attention_heads=16,
    num_key_value_heads=16,
    hidden_act="silu",
    max_position_embeddings=32768,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    use_sliding_window=False,
    sliding_window=4096,
    max_window_layers=28,
    decoder_sparse_step=1,
    moe_intermediate_size=1408,
    shared_expert_intermediate_size=5632,
    num_experts_per_tok=4,
    num_experts=60,
    norm_topk_prob=False,
    output_router_logits=False,
    router_aux_loss_coef=0.001,
    mlp_only_layers=[],
    qkv_bias=True,
    rope_theta=10000.0,
)


def _sliding(c: dict) -> tuple[int | None, tuple[bool, ...]]:
    """Qwen2MoeConfig's rule: layer_types as given, else sliding on even-numbered (i + 1 odd) layers
    below max_window_layers when use_sliding_window."""
    n = c["num_hidden_layers"]
    window = c.get("sliding_window") if c.get("use_sliding_window") else None
    types = c.get("layer_types") or [
        "sliding_attention" if (i + 1) % 2 and i < c["max_window_layers"] and window else "full_attention"
        for i in range(n)
    ]
    flags = tuple(t == "sliding_attention" and bool(window) for t in types)
    return (window if any(flags) else None), flags


def config_from_hf(hf_config: dict) -> DecoderArch:
    c = moe_hf.with_defaults(hf_config, "qwen2_moe", _DEFAULTS)
    moe_hf.check_all_layers_sparse(c)
    moe = MoeArch(
        num_experts=moe_hf.num_experts(c),
        experts_per_token=c["num_experts_per_tok"],
        expert_intermediate_size=c["moe_intermediate_size"],
        norm_topk_prob=bool(c["norm_topk_prob"]),
        router_aux_loss_coef=float(c["router_aux_loss_coef"]),
        output_router_logits=bool(c["output_router_logits"]),
        shared_expert_intermediate_size=c["shared_expert_intermediate_size"],
        route_weights_float32=False,
    )
    if moe.shared_expert_intermediate_size < 1:
        raise ValueError("config.json shared_expert_intermediate_size must be >= 1 for qwen2_moe")
    window, flags = _sliding(c)
    return moe_hf.decoder_arch(c, moe=moe, sliding_window=window, sliding_layers=flags, qkv_bias=bool(c["qkv_bias"]))


def hf_config(arch: DecoderArch) -> dict:
    m = arch.moe
    return moe_hf.hf_config(
        arch,
        {
            "num_experts": m.num_experts,
            "moe_intermediate_size": m.expert_intermediate_size,
            "shared_expert_intermediate_size": m.shared_expert_intermediate_size,
            "norm_topk_prob": m.norm_topk_prob,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
            "qkv_bias": arch.qkv_bias,
            "use_sliding_window": arch.sliding_window is not None,
            "sliding_window": arch.sliding_window,
            "layer_types": ["sliding_attention" if s else "full_attention" for s in arch.sliding_layers],
        },
    )


def hf_tensors(arch: DecoderArch):
    return moe_hf.hf_tensors(arch, stored_block="mlp", projections=("gate_proj", "up_proj", "down_proj"))


FAMILY = Family(
    name="qwen2_moe",
    model_types=("qwen2_moe",),
    config_from_hf=config_from_hf,
    build=llama.build,
    cache_layout=llama.cache_layout,  # llama's attention and KV cache: the sampler decodes it
    hf_tensors=hf_tensors,
    hf_config=hf_config,
    hf_architecture="Qwen2MoeForCausalLM",
)
