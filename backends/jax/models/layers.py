"""Building blocks shared by the model families: norms, rotary embeddings, attention.

Shape suffixes: B batch, T query length, S key/value length, D embed, N query heads,
K key/value heads, H head dim, F mlp hidden, V vocab.

Every parameter is created through `nn.with_logical_partitioning` with names from
`family.LOGICAL_AXES`, so the compiler shards it by rules. Parameters are stored in
`param_dtype` (float32 by default) and cast to the compute `dtype` where they are used.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

# The families reach attention through this module; its kernels live in attention.py.
from ftc.backends.jax.models.attention import (  # noqa: F401
    AttentionMask,
    dot_product_attention,
    make_attention_mask,
    select_mask,
)

Dtype = Any

default_kernel_init = nn.initializers.normal(stddev=0.02)


def param_with_axes(module: nn.Module, name: str, init, shape, axes: tuple[str, ...], dtype: Dtype):
    """`module.param` whose value carries logical axis names (boxed as nn.LogicallyPartitioned)."""
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


# ---------------------------------------------------------------- norms


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in float32 as Hugging Face does.

    `unit_offset=False` (Llama, Mistral, Qwen): weight * normalize(x).astype(dtype), weight init 1.
    `unit_offset=True` (Gemma): (normalize(x) * (1 + weight)).astype(dtype), weight init 0.
    The two forms round differently in low precision; each matches its HF original.
    """

    eps: float = 1e-6
    unit_offset: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        init = nn.initializers.zeros if self.unit_offset else nn.initializers.ones
        weight_D = param_with_axes(self, "weight", init, (x_BTD.shape[-1],), ("norm",), self.param_dtype)
        return recomputed(self._norm)(x_BTD, weight_D)

    def _norm(self, x_BTD, weight_D):
        x32_BTD = x_BTD.astype(jnp.float32)
        normed_BTD = x32_BTD * jax.lax.rsqrt(jnp.mean(x32_BTD * x32_BTD, axis=-1, keepdims=True) + self.eps)
        if self.unit_offset:
            return (normed_BTD * (1.0 + weight_D.astype(jnp.float32))).astype(self.dtype)
        return weight_D.astype(self.dtype) * normed_BTD.astype(self.dtype)


class LayerNorm(nn.Module):
    """LayerNorm with weight/bias named like torch (`weight`, `bias`), statistics in float32."""

    eps: float = 1e-5
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        D = x_BTD.shape[-1]
        weight_D = param_with_axes(self, "weight", nn.initializers.ones, (D,), ("norm",), self.param_dtype)
        bias_D = None
        if self.use_bias:
            bias_D = param_with_axes(self, "bias", nn.initializers.zeros, (D,), ("norm",), self.param_dtype)
        return recomputed(self._norm)(x_BTD, weight_D, bias_D)

    def _norm(self, x_BTD, weight_D, bias_D):
        x32_BTD = x_BTD.astype(jnp.float32)
        mean_BT1 = jnp.mean(x32_BTD, axis=-1, keepdims=True)
        var_BT1 = jnp.mean(jnp.square(x32_BTD - mean_BT1), axis=-1, keepdims=True)
        y_BTD = (x32_BTD - mean_BT1) * jax.lax.rsqrt(var_BT1 + self.eps) * weight_D.astype(jnp.float32)
        if bias_D is not None:
            y_BTD = y_BTD + bias_D.astype(jnp.float32)
        return y_BTD.astype(self.dtype)


# ---------------------------------------------------------------- dense


class Dense(nn.Module):
    """y = x @ kernel (+ bias) over the last `len(in_axes)` dims of x.

    `in_shape`/`out_shape` name the kernel layout, e.g. q_proj: in (D,) axes ("embed",),
    out (N, H) axes ("heads", "head_dim"); kernel shape is in_shape + out_shape.
    """

    out_shape: tuple[int, ...]
    in_axes: tuple[str, ...]
    out_axes: tuple[str, ...]
    use_bias: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Any = default_kernel_init

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        n_in = len(self.in_axes)
        in_shape = tuple(x.shape[-n_in:])
        kernel = param_with_axes(
            self,
            "kernel",
            self.kernel_init,
            in_shape + tuple(self.out_shape),
            tuple(self.in_axes) + tuple(self.out_axes),
            self.param_dtype,
        )
        y = linear(x.astype(self.dtype), kernel.astype(self.dtype), n_in)
        if self.use_bias:
            bias = param_with_axes(
                self, "bias", nn.initializers.zeros, tuple(self.out_shape), tuple(self.out_axes), self.param_dtype
            )
            y = y + bias.astype(self.dtype)
        return y


