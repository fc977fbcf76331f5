"""4-bit NormalFloat (NF4) blockwise quantisation of dense kernels, as QLoRA stores its frozen base.

NF4 (Dettmers et al. 2023, "QLoRA", appendix E) has 16 levels at quantiles of a standard normal,
rescaled to [-1, 1] with an exact zero; `NF4` below is bitsandbytes' table. A weight block of
`block_size` values is stored as its absolute maximum (absmax, float32) and one 4-bit level index
per value, w ~= NF4[index] * absmax. Two indices are packed into one uint8, the first of each pair
in the high nibble (bitsandbytes' order). Rounding goes to the nearest level, a value exactly
half-way going to the lower one (bitsandbytes compares with strict `>` against the midpoints).

Layout (one kernel, `lead` leading dims such as the scanned "layers" axis, then the kernel's
input dims flattened to I, then its output dims unchanged):
    codes    uint8   [*lead, I / 2,          *out]
    absmax   float32 [*lead, I / block_size, *out]
Blocks run along the flattened input dims, as bitsandbytes' do over a torch [out, in] weight, and
the output dims keep their shape, so the stored arrays keep the kernel's logical axes (and its
sharding).

Double quantisation (QLoRA's second level) stores absmax as int8 instead: per lead index the mean
(`absmax_offset`) is subtracted, then each run of 256 consecutive values (in row-major order) is
scaled symmetrically to [-127, 127] with one float32 `absmax_scale`:
    absmax_q       int8    [*lead, I / block_size, *out]
    absmax_scale   float32 [*lead, ceil(n / 256)]      n = (I / block_size) * prod(out)
    absmax_offset  float32 [*lead]
(bitsandbytes uses its 8-bit "dynamic" float code for this level; ftc uses linear int8, which keeps
the second level a few lines and still costs ~0.127 bits per weight instead of 0.5.)
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

# bitsandbytes csrc/kernels.cu (the NF4 lookup table) == QLoRA appendix E.
NF4 = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=np.float32,
)
_MIDPOINTS = ((NF4[1:] + NF4[:-1]) / 2).astype(np.float32)
SECOND_BLOCK = 256  # second-level block (QLoRA's choice)


def check_shape(in_size: int, block_size: int, where: str) -> None:
    """A kernel can be quantised when its flattened input size is a whole number of blocks."""
    if block_size < 2 or block_size % 2:
        raise ValueError(f"[method].quant_block_size={block_size}: expected an even integer >= 2")
    if in_size % block_size:
        raise ValueError(
            f"{where}: input size {in_size} is not a multiple of [method].quant_block_size={block_size}; "
            f"choose a block size that divides it (e.g. {math.gcd(in_size, block_size)})"
        )


def quantize(
    w: jax.Array, n_lead: int, n_in: int, *, block_size: int = 64, double_quant: bool = False
) -> dict[str, jax.Array]:
    """NF4-quantise `w` of shape [*lead, *in, *out] (see the module docstring for the layout)."""
    lead, in_shape, out = w.shape[:n_lead], w.shape[n_lead : n_lead + n_in], w.shape[n_lead + n_in :]
    I = math.prod(in_shape)
    check_shape(I, block_size, f"kernel {tuple(w.shape)}")
    w_blocks = w.astype(jnp.float32).reshape(*lead, I // block_size, block_size, *out)
    k = n_lead + 1  # the axis inside a block
    absmax = jnp.max(jnp.abs(w_blocks), axis=k)
    safe = jnp.where(absmax == 0, 1.0, absmax)
    normed = w_blocks / jnp.expand_dims(safe, k)
    index = jnp.searchsorted(jnp.asarray(_MIDPOINTS), normed, side="left").astype(jnp.uint8)
    pairs = index.reshape(*lead, I // 2, 2, *out)
    codes = (jnp.take(pairs, 0, axis=k) << 4) | jnp.take(pairs, 1, axis=k)
    if not double_quant:
        return {"codes": codes, "absmax": absmax}
    return {"codes": codes, **_quantize_absmax(absmax, n_lead)}


def _quantize_absmax(absmax: jax.Array, n_lead: int) -> dict[str, jax.Array]:
    lead = absmax.shape[:n_lead]
    flat = absmax.reshape(*lead, -1)
    n = flat.shape[-1]
    offset = jnp.mean(flat, axis=-1)
    centred = flat - offset[..., None]
    groups = _pad_groups(centred, n)
    scale = jnp.max(jnp.abs(groups), axis=-1) / 127.0
    q = jnp.round(groups / jnp.where(scale == 0, 1.0, scale)[..., None])
    q = jnp.clip(q, -127, 127).astype(jnp.int8).reshape(*lead, -1)[..., :n]
    return {"absmax_q": q.reshape(absmax.shape), "absmax_scale": scale, "absmax_offset": offset}


def _pad_groups(flat: jax.Array, n: int) -> jax.Array:
    pad = -n % SECOND_BLOCK
    padded = jnp.pad(flat, [(0, 0)] * (flat.ndim - 1) + [(0, pad)])
    return padded.reshape(*flat.shape[:-1], -1, SECOND_BLOCK)


def absmax_of(q: Mapping[str, jax.Array], n_lead: int) -> jax.Array:
    """The first-level scales, float32 (undoing the second level when present)."""
    if "absmax" in q:
        return q["absmax"]
    absmax_q = q["absmax_q"]
    lead = absmax_q.shape[:n_lead]
    flat = absmax_q.reshape(*lead, -1).astype(jnp.float32)
    n = flat.shape[-1]
    groups = _pad_groups(flat, n) * q["absmax_scale"][..., None]
    flat = groups.reshape(*lead, -1)[..., :n] + q["absmax_offset"][..., None]
    return flat.reshape(absmax_q.shape)


def dequantize(q: Mapping[str, jax.Array], n_lead: int, in_shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
    """[*lead, *in_shape, *out] in `dtype` from the stored arrays (products taken in float32)."""
    codes = q["codes"]
    lead, half, out = codes.shape[:n_lead], codes.shape[n_lead], codes.shape[n_lead + 1 :]
    I = 2 * half
    index = jnp.stack([codes >> 4, codes & 0xF], axis=n_lead + 1).reshape(*lead, I, *out)
    levels = jnp.take(jnp.asarray(NF4), index.astype(jnp.int32), axis=0)
    absmax = absmax_of(q, n_lead)
    block = I // absmax.shape[n_lead]
    w = levels.reshape(*lead, I // block, block, *out) * jnp.expand_dims(absmax, n_lead + 1)
    return w.reshape(*lead, *in_shape, *out).astype(dtype)


def nbytes(q: Mapping[str, jax.Array]) -> int:
    return int(sum(math.prod(a.shape) * jnp.dtype(a.dtype).itemsize for a in q.values()))


def shapes(
    lead: tuple[int, ...], in_shape: tuple[int, ...], out: tuple[int, ...], *, block_size: int, double_quant: bool
) -> dict[str, tuple[tuple[int, ...], jnp.dtype]]:
    """(shape, dtype) of each stored array for a kernel [*lead, *in_shape, *out]."""
    I = math.prod(in_shape)
    check_shape(I, block_size, f"kernel {tuple(lead) + tuple(in_shape) + tuple(out)}")
    blocks = (*lead, I // block_size, *out)
    out_shapes = {"codes": ((*lead, I // 2, *out), jnp.dtype(jnp.uint8))}
    if not double_quant:
        out_shapes["absmax"] = (blocks, jnp.dtype(jnp.float32))
        return out_shapes
    n = math.prod(blocks[len(lead) :])
    out_shapes["absmax_q"] = (blocks, jnp.dtype(jnp.int8))
    out_shapes["absmax_scale"] = ((*lead, -(-n // SECOND_BLOCK)), jnp.dtype(jnp.float32))
    out_shapes["absmax_offset"] = (tuple(lead), jnp.dtype(jnp.float32))
    return out_shapes
