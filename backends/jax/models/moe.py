"""Mixture-of-Experts layers shared by the MoE families (mixtral.py, qwen2_moe.py, qwen3_moe.py).

Routing is transformers': router logits x @ W_r in the compute dtype, softmax in float32, the
top-k experts per token, their weights renormalised to sum to 1 where the config says so
(Mixtral always, Qwen `norm_topk_prob`). Dropless: every routed (token, expert) pair is computed;
there is no capacity factor. The experts run as a grouped matmul over the tokens sorted by expert:
on CPU a scan over fixed-size blocks of one expert each (only blocks that hold tokens compute), on
GPU/TPU `jax.lax.ragged_dot` (CPU XLA lowers ragged_dot to a dense matmul over every expert).

Expert parallelism: under a mesh (train/step.py traces the steps inside it) the expert FFN runs
in a `shard_map` manual over the batch axes ("expert", "data", "fsdp"; "tensor" stays automatic).
Each device holds num_experts / mesh.expert experts; the tokens of the devices along "expert"
are all-gathered, each device computes its own experts' share, and a reduce-scatter returns every
token's sum to the device that holds it. Weights enter replicated over data and fsdp (XLA gathers
the fsdp shards, as it does for any FSDP weight) and their gradients leave reduce-scattered.

Parameter tree of one MoE layer (flax path -> shape, logical axes; L layers, E experts):
  layers/mlp/gate/kernel                         [L, D, E]        layers, embed, -      (router)
  layers/mlp/experts/gate_up_proj/kernel         [L, E, D, 2, F]  layers, expert, embed, -, mlp
  layers/mlp/experts/down_proj/kernel            [L, E, F, D]     layers, expert, mlp, embed
  layers/mlp/shared_expert/{gate,up,down}_proj   like llama's mlp (qwen2_moe)
  layers/mlp/shared_expert_gate/kernel           [L, D, 1]        (qwen2_moe)
The router is not a `layers.Dense`, so LoRA's "all-linear" leaves it frozen (PEFT 0.21's
"all-linear" adapts transformers' `mlp.gate` too; ftc's adapters name their targets, so PEFT loads
them as trained); the expert kernels are `ExpertKernel`s, which LoRA and QLoRA intercept like a
Dense (methods/lora.py).

Router statistics for the load-balancing loss are sown into the "intermediates" collection
(`router`: per-expert top-k counts and probability sums over real tokens, and the token count),
so a caller that asks for them (`mutable=["intermediates"]`, objectives/router_aux.py) gets one
[L, ...] entry per scanned stack and nobody else pays for them.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from ftc.backends.jax.models import layers
from ftc.compiler.sharding_rules import BATCH_AXES

EXPERT_AXIS = "expert"
STATS = "router"  # the sown name of the router statistics


@dataclasses.dataclass(frozen=True)
class MoeArch:
    """The MoE part of a decoder's architecture (`DecoderArch.moe`)."""

    num_experts: int
    experts_per_token: int
    expert_intermediate_size: int
    norm_topk_prob: bool
    router_aux_loss_coef: float
    output_router_logits: bool  # transformers adds the aux loss to its training loss only when set
    shared_expert_intermediate_size: int = 0  # qwen2_moe: a dense expert every token also runs
    # Mixtral weighs expert outputs in float32; Qwen casts the routing weights to the compute dtype.
    route_weights_float32: bool = True

    def __post_init__(self):
        if not 0 < self.experts_per_token <= self.num_experts:
            raise ValueError(
                f"config.json num_experts_per_tok={self.experts_per_token} must be between 1 and the "
                f"number of experts ({self.num_experts})"
            )


# ---------------------------------------------------------------- parameters


class Router(nn.Module):
    """Router logits x @ kernel, kernel [D, E] (transformers' `mlp.gate.weight` [E, D])."""

    num_experts: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_ND: jax.Array) -> jax.Array:
        shape = (x_ND.shape[-1], self.num_experts)
        kernel_DE = layers.param_with_axes(
            self, "kernel", layers.default_kernel_init, shape, ("embed", None), self.param_dtype
        )
        return x_ND.astype(self.dtype) @ kernel_DE.astype(self.dtype)