LINEAR_OUT = "ftc_linear_out"


def linear(x: jax.Array, kernel: jax.Array, n_in: int) -> jax.Array:
    """x @ kernel, contracting x's last `n_in` dims with the kernel's first `n_in`.

    On CPU the backward pass is written out (`_linear_cpu`) so that the weight gradient's dot
    transposes the smaller of its two operands; elsewhere jax's own rule (cuBLAS and TPU dots
    take transposed operands for free)."""
    if jax.default_backend() == "cpu":
        # Named, because remat's "dots" policy sees a custom_vjp call, not the dot inside it: it
        # saved nothing, as "full" does (the same compiled memory, measured).
        return checkpoint_name(_linear_cpu(x, kernel, n_in), LINEAR_OUT)
    return jax.lax.dot_general(x, kernel, ((tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in))), ((), ())))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _linear_cpu(x, kernel, n_in):
    return jax.lax.dot_general(x, kernel, ((tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in))), ((), ())))


def _linear_cpu_fwd(x, kernel, n_in):
    return _linear_cpu(x, kernel, n_in), (x, kernel)


def _linear_cpu_bwd(n_in, res, g):
    x, kernel = res
    n_out = kernel.ndim - n_in
    dx = jax.lax.dot_general(
        g, kernel, ((tuple(range(g.ndim - n_out, g.ndim)), tuple(range(n_in, kernel.ndim))), ((), ()))
    )
    I, O = math.prod(kernel.shape[:n_in]), math.prod(kernel.shape[n_in:])
    x_MI, g_MO = x.reshape(-1, I), g.reshape(-1, O)
    if I <= O:
        # XLA:CPU's dots take the right operand as [contracted, free] and would copy the [M, O]
        # gradient into [O, M] (an untiled strided copy, the largest data movement of a step,
        # e.g. the LM head's [tokens, vocab]); transposing the smaller x instead, behind a
        # barrier that keeps XLA from swapping the operands back, moves I/O times fewer bytes.
        x_IM = jax.lax.optimization_barrier(x_MI.T)
        dk = jax.lax.dot_general(x_IM, g_MO, (((1,), (0,)), ((), ())))
    else:
        dk = jax.lax.dot_general(x_MI, g_MO, (((0,), (0,)), ((), ())))
    return dx, dk.reshape(kernel.shape).astype(kernel.dtype)


_linear_cpu.defvjp(_linear_cpu_fwd, _linear_cpu_bwd)


# ---------------------------------------------------------------- rotary embeddings


