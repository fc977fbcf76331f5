"""Attention: who may attend to whom (`AttentionMask`), and the kernels that compute it.

Shape suffixes as in layers.py; G = N // K query heads per key/value head, L = keys in a block.

A mask is kept as the [B, S] facts it is made of (segment ids, causality, a sliding window), not
as a [B, 1, T, S] array, so that a kernel builds only the blocks it visits and can skip the ones
causality or the window rule out. `dot_product_attention` picks a kernel:

  "cudnn"      the fused cuDNN flash-attention kernel (NVIDIA GPUs; bf16/fp16, head dim a multiple
               of 8 up to 256): causal and window masks natively, segments as a boolean mask
  "blockwise"  queries in blocks, each against only the keys it can see; the backward pass
               recomputes the probabilities from the saved log-sum-exp (flash attention's
               recipe), so no [T, S] array outlives its block
  "xla"        jax.nn.dot_product_attention's XLA path over the dense mask: the reference, and
               what a dense boolean mask (e.g. a decode step's) always runs

"auto" (the default) takes cuDNN where the platform and shapes allow it, else blockwise. The
environment variable FTC_ATTENTION (auto | cudnn | blockwise | xla) overrides it at trace time,
for benchmarks and for checking one kernel against another.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

IMPLEMENTATIONS = ("auto", "cudnn", "blockwise", "xla")
# Masked scores: finite, so a query row with no visible key gives a finite (meaningless) output.
_MASKED = -1e30


@struct.dataclass
class AttentionMask:
    """What each query may attend to, for queries that are the last T of S key positions.

    segment_ids: int [B, S] (or None: one segment, no padding); tokens attend only within their
      segment, and segment 0 is padding: it attends to nothing and nothing attends to it.
    causal: key s is visible to query t only when s <= t.
    sliding_window: HF's rule, key s visible to query t when t - s < window (None: no window).
    window_on: a traced bool [] that switches the window off (the scanned layers of a model whose
      layers differ in it); None when the window, if any, always applies.
    """

    segment_ids: jax.Array | None
    window_on: jax.Array | None = None
    q_len: int = struct.field(pytree_node=False, default=0)
    kv_len: int = struct.field(pytree_node=False, default=0)
    causal: bool = struct.field(pytree_node=False, default=True)
    sliding_window: int | None = struct.field(pytree_node=False, default=None)

    def block(self, q_start: int, q_stop: int, k_start: int, k_stop: int) -> jax.Array:
        """Boolean [B or 1, q_stop - q_start, k_stop - k_start]: True where query t may see key s."""
        offset = self.kv_len - self.q_len
        q_T1 = jnp.arange(q_start, q_stop, dtype=jnp.int32)[:, None] + offset
        k_1S = jnp.arange(k_start, k_stop, dtype=jnp.int32)[None, :]
        visible_TS = jnp.ones((q_stop - q_start, k_stop - k_start), bool)
        if self.causal:
            visible_TS &= k_1S <= q_T1
        if self.sliding_window is not None:
            in_window_TS = q_T1 - k_1S < self.sliding_window
            visible_TS &= in_window_TS if self.window_on is None else in_window_TS | ~self.window_on
        visible_BTS = visible_TS[None]
        if self.segment_ids is not None:
            q_seg_BT = self.segment_ids[:, offset + q_start : offset + q_stop]
            k_seg_BS = self.segment_ids[:, k_start:k_stop]
            same_BTS = (q_seg_BT[:, :, None] == k_seg_BS[:, None, :]) & (q_seg_BT > 0)[:, :, None]
            visible_BTS = visible_BTS & same_BTS
        return visible_BTS

    def dense(self) -> jax.Array:
        """The whole mask as boolean [B or 1, 1, T, S]."""
        return self.block(0, self.q_len, 0, self.kv_len)[:, None]

    def key_range(self, q_start: int, q_stop: int) -> tuple[int, int]:
        """The keys [start, stop) that queries [q_start, q_stop) can see at most (static)."""
        offset = self.kv_len - self.q_len
        stop = min(self.kv_len, offset + q_stop) if self.causal else self.kv_len
        start = 0
        if self.sliding_window is not None and self.window_on is None:
            start = max(0, offset + q_start - self.sliding_window + 1)
        return start, max(stop, start + 1)


def make_attention_mask(
    *,
    attention_mask: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    causal: bool,
    sliding_window: int | None = None,
    q_len: int,
    kv_len: int,
) -> AttentionMask:
    """The mask for queries that are the last `q_len` of `kv_len` positions (T == S in training).

    attention_mask / segment_ids are [B, S] over the keys. Tokens never attend across segment
    ids; segment 0 and attention_mask 0 mark padding, which attends to nothing and is attended by
    nothing. Sliding window follows HF: key s is visible to query t when t - s < sliding_window.
    `.dense()` gives the boolean [B, 1, T, S] array (B is 1 without attention_mask/segment_ids).
    """
    segments = segment_ids
    if attention_mask is not None:
        valid_BS = attention_mask.astype(bool)
        ids_BS = jnp.ones(valid_BS.shape, jnp.int32) if segments is None else segments.astype(jnp.int32)
        segments = jnp.where(valid_BS, ids_BS, 0)
    elif segments is not None:
        segments = segments.astype(jnp.int32)
    return AttentionMask(segments, None, q_len, kv_len, causal, sliding_window)


def select_mask(use_first: jax.Array, first, second):
    """`first` where the traced bool `use_first` holds, else `second`: for scanned layers that
    differ in their mask. Two AttentionMasks that differ only in the sliding window become one
    whose window is switched by `use_first`; dense masks are selected element-wise."""
    if isinstance(first, AttentionMask) and isinstance(second, AttentionMask):
        if second.sliding_window is None and first.sliding_window is not None:
            return first.replace(window_on=use_first)
        if first.sliding_window is None and second.sliding_window is not None:
            return second.replace(window_on=~use_first)
        raise ValueError("select_mask: the two masks must differ only in one having a sliding window")
    to_dense = lambda m: m.dense() if isinstance(m, AttentionMask) else m
    return jnp.where(use_first, to_dense(first), to_dense(second))


# ---------------------------------------------------------------- dispatch


def dot_product_attention(
    q_BTNH: jax.Array,
    k_BSKH: jax.Array,
    v_BSKH: jax.Array,
    mask: AttentionMask | jax.Array | None,
    *,
    scale: float | None = None,
    implementation: str | None = None,
) -> jax.Array:
    """softmax(q k^T * scale + mask) v with GQA (K divides N); logits and softmax in float32.

    `mask`: an AttentionMask (any kernel), a boolean [B or 1, 1, T, S] array or None (the XLA
    path). `implementation`: one of IMPLEMENTATIONS (None: FTC_ATTENTION, else "auto"); asking
    for "cudnn" where it cannot run raises, "auto" falls back to "blockwise". Query rows that see
    no key (padding) give finite values, never NaN.
    """
    N, K, H = q_BTNH.shape[2], k_BSKH.shape[2], q_BTNH.shape[3]
    if N % K:
        raise ValueError(f"query heads ({N}) must be a multiple of key/value heads ({K})")
    scale = H**-0.5 if scale is None else float(scale)
    impl = implementation or os.environ.get("FTC_ATTENTION") or "auto"
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {impl!r}; expected one of {IMPLEMENTATIONS} (FTC_ATTENTION)")
    if not isinstance(mask, AttentionMask):
        return jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, mask=mask, scale=scale)
    if impl == "auto":
        impl = "cudnn" if cudnn_unsupported(q_BTNH, k_BSKH, mask) is None else "blockwise"
    if impl == "xla":
        return jax.nn.dot_product_attention(q_BTNH, k_BSKH, v_BSKH, mask=mask.dense(), scale=scale)
    if impl == "cudnn":
        reason = cudnn_unsupported(q_BTNH, k_BSKH, mask)
        if reason:
            raise ValueError(f"cuDNN attention cannot run here: {reason}")
        return _cudnn_attention(q_BTNH, k_BSKH, v_BSKH, mask, scale)
    return blockwise_attention(q_BTNH, k_BSKH, v_BSKH, mask, scale=scale)


def cudnn_unsupported(q_BTNH: jax.Array, k_BSKH: jax.Array, mask: AttentionMask) -> str | None:
    """Why the cuDNN kernel cannot take this call (None: it can). Its constraints, as
    jax.nn.dot_product_attention(implementation="cudnn") states them."""
    if jax.default_backend() != "gpu" or "NVIDIA" not in str(getattr(jax.devices()[0], "device_kind", "")).upper():
        return f"the platform is {jax.default_backend()}, not an NVIDIA GPU"
    if q_BTNH.dtype not in (jnp.bfloat16, jnp.float16):
        return f"dtype {q_BTNH.dtype} (cuDNN takes bfloat16 or float16)"
    H = q_BTNH.shape[-1]
    if H % 8 or H > 256:
        return f"head dim {H} (cuDNN takes a multiple of 8 up to 256)"
    if mask.q_len != mask.kv_len:
        return "queries are not the keys (T != S)"
    if mask.q_len % 2:
        return f"odd sequence length {mask.q_len} with a mask"
    if mask.sliding_window is not None and not mask.causal:
        return "a sliding window without causality"
    return None


def _cudnn_attention(q_BTNH, k_BSKH, v_BSKH, mask: AttentionMask, scale: float) -> jax.Array:
    # cuDNN applies causality and a static window itself (skipping the blocks they rule out);
    # segments and a switched window go in as a boolean mask (an additive bias inside cuDNN).
    dense = mask.segment_ids is not None or (mask.sliding_window is not None and mask.window_on is not None)
    window = mask.sliding_window if mask.window_on is None else None
    return jax.nn.dot_product_attention(
        q_BTNH,
        k_BSKH,
        v_BSKH,
        mask=mask.dense() if dense else None,
        scale=scale,
        is_causal=mask.causal,
        local_window_size=None if window is None else (window - 1, 0),
        implementation="cudnn",
    )


# ---------------------------------------------------------------- blockwise kernel


def query_block(q_len: int) -> int:
    """Rows and columns of a tile: small tiles stay in a CPU core's cache, larger ones amortise
    the loop's per-tile cost at long sequences and on accelerators. CPU sizes from a sweep at 2,048
    tokens (`python -m bench.kernels --seq-len T --block B`): sequence 256 is fastest at 64 (16.3 ms
    forward + backward, 18.6 at 128), 512 / 1,024 / 2,048 at 256 (33.6 / 63.7 / 97.0 ms against
    46.9 / 93.3 / 142.2 at the 64 / 64 / 128 used before)."""
    if jax.default_backend() != "cpu":
        return min(q_len, 512)
    return min(q_len, 64 if q_len <= 256 else 256)


# Short sequences' tile loops are unrolled: with static tile indices XLA folds the masks of tiles
# that need none and slices statically, which at 64-wide tiles is most of their cost (bench/'s cpu
# config, sequence 256 = 10 tiles each way: forward + backward 24.7 -> 16.3 ms a layer, the step
# -10%, compile +0.9 s). Only short ones: unrolled, XLA keeps every tile's temporaries at once
# (1.6x a dense [T, S] matrix of scores at sequence 256; at 1,024 it would be 25 MiB against 4.8
# MiB rolled), and at 256-wide tiles the loop costs little (sequence 1,024: 47.2 ms rolled, 63.7
# unrolled). UNROLL_TILES bounds the compile time where tiles are small (tests use 4).
UNROLL_SCORES = 256 * 256
UNROLL_TILES = 16


def _unroll(pairs: np.ndarray, mask: AttentionMask) -> int:
    short = mask.q_len * mask.kv_len <= UNROLL_SCORES
    return max(len(pairs), 1) if short and len(pairs) <= UNROLL_TILES else 1


def blockwise_attention(q_BTNH, k_BSKH, v_BSKH, mask: AttentionMask, *, scale: float, block: int | None = None):
    """Flash attention: [block x block] tiles of queries against keys, visited one at a time in a
    loop (only the tiles causality and a static window leave visible), float32 scores with an
    online softmax, and a backward pass that recomputes each tile's probabilities from the saved
    log-sum-exp. Nothing [T, S]-sized is ever stored."""
    B, T, N, H = q_BTNH.shape
    S, K = k_BSKH.shape[1], k_BSKH.shape[2]
    b = block or query_block(T)
    Tp, Sp = -(-T // b) * b, -(-S // b) * b
    pad = lambda x, n: jnp.pad(x, [(0, 0), (0, n - x.shape[1])] + [(0, 0)] * (x.ndim - 2))
    q_BKTGH = pad(q_BTNH, Tp).reshape(B, Tp, K, N // K, H).transpose(0, 2, 1, 3, 4)
    k_BKSH = pad(k_BSKH, Sp).transpose(0, 2, 1, 3)
    v_BKSH = pad(v_BSKH, Sp).transpose(0, 2, 1, 3)
    segments = mask.segment_ids
    if segments is not None or Sp != S:
        ids = jnp.ones((1, S), jnp.int32) if segments is None else segments
        segments = pad(ids, Sp + b)  # padding keys and queries: segment 0 (queries may run past S)
    tiles = Tiles(b, _pairs(mask, b, by_query=True), _pairs(mask, b, by_query=False), segments)
    out_BKTGH = _flash(q_BKTGH, k_BKSH, v_BKSH, mask, tiles, scale)
    return out_BKTGH.transpose(0, 2, 1, 3, 4).reshape(B, Tp, N, H)[:, :T]


@struct.dataclass
class Tiles:
    """Which [size x size] tiles a kernel visits: (query block, key block, first-of-its-run) rows,
    ordered by query block (forward) and by key block (backward); segment ids padded to the tiles."""

    size: int = struct.field(pytree_node=False)
    forward: np.ndarray = struct.field(pytree_node=False)
    backward: np.ndarray = struct.field(pytree_node=False)
    segment_ids: jax.Array | None = None


def _pairs(mask: AttentionMask, b: int, *, by_query: bool) -> np.ndarray:
    pairs = []
    for i in range(-(-mask.q_len // b)):
        k0, k1 = mask.key_range(i * b, min((i + 1) * b, mask.q_len))
        pairs += [(i, j) for j in range(k0 // b, -(-k1 // b))]
    if not by_query:
        pairs.sort(key=lambda ij: (ij[1], ij[0]))
    run = [p[0] if by_query else p[1] for p in pairs]
    first = [n == 0 or run[n] != run[n - 1] for n in range(len(pairs))]
    return np.array([(i, j, f) for (i, j), f in zip(pairs, first)], np.int32).reshape(-1, 3)


def _tile_mask(mask: AttentionMask, tiles: Tiles, i, j):
    """Boolean [B|1, 1, b, 1, b] for query block i against key block j (traced indices)."""
    b = tiles.size
    offset = mask.kv_len - mask.q_len
    q_T1 = (i * b + jnp.arange(b, dtype=jnp.int32))[:, None]
    k_1S = (j * b + jnp.arange(b, dtype=jnp.int32))[None, :]
    visible = jnp.ones((b, b), bool)
    if mask.causal:
        visible &= k_1S <= q_T1 + offset
    if mask.sliding_window is not None:
        in_window = q_T1 + offset - k_1S < mask.sliding_window
        visible &= in_window if mask.window_on is None else in_window | ~mask.window_on
    visible = visible[None]
    if tiles.segment_ids is not None:
        q_seg = jax.lax.dynamic_slice_in_dim(tiles.segment_ids, i * b + offset, b, axis=1)
        k_seg = jax.lax.dynamic_slice_in_dim(tiles.segment_ids, j * b, b, axis=1)
        visible = visible & (q_seg[:, :, None] == k_seg[:, None, :]) & (q_seg > 0)[:, :, None]
    return visible[:, None, :, None, :]


_BATCH = ((0, 1), (0, 1))


def _dot(x, y, contract_x, contract_y):
    return jax.lax.dot_general(x, y, ((contract_x, contract_y), _BATCH), preferred_element_type=jnp.float32)


def _block(x, index, b, axis=2):
    return jax.lax.dynamic_slice_in_dim(x, index * b, b, axis=axis)


def _forward(q_BKTGH, k_BKSH, v_BKSH, mask, tiles, scale):
    b = tiles.size
    B, K, Tp, G, H = q_BKTGH.shape

    def tile(carry, pair):
        m, l, acc, out, lse = carry
        i, j, first = pair[0], pair[1], pair[2] > 0
        s = _dot(_block(q_BKTGH, i, b), _block(k_BKSH, j, b), (4,), (3,)) * jnp.float32(scale)
        s = jnp.where(_tile_mask(mask, tiles, i, j), s, _MASKED)  # [B, K, b, G, b]
        m0 = jnp.where(first, _MASKED, m)
        m1 = jnp.maximum(m0, jnp.max(s, axis=-1))
        p = jnp.exp(s - m1[..., None])
        correction = jnp.exp(m0 - m1)
        l = jnp.where(first, 0.0, l) * correction + jnp.sum(p, axis=-1)
        pv = _dot(p.astype(v_BKSH.dtype), _block(v_BKSH, j, b), (4,), (2,))
        acc = jnp.where(first, 0.0, acc) * correction[..., None] + pv
        # A row that has seen no key (padding) gives 0, and lse = +inf makes its recomputed
        # probabilities 0 in the backward pass: no gradient, never NaN.
        seen = m1 > _MASKED / 2
        out = jax.lax.dynamic_update_slice_in_dim(out, jnp.where(seen[..., None], acc / l[..., None], 0.0), i * b, 2)
        lse = jax.lax.dynamic_update_slice_in_dim(lse, jnp.where(seen, m1 + jnp.log(l), jnp.inf), i * b, 2)
        return (m1, l, acc, out, lse), None

    row = jnp.zeros((B, K, b, G), jnp.float32)
    init = (
        row,
        row,
        jnp.zeros((B, K, b, G, H), jnp.float32),
        jnp.zeros(q_BKTGH.shape, jnp.float32),
        jnp.zeros((B, K, Tp, G), jnp.float32),
    )
    (_, _, _, out, lse), _ = jax.lax.scan(tile, init, jnp.asarray(tiles.forward), unroll=_unroll(tiles.forward, mask))
    return out.astype(q_BKTGH.dtype), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash(q_BKTGH, k_BKSH, v_BKSH, mask, tiles, scale):
    return _forward(q_BKTGH, k_BKSH, v_BKSH, mask, tiles, scale)[0]


def _flash_fwd(q_BKTGH, k_BKSH, v_BKSH, mask, tiles, scale):
    out, lse = _forward(q_BKTGH, k_BKSH, v_BKSH, mask, tiles, scale)
    return out, (q_BKTGH, k_BKSH, v_BKSH, mask, tiles, out, lse)


def _flash_bwd(scale, res, dout_BKTGH):
    q_BKTGH, k_BKSH, v_BKSH, mask, tiles, out_BKTGH, lse_BKTG = res
    b, dtype = tiles.size, q_BKTGH.dtype
    B, K, Sp, H = k_BKSH.shape
    # delta = rowsum(dO * O): the softmax backward's correction term, once for all tiles.
    delta_BKTG = jnp.sum(dout_BKTGH.astype(jnp.float32) * out_BKTGH.astype(jnp.float32), axis=-1)
    rows = (2, 3)  # contract the query rows (T, G): the [b, b] operand stays on the right, untransposed

    def tile(carry, pair):
        dkT_j, dvT_j, dq, dkT, dvT = carry
        i, j, first = pair[0], pair[1], pair[2] > 0
        q, do = _block(q_BKTGH, i, b), _block(dout_BKTGH, i, b)
        k, v = _block(k_BKSH, j, b), _block(v_BKSH, j, b)
        s = _dot(q, k, (4,), (3,)) * jnp.float32(scale)
        s = jnp.where(_tile_mask(mask, tiles, i, j), s, _MASKED)
        p = jnp.exp(s - _block(lse_BKTG, i, b)[..., None])
        dvT_j = jnp.where(first, 0.0, dvT_j) + _dot(do, p.astype(dtype), rows, rows)  # [B, K, H, b]
        dp = _dot(do, v, (4,), (3,))
        ds = (p * (dp - _block(delta_BKTG, i, b)[..., None]) * jnp.float32(scale)).astype(dtype)
        dq = jax.lax.dynamic_update_slice_in_dim(dq, _block(dq, i, b) + _dot(ds, k, (4,), (2,)), i * b, 2)
        dkT_j = jnp.where(first, 0.0, dkT_j) + _dot(q, ds, rows, rows)
        dkT = jax.lax.dynamic_update_slice_in_dim(dkT, dkT_j, j * b, 3)
        dvT = jax.lax.dynamic_update_slice_in_dim(dvT, dvT_j, j * b, 3)
        return (dkT_j, dvT_j, dq, dkT, dvT), None

    col = jnp.zeros((B, K, H, b), jnp.float32)
    full = jnp.zeros((B, K, H, Sp), jnp.float32)
    init = (col, col, jnp.zeros(q_BKTGH.shape, jnp.float32), full, full)
    (_, _, dq, dkT, dvT), _ = jax.lax.scan(
        tile, init, jnp.asarray(tiles.backward), unroll=_unroll(tiles.backward, mask)
    )
    zero = jax.tree.map(_zero_cotangent, (mask, tiles))
    return (dq.astype(dtype), dkT.transpose(0, 1, 3, 2).astype(k_BKSH.dtype),
            dvT.transpose(0, 1, 3, 2).astype(v_BKSH.dtype), *zero)  # fmt: skip


def _zero_cotangent(x):
    x = jnp.asarray(x)
    if jnp.issubdtype(x.dtype, jnp.floating):
        return jnp.zeros_like(x)
    return np.zeros(x.shape, jax.dtypes.float0)


_flash.defvjp(_flash_fwd, _flash_bwd)