class ExpertKernel(nn.Module):
    """One projection of every expert, [E, *in, *out], returned in the compute dtype.

    A module of its own so that methods can intercept it like a `layers.Dense` (LoRA adds its merged
    per-expert delta, QLoRA reads NF4 storage instead): the FFN then runs on what it returns."""

    num_experts: int
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    in_axes: tuple[str | None, ...]
    out_axes: tuple[str | None, ...]
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self) -> jax.Array:
        kernel = layers.param_with_axes(
            self,
            "kernel",
            layers.default_kernel_init,
            (self.num_experts,) + tuple(self.in_shape) + tuple(self.out_shape),
            (EXPERT_AXIS,) + tuple(self.in_axes) + tuple(self.out_axes),
            self.param_dtype,
        )
        return kernel.astype(self.dtype)


# ---------------------------------------------------------------- the experts' FFN on sorted tokens


def _block_size(rows: int, experts: int) -> int:
    """Rows per block: about half an expert's average share, a power of two in [8, 512]."""
    target = max(1, rows // (2 * experts))
    return min(512, max(8, 1 << (target.bit_length() - 1)))


def _ffn_blocks(xs_MD, sizes_E, wg_EDF, wu_EDF, wd_EFD, act):
    """The gated FFN of each row's expert (rows sorted by expert, `sizes_E` rows each; rows past
    their sum give 0): rows laid out in blocks of `block` that each belong to one expert, and a scan
    over the blocks, skipping empty ones. Pads at most one block per expert."""
    M, D = xs_MD.shape
    E = wg_EDF.shape[0]
    block = _block_size(M, E)
    nb = -(-M // block) + E
    ends = jnp.cumsum(sizes_E)
    padded = (sizes_E + block - 1) // block * block
    padded_ends = jnp.cumsum(padded)
    row = jnp.arange(M)
    group = jnp.searchsorted(ends, row, side="right")  # E for rows past the last group
    g = jnp.minimum(group, E - 1)
    dest = jnp.where(group < E, row - (ends - sizes_E)[g] + (padded_ends - padded)[g], nb * block)
    xp_NbD = jnp.zeros((nb * block, D), xs_MD.dtype).at[dest].set(xs_MD, mode="drop").reshape(nb, block, D)
    block_group = jnp.searchsorted(padded_ends, jnp.arange(nb) * block, side="right")

    def one(_, xs):
        x_bD, e = xs

        def compute():
            i = jnp.minimum(e, E - 1)
            return layers.gated(act, x_bD @ wg_EDF[i], x_bD @ wu_EDF[i]) @ wd_EFD[i]

        return None, jax.lax.cond(e < E, compute, lambda: jnp.zeros((block, D), xs_MD.dtype))

    _, yp = jax.lax.scan(one, None, (xp_NbD, block_group))
    return yp.reshape(nb * block, D).at[dest].get(mode="fill", fill_value=0)


def _ffn_ragged(xs_MD, sizes_E, wg_EDF, wu_EDF, wd_EFD, act):
    """The same FFN with `jax.lax.ragged_dot` (grouped matmul kernels on GPU/TPU)."""
    sizes = sizes_E.astype(jnp.int32)
    h_MF = layers.gated(act, jax.lax.ragged_dot(xs_MD, wg_EDF, sizes), jax.lax.ragged_dot(xs_MD, wu_EDF, sizes))
    return jax.lax.ragged_dot(h_MF, wd_EFD, sizes)


def grouped_ffn_impl() -> str:
    """ "blocks" on CPU, "ragged" elsewhere (see the module docstring)."""
    return "blocks" if jax.default_backend() == "cpu" else "ragged"


def local_experts_ffn(x_ND, idx_NK, w_NK, gate_up_ECDF, down_EFD, act, *, offset=0, float32_weights=True, impl=None):
    """sum_k w[n, k] * FFN_{idx[n, k]}(x[n]) over the experts held here (`offset` .. `offset` + E),
    dropless: every (token, expert) pair routed to them is computed. `gate_up_ECDF` is [E, D, 2, F]
    (gate, up) and `down_EFD` [E, F, D]."""
    N, K = idx_NK.shape
    E = gate_up_ECDF.shape[0]
    expert = idx_NK.reshape(-1) - offset
    here = (expert >= 0) & (expert < E)
    key = jnp.where(here, expert, E)  # pairs for other devices' experts sort last and are skipped
    order = jnp.argsort(key, stable=True)
    token = order // K
    sizes_E = jnp.bincount(key, length=E + 1)[:E]
    ffn = _ffn_blocks if (impl or grouped_ffn_impl()) == "blocks" else _ffn_ragged
    ys_MD = ffn(x_ND[token], sizes_E, gate_up_ECDF[:, :, 0], gate_up_ECDF[:, :, 1], down_EFD, act)
    ws_M = jnp.where(here, w_NK.reshape(-1), 0.0)[order]
    if float32_weights:
        contrib_MD = (ys_MD.astype(jnp.float32) * ws_M[:, None]).astype(x_ND.dtype)
    else:
        contrib_MD = ys_MD * ws_M.astype(x_ND.dtype)[:, None]
    return jnp.zeros_like(x_ND).at[token].add(contrib_MD)


def experts_ffn(x_ND, idx_NK, w_NK, gate_up_ECDF, down_EFD, act, *, float32_weights=True):
    """`local_experts_ffn` over every expert; expert-parallel under a mesh (module docstring)."""
    mesh = jax.sharding.get_abstract_mesh()
    manual = () if mesh.empty else tuple(a for a in BATCH_AXES if a in mesh.axis_names)
    shards = math.prod(mesh.shape[a] for a in manual)
    n_expert = mesh.shape[EXPERT_AXIS] if EXPERT_AXIS in manual else 1
    E = gate_up_ECDF.shape[0]
    if E % n_expert:
        raise ValueError(f"mesh.expert={n_expert} does not divide the {E} experts")
    kw = dict(act=act, float32_weights=float32_weights)
    if shards == 1 or x_ND.shape[0] % shards or mesh.manual_axes:
        # One device, a token count the batch axes do not divide (e.g. a generation batch), or
        # already inside a manual region: every expert on these tokens, sharded as XLA sees fit.
        return local_experts_ffn(x_ND, idx_NK, w_NK, gate_up_ECDF, down_EFD, **kw)

    def body(x, idx, w, gate_up, down):
        if n_expert == 1:
            return local_experts_ffn(x, idx, w, gate_up, down, **kw)
        gather = lambda a: jax.lax.all_gather(a, EXPERT_AXIS, axis=0, tiled=True)
        offset = jax.lax.axis_index(EXPERT_AXIS) * gate_up.shape[0]
        y = local_experts_ffn(gather(x), gather(idx), gather(w), gate_up, down, offset=offset, **kw)
        return jax.lax.psum_scatter(y, EXPERT_AXIS, scatter_dimension=0, tiled=True)

    tokens = P(manual)
    experts = P(EXPERT_AXIS) if n_expert > 1 else P()
    return jax.shard_map(
        body,
        in_specs=(tokens, tokens, tokens, experts, experts),
        out_specs=tokens,
        axis_names=set(manual),
        check_vma=False,
    )(x_ND, idx_NK, w_NK, gate_up_ECDF, down_EFD)


# ---------------------------------------------------------------- the MoE block


def route(logits_NE: jax.Array, moe: MoeArch) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(float32 probabilities [N, E], top-k weights [N, K] (float32), top-k expert ids [N, K])."""
    probs_NE = jax.nn.softmax(logits_NE.astype(jnp.float32), axis=-1)
    weights_NK, experts_NK = jax.lax.top_k(probs_NE, moe.experts_per_token)
    if moe.norm_topk_prob:
        weights_NK = weights_NK / jnp.sum(weights_NK, axis=-1, keepdims=True)
    return probs_NE, weights_NK, experts_NK


def router_stats(probs_NE: jax.Array, experts_NK: jax.Array, valid_N: jax.Array) -> dict[str, jax.Array]:
    """One layer's sums over real tokens for transformers' `load_balancing_loss_func`: top-k
    assignments per expert (non-differentiable), routing probability per expert, real tokens."""
    E = probs_NE.shape[-1]
    v_N = valid_N.astype(jnp.float32)
    counts_E = jnp.sum(jax.nn.one_hot(experts_NK, E, dtype=jnp.float32) * v_N[:, None, None], axis=(0, 1))
    return {
        "counts": jax.lax.stop_gradient(counts_E),
        "probs": jnp.sum(probs_NE * v_N[:, None], axis=0),
        "tokens": jnp.sum(v_N),
    }


class MoeMlp(nn.Module):
    """The MoE feed-forward of a decoder block: router, routed experts, optional shared expert."""

    arch: Any  # decoder_config.DecoderArch with `.moe` set
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_BTD: jax.Array, mask_B1TS: jax.Array | None = None) -> jax.Array:
        from ftc.backends.jax.models import llama  # llama imports this module

        a, m = self.arch, self.arch.moe
        B, T, D = x_BTD.shape
        F = m.expert_intermediate_size
        x_ND = x_BTD.reshape(B * T, D)
        logits_NE = Router(m.num_experts, self.dtype, name="gate")(x_ND)
        probs_NE, weights_NK, experts_NK = route(logits_NE, m)
        if self.is_mutable_collection("intermediates"):
            self.sow("intermediates", STATS, router_stats(probs_NE, experts_NK, _real_tokens(mask_B1TS, B, T)))

        gate_up, down = Experts(m.num_experts, D, F, self.dtype, name="experts")()
        y_ND = experts_ffn(
            x_ND,
            experts_NK,
            weights_NK,
            gate_up,
            down,
            layers.ACTIVATIONS[a.hidden_act],
            float32_weights=m.route_weights_float32,
        )
        if m.shared_expert_intermediate_size:
            shared = dataclasses.replace(a, intermediate_size=m.shared_expert_intermediate_size, mlp_bias=False)
            shared_ND = llama.GatedMlp(shared, self.dtype, name="shared_expert")(x_ND)
            gate_N1 = layers.Dense(
                (1,), in_axes=("embed",), out_axes=(None,), dtype=self.dtype, name="shared_expert_gate"
            )(x_ND)
            y_ND = y_ND + jax.nn.sigmoid(gate_N1) * shared_ND
        return y_ND.reshape(B, T, D)


class Experts(nn.Module):
    """Every expert's kernels: gate_up [E, D, 2, F] and down [E, F, D] (transformers' `mlp.experts`)."""

    num_experts: int
    hidden: int
    intermediate: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self) -> tuple[jax.Array, jax.Array]:
        E, D, F = self.num_experts, self.hidden, self.intermediate
        gate_up = ExpertKernel(E, (D,), (2, F), ("embed",), (None, "mlp"), self.dtype, name="gate_up_proj")()
        down = ExpertKernel(E, (F,), (D,), ("mlp",), ("embed",), self.dtype, name="down_proj")()
        return gate_up, down


def _real_tokens(mask_B1TS: jax.Array | None, B: int, T: int) -> jax.Array:
    """[B*T] 1 for real tokens: a real token attends to itself, padding attends to nothing."""
    if isinstance(mask_B1TS, layers.AttentionMask):  # the mask's facts: segment 0 is padding
        seg_BS = mask_B1TS.segment_ids
        if seg_BS is None or seg_BS.shape != (B, T) or mask_B1TS.q_len != T:
            return jnp.ones((B * T,), jnp.float32)
        return (seg_BS > 0).astype(jnp.float32).reshape(B * T)
    if mask_B1TS is None or mask_B1TS.shape[0] != B or mask_B1TS.shape[-2:] != (T, T):
        return jnp.ones((B * T,), jnp.float32)
    return jnp.diagonal(mask_B1TS[:, 0], axis1=-2, axis2=-1).reshape(B * T)