@dataclasses.dataclass(frozen=True)
class Rope:
    """RoPE settings (hashable, so it can live in a frozen arch dataclass).

    kind: "default" | "linear" | "llama3" (the HF `rope_type`).
    """

    theta: float = 10000.0
    kind: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    SUPPORTED = ("default", "linear", "llama3")

    @classmethod
    def from_hf(cls, hf_config: dict) -> Rope:
        """Reads transformers 5 `rope_parameters` or the older `rope_theta` + `rope_scaling`, with
        transformers 5's precedence (RotaryEmbeddingConfigMixin.convert_rope_params_to_dict): a
        non-empty `rope_scaling` replaces `rope_parameters` whole (the two are not merged), a
        rope_theta the dict lacks comes from the top-level key, and llama3's
        original_max_position_embeddings from a top-level key before the dict's."""
        legacy = hf_config.get("rope_scaling")
        key = "rope_scaling" if legacy else "rope_parameters"
        params = dict(legacy or hf_config.get("rope_parameters") or {})
        theta = params.get("rope_theta", hf_config.get("rope_theta", 10000.0))
        kind = params.get("rope_type", params.get("type", "default")) or "default"
        type_key = "type" if "rope_type" not in params and "type" in params else "rope_type"
        if kind not in cls.SUPPORTED:
            raise ValueError(
                f"config.json {key}.{type_key}={kind!r} is not supported; "
                f"ftc supports rope_type in: {', '.join(cls.SUPPORTED)}"
            )
        if params.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError(
                f"config.json {key}.partial_rotary_factor={params['partial_rotary_factor']!r} is not supported; "
                "ftc rotates the whole head (expected 1.0 or no key)"
            )
        rope = cls(theta=float(theta), kind=kind)
        if kind == "linear":
            rope = dataclasses.replace(rope, factor=float(params["factor"]))
        elif kind == "llama3":
            rope = dataclasses.replace(
                rope,
                factor=float(params["factor"]),
                low_freq_factor=float(params["low_freq_factor"]),
                high_freq_factor=float(params["high_freq_factor"]),
                # transformers reads a top-level key first (Phi-3 style configs keep it there),
                # then the dict's, then falls back to max_position_embeddings.
                original_max_position_embeddings=int(
                    hf_config.get("original_max_position_embeddings")
                    or params.get("original_max_position_embeddings", hf_config.get("max_position_embeddings"))
                ),
            )
        return rope

    def to_hf(self) -> dict:
        """The `rope_parameters` dict transformers 5 reads (also valid as legacy `rope_scaling`)."""
        out: dict[str, Any] = {"rope_type": self.kind, "rope_theta": self.theta}
        if self.kind in ("linear", "llama3"):
            out["factor"] = self.factor
        if self.kind == "llama3":
            out["low_freq_factor"] = self.low_freq_factor
            out["high_freq_factor"] = self.high_freq_factor
            out["original_max_position_embeddings"] = self.original_max_position_embeddings
        return out

    def inv_freq(self, head_dim: int) -> np.ndarray:
        """Inverse frequencies [H/2] in float32, computed like transformers (float32 throughout)."""
        exponent = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
        # theta ** exponent rounded once to float32, then a float32 reciprocal: this reproduces
        # torch's float32 values (numpy's float32 pow differs from torch's in the last bit for a
        # few entries, which moves logits of a 30-layer model by ~1e-4).
        power = (np.float64(self.theta) ** exponent.astype(np.float64)).astype(np.float32)
        inv_freq = (np.float32(1.0) / power).astype(np.float32)
        if self.kind == "linear":
            inv_freq = (inv_freq / np.float32(self.factor)).astype(np.float32)
        elif self.kind == "llama3":
            old_len = self.original_max_position_embeddings
            low_freq_wavelen = old_len / self.low_freq_factor
            high_freq_wavelen = old_len / self.high_freq_factor
            wavelen = (2 * math.pi / inv_freq).astype(np.float32)
            scaled = np.where(wavelen > low_freq_wavelen, inv_freq / np.float32(self.factor), inv_freq)
            smooth = (old_len / wavelen - self.low_freq_factor) / (self.high_freq_factor - self.low_freq_factor)
            smoothed = (1 - smooth) * scaled / np.float32(self.factor) + smooth * scaled
            is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
            inv_freq = np.where(is_medium, smoothed, scaled).astype(np.float32)
        return inv_freq


def rope_cos_sin(positions_BT: jax.Array, inv_freq_H2: np.ndarray, dtype: Dtype) -> tuple[jax.Array, jax.Array]:
    """cos/sin [B, T, H] computed in float32, then cast to the compute dtype (as HF does)."""
    freqs_BTH2 = positions_BT.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq_H2, jnp.float32)
    emb_BTH = jnp.concatenate([freqs_BTH2, freqs_BTH2], axis=-1)
    return jnp.cos(emb_BTH).astype(dtype), jnp.sin(emb_BTH).astype(dtype)


def apply_rope(x_BTNH: jax.Array, cos_BTH: jax.Array, sin_BTH: jax.Array) -> jax.Array:
    """HF's rotate-half RoPE: the two halves of the head dim form the (real, imag) pairs."""
    half = x_BTNH.shape[-1] // 2
    rotated_BTNH = jnp.concatenate([-x_BTNH[..., half:], x_BTNH[..., :half]], axis=-1)
    return x_BTNH * cos_BTH[:, :, None, :] + rotated_BTNH * sin_BTH[:, :, None, :]


