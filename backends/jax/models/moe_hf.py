"""What the MoE families (mixtral.py, qwen2_moe.py, qwen3_moe.py) share: reading config.json into a
`DecoderArch` with `moe` set, writing it back, and the HF tensor map of a MoE decoder.

Checkpoints store every expert's projections as separate tensors (what transformers 5 writes, and
what the released checkpoints hold): Mixtral `block_sparse_moe.experts.{e}.w1|w3|w2.weight`
(gate, up, down), Qwen `mlp.experts.{e}.gate_proj|up_proj|down_proj.weight`. transformers holds
them fused in memory (`mlp.experts.gate_up_proj` [E, 2F, D], `mlp.experts.down_proj` [E, D, F],
router `mlp.gate.weight` [E, D]); that layout is each tensor's `fused` alternative: PEFT's
`target_parameters` name it, and import reads a checkpoint stored that way too.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from ftc.backends.jax.models import decoder_config, layers, llama
from ftc.backends.jax.models.decoder_config import DecoderArch
from ftc.backends.jax.models.family import HfTensor, linear_t
from ftc.backends.jax.models.moe import MoeArch

SUPPORTED = "mixtral, qwen2_moe, qwen3_moe"


def check_all_layers_sparse(c: dict) -> None:
    """ftc's MoE stack scans one kind of layer: refuse configs that mix in dense MLP layers.

    transformers' rule: layer i is sparse unless i is in mlp_only_layers or (i + 1) is not a
    multiple of decoder_sparse_step; an mlp_only_layers entry past the last layer names no layer."""
    step, only = c.get("decoder_sparse_step", 1), list(c.get("mlp_only_layers") or [])
    n = c["num_hidden_layers"]
    dense = [i for i in range(n) if i in only or (isinstance(step, int) and step > 0 and (i + 1) % step)]
    if dense:
        raise ValueError(
            f"config.json decoder_sparse_step={step}, mlp_only_layers={only}: this model mixes dense and MoE "
            f"layers (layers {dense} of {n} have a dense MLP), which ftc's MoE families ({SUPPORTED}) do not "
            f"support; they need every layer sparse (decoder_sparse_step = 1, mlp_only_layers naming no layer)"
        )


def num_experts(c: dict) -> int:
    """transformers maps `num_experts` and `num_local_experts` onto each other; configs carry either."""
    n = c.get("num_local_experts", c.get("num_experts"))
    if not isinstance(n, int) or n < 1:
        raise ValueError(
            f"config.json num_experts / num_local_experts = {n!r}: a MoE model ({SUPPORTED}) needs >= 1 expert"
        )
    return n


def decoder_arch(
    c: dict,
    *,
    moe: MoeArch,
    sliding_window: int | None,
    sliding_layers: tuple[bool, ...],
    qkv_bias: bool = False,
    o_bias: bool = False,
    qk_norm: bool = False,
) -> DecoderArch:
    """The decoder architecture of a MoE config `c` (transformers' defaults already filled in)."""
    num_heads = c["num_attention_heads"]
    return DecoderArch(
        model_type=c["model_type"],
        vocab_size=c["vocab_size"],
        hidden_size=c["hidden_size"],
        intermediate_size=c["intermediate_size"],
        num_layers=c["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=c.get("num_key_value_heads") or num_heads,
        head_dim=c.get("head_dim") or c["hidden_size"] // num_heads,
        rms_norm_eps=float(c["rms_norm_eps"]),
        rope=layers.Rope.from_hf(c),
        max_position_embeddings=c["max_position_embeddings"],
        tie_word_embeddings=bool(c["tie_word_embeddings"]),
        hidden_act=c["hidden_act"],
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        qk_norm=qk_norm,
        sliding_window=sliding_window,
        sliding_layers=sliding_layers,
        moe=moe,
    )


def with_defaults(hf_config: dict, model_type: str, defaults: dict[str, Any]) -> dict:
    if hf_config.get("model_type") != model_type:
        raise ValueError(f"{model_type}.py reads model_type {model_type!r}, got {hf_config.get('model_type')!r}")
    return {**defaults, **hf_config}


def hf_config(arch: DecoderArch, extra: dict[str, Any]) -> dict:
    """config.json's architecture keys: the decoder's, the MoE's common ones and the family's `extra`."""
    m = arch.moe
    out = decoder_config.hf_config(arch)
    out.update(
        num_experts_per_tok=m.experts_per_token,
        router_aux_loss_coef=m.router_aux_loss_coef,
        output_router_logits=m.output_router_logits,
    )
    out.update(extra)
    return out


# ---------------------------------------------------------------- HF tensors


def _gate_up(E: int) -> dict:
    """Per-expert (gate [F, D], up [F, D]) pairs <-> flax [E, D, 2, F]."""

    def to_flax(arrays):
        return np.stack([np.stack([g.T, u.T], axis=1) for g, u in zip(arrays[0::2], arrays[1::2])])

    def to_hf(k):
        return tuple(np.ascontiguousarray(k[e, :, j, :].T) for e in range(E) for j in (0, 1))

    return dict(to_flax=to_flax, to_hf=to_hf)


def _down(E: int) -> dict:
    """Per-expert down [D, F] <-> flax [E, F, D]."""
    return dict(
        to_flax=lambda arrays: np.stack([a.T for a in arrays]),
        to_hf=lambda k: tuple(np.ascontiguousarray(k[e].T) for e in range(E)),
    )


def _fused_gate_up() -> dict:
    """transformers' in-memory gate_up_proj [E, 2F, D] (gate rows first) <-> flax [E, D, 2, F]."""

    def to_flax(a):
        E, F2, D = a.shape
        return np.ascontiguousarray(a.transpose(0, 2, 1)).reshape(E, D, 2, F2 // 2)

    def to_hf(k):
        E, D, _, F = k.shape
        return np.ascontiguousarray(k.reshape(E, D, 2 * F).transpose(0, 2, 1))

    return dict(to_flax=to_flax, to_hf=to_hf)


def _fused_down() -> dict:
    """transformers' in-memory down_proj [E, D, F] <-> flax [E, F, D]."""
    swap = lambda a: np.ascontiguousarray(a.transpose(0, 2, 1))
    return dict(to_flax=swap, to_hf=swap)


def hf_tensors(arch: DecoderArch, *, stored_block: str, projections: tuple[str, str, str]) -> dict[str, HfTensor]:
    """The MoE decoder's tensor map: llama's attention, norms, embeddings and head, plus the router
    and experts stored under `model.layers.{i}.<stored_block>` with per-expert `projections`
    (gate, up, down), and a qwen2_moe shared expert."""
    E, L = arch.moe.num_experts, arch.num_layers
    out = {k: v for k, v in llama.hf_tensors(arch).items() if not k.startswith("layers/mlp/")}

    def per_layer(suffix: str) -> tuple[str, ...]:
        return tuple(f"model.layers.{i}.{suffix}" for i in range(L))

    def per_expert(i: int, *names: str) -> tuple[str, ...]:
        return tuple(f"model.layers.{i}.{stored_block}.experts.{e}.{n}.weight" for e in range(E) for n in names)

    gate, up, down = projections
    out["layers/mlp/gate/kernel"] = HfTensor(
        per_layer(f"{stored_block}.gate.weight"),
        **linear_t(),
        fused=HfTensor(per_layer("mlp.gate.weight"), **linear_t()),
    )
    out["layers/mlp/experts/gate_up_proj/kernel"] = HfTensor(
        tuple(per_expert(i, gate, up) for i in range(L)),
        **_gate_up(E),
        fused=HfTensor(per_layer("mlp.experts.gate_up_proj"), **_fused_gate_up()),
    )
    out["layers/mlp/experts/down_proj/kernel"] = HfTensor(
        tuple(per_expert(i, down) for i in range(L)),
        **_down(E),
        fused=HfTensor(per_layer("mlp.experts.down_proj"), **_fused_down()),
    )
    if arch.moe.shared_expert_intermediate_size:
        for name in ("gate_proj", "up_proj", "down_proj"):
            out[f"layers/mlp/shared_expert/{name}/kernel"] = HfTensor(
                per_layer(f"mlp.shared_expert.{name}.weight"), **linear_t()
            )
        out["layers/mlp/shared_expert_gate/kernel"] = HfTensor(per_layer("mlp.shared_expert_gate.weight"), **linear_t())
    return out


def replace_moe(arch: DecoderArch, **changes) -> DecoderArch:
    return dataclasses.replace(arch, moe=dataclasses.replace(arch.moe, **changes))