# ---------------------------------------------------------------- positions and masks


def positions_from_segments(segment_ids_BT: jax.Array) -> jax.Array:
    """Position of each token inside its packed segment (restarts at 0 where the id changes)."""
    B, T = segment_ids_BT.shape
    index_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    previous_BT = jnp.pad(segment_ids_BT[:, :-1], ((0, 0), (1, 0)), constant_values=-1)
    start_BT = jnp.where(segment_ids_BT != previous_BT, index_BT, 0)
    return index_BT - jax.lax.cummax(start_BT, axis=1)


def default_positions(input_ids_BT: jax.Array, segment_ids_BT: jax.Array | None = None) -> jax.Array:
    """Per-segment positions when packed, else 0..T-1 (what transformers uses without position_ids)."""
    if segment_ids_BT is not None:
        return positions_from_segments(segment_ids_BT)
    B, T = input_ids_BT.shape
    return jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))


# ---------------------------------------------------------------- activations and remat

# transformers' ACT2FN names for the activations the families' checkpoints use, computed as
# transformers computes them (gelu_new / gelu_fast / gelu_pytorch_tanh are the tanh form).
ACTIVATIONS = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    # The rest of ACT2FN's stateless functions (tests/models/test_layers.py checks each against it).
    "gelu_python": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_accurate": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_python_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_10": lambda x: jnp.clip(jax.nn.gelu(x, approximate=False), -10.0, 10.0),
    "relu6": jax.nn.relu6,
    "relu2": lambda x: jnp.square(jax.nn.relu(x)),
    "leaky_relu": lambda x: jax.nn.leaky_relu(x, 0.01),  # torch.nn.LeakyReLU's default slope
    "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x)),
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
    "linear": lambda x: x,
}


def recomputed(fn):
    """`fn` whose backward pass recomputes its intermediates from its inputs instead of saving them.

    For the cheap elementwise and row-wise parts of a block (norms, activations): autodiff would
    otherwise save every intermediate for the backward pass, and in the layer scan each one is a
    `[layers, tokens, width]` buffer written in the forward and read back (the gated MLP saved six
    `[tokens, intermediate]` tensors, three with this). Recomputing them costs a few elementwise
    ops that XLA fuses into the backward's own."""
    return jax.checkpoint(fn, policy=jax.checkpoint_policies.nothing_saveable, prevent_cse=False)


def gated(act, gate: jax.Array, up: jax.Array) -> jax.Array:
    """act(gate) * up, a gated MLP's hidden activation (`act` from ACTIVATIONS), recomputed in the backward pass."""
    return recomputed(lambda g, u: act(g) * u)(gate, up)


def activation(name: str, x: jax.Array) -> jax.Array:
    """ACTIVATIONS[name](x), recomputed in the backward pass (gelu's tanh form saves several intermediates)."""
    return recomputed(ACTIVATIONS[name])(x)


# The spec's `training.remat` values (schema enum); an arch dataclass carries one as `remat`.
REMAT_POLICIES = ("none", "full", "dots")


def check_activation(name: str, key: str) -> None:
    """Refuses a config.json activation (`key` = its config key) that ACTIVATIONS does not compute."""
    if name not in ACTIVATIONS:
        raise ValueError(f"config.json {key}={name!r} is not supported; ftc supports: {', '.join(sorted(ACTIVATIONS))}")


def check_remat(policy: str) -> None:
    if policy not in REMAT_POLICIES:
        raise ValueError(f"remat={policy!r}; expected one of {REMAT_POLICIES}")


def remat_block(block_cls, policy: str):
    """The block class wrapped for rematerialisation by the spec's `training.remat` policy.

    "full" saves nothing inside a block; "dots" keeps the weight matmuls (no batch dims) and
    recomputes attention scores and elementwise work; "none" returns the class unchanged.
    """
    if policy == "none":
        return block_cls
    dots = jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        jax.checkpoint_policies.save_only_these_names(LINEAR_OUT),  # linear(): CPU's weight matmuls
    )
    checkpoint_policy = None if policy == "full" else dots
    return nn.remat(block_cls, policy=checkpoint_policy, prevent_cse=False)
