"""Attention masks and kernels (models/attention.py): the blockwise (flash) kernel computes what
the XLA reference computes, values and gradients, for every kind of mask, without keeping a
[T, S] array; the mask facts give the dense masks transformers' rules give."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftc.backends.jax.models import attention, layers


def _naive_attention(q_BTNH, k_BSKH, v_BSKH, mask_B1TS):
    N, K = q_BTNH.shape[2], k_BSKH.shape[2]
    k_BSNH = np.repeat(k_BSKH, N // K, axis=2)
    v_BSNH = np.repeat(v_BSKH, N // K, axis=2)
    logits_BNTS = np.einsum("btnh,bsnh->bnts", q_BTNH, k_BSNH) / np.sqrt(q_BTNH.shape[-1])
    logits_BNTS = np.where(mask_B1TS, logits_BNTS, -1e30)
    probs_BNTS = np.exp(logits_BNTS - logits_BNTS.max(-1, keepdims=True))
    probs_BNTS /= probs_BNTS.sum(-1, keepdims=True)
    return np.einsum("bnts,bsnh->btnh", probs_BNTS, v_BSNH)


def _qkv(rng, B, T, N, K, H, S=None, dtype=jnp.float32):
    S = S or T
    return (
        jnp.asarray(rng.normal(size=(B, T, N, H)), dtype),
        jnp.asarray(rng.normal(size=(B, S, K, H)), dtype),
        jnp.asarray(rng.normal(size=(B, S, K, H)), dtype),
    )


@pytest.mark.parametrize("implementation", ["blockwise", "xla"])
def test_gqa_attention_matches_naive_softmax_attention(implementation):
    q, k, v = _qkv(np.random.default_rng(0), 2, 6, 4, 2, 8)
    mask = layers.make_attention_mask(
        attention_mask=jnp.array([[1] * 6, [1] * 4 + [0] * 2]), causal=True, q_len=6, kv_len=6
    )
    out = np.asarray(layers.dot_product_attention(q, k, v, mask, implementation=implementation))
    expected = _naive_attention(np.asarray(q), np.asarray(k), np.asarray(v), np.asarray(mask.dense()))
    np.testing.assert_allclose(out[0], expected[0], atol=1e-5)
    np.testing.assert_allclose(out[1, :4], expected[1, :4], atol=1e-5)


@pytest.mark.parametrize("implementation", ["blockwise", "xla"])
def test_padding_rows_attend_nothing_and_give_no_nan(implementation):
    q = jnp.ones((1, 4, 2, 8))
    kv = jnp.ones((1, 4, 1, 8))
    mask = layers.make_attention_mask(segment_ids=jnp.array([[1, 1, 0, 0]]), causal=True, q_len=4, kv_len=4)
    dense = np.asarray(mask.dense())
    assert not dense[0, 0, 2:].any() and not dense[0, 0, :, 2:].any()

    def loss(q, kv):
        return jnp.sum(layers.dot_product_attention(q, kv, kv, mask, implementation=implementation) ** 2)

    value, grads = jax.value_and_grad(loss, argnums=(0, 1))(q, kv)
    assert np.isfinite(float(value)) and all(np.isfinite(np.asarray(g)).all() for g in grads)


def test_segments_never_attend_across_each_other():
    seg = jnp.array([[1, 1, 2, 2, 2, 3]])
    mask = np.asarray(layers.make_attention_mask(segment_ids=seg, causal=False, q_len=6, kv_len=6).dense())[0, 0]
    same = np.asarray(seg[0][:, None] == seg[0][None, :])
    np.testing.assert_array_equal(mask, same)


def test_sliding_window_matches_transformers_rule():
    mask = layers.make_attention_mask(causal=True, sliding_window=2, q_len=5, kv_len=5)
    t, s = np.meshgrid(np.arange(5), np.arange(5), indexing="ij")
    np.testing.assert_array_equal(np.asarray(mask.dense())[0, 0], (s <= t) & (s > t - 2))


def test_select_mask_switches_the_window_per_layer_and_takes_dense_masks():
    args = dict(segment_ids=jnp.array([[1, 1, 1, 2, 2, 2, 2, 0]]), causal=True, q_len=8, kv_len=8)
    full = layers.make_attention_mask(**args)
    sliding = layers.make_attention_mask(**args, sliding_window=2)
    for use_sliding, expected in ((True, sliding), (False, full)):
        chosen = layers.select_mask(jnp.asarray(use_sliding), sliding, full)
        np.testing.assert_array_equal(np.asarray(chosen.dense()), np.asarray(expected.dense()))
        dense = layers.select_mask(jnp.asarray(use_sliding), sliding.dense(), full.dense())
        np.testing.assert_array_equal(np.asarray(dense), np.asarray(expected.dense()))


SEG = [[1, 1, 1, 2, 2, 2, 2, 2, 2, 3, 3, 3, 0, 0, 0, 0, 0], [1] * 9 + [2] * 8]
CASES = {
    "causal": dict(),
    "bidirectional": dict(causal=False),
    "segments and padding": dict(segment_ids=SEG),
    "segments, bidirectional": dict(segment_ids=SEG, causal=False),
    "sliding window": dict(sliding_window=5),
    "segments and window": dict(segment_ids=SEG, sliding_window=4),
    "window switched off": dict(segment_ids=SEG, sliding_window=3, window_on=False),
    "window switched on": dict(segment_ids=SEG, sliding_window=3, window_on=True),
    "queries are the last keys": dict(q_len=5),
}


@pytest.mark.parametrize("block", [4, 7, 64])
@pytest.mark.parametrize("case", sorted(CASES))
def test_blockwise_equals_xla_values_and_gradients(case, block):
    """Tiles smaller than, not dividing, and larger than the sequence (17 keys)."""
    kw = dict(CASES[case])
    S, causal = 17, kw.pop("causal", True)
    T = kw.pop("q_len", S)
    window_on = kw.pop("window_on", None)
    seg = jnp.asarray(kw.pop("segment_ids")) if "segment_ids" in kw else None
    mask = layers.make_attention_mask(segment_ids=seg, causal=causal, q_len=T, kv_len=S, **kw)
    if window_on is not None:
        mask = mask.replace(window_on=jnp.asarray(window_on))
    rng = np.random.default_rng(3)
    q, k, v = _qkv(rng, 2, T, 6, 2, 8, S=S)
    # Rows that see no key are padding: their values are meaningless, and no loss reads them.
    seen = np.asarray(mask.dense()).any(-1)[:, 0][..., None, None]
    cotangent = jnp.asarray(rng.normal(size=q.shape), jnp.float32) * seen

    def run(implementation):
        def loss(q, k, v):
            if implementation == "blockwise":
                out = attention.blockwise_attention(q, k, v, mask, scale=0.3, block=block)
            else:
                out = layers.dot_product_attention(q, k, v, mask, scale=0.3, implementation="xla")
            return jnp.sum(out * cotangent), out

        (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
        return np.asarray(out) * seen, [np.asarray(g) for g in grads]

    out, grads = run("blockwise")
    ref_out, ref_grads = run("xla")
    np.testing.assert_allclose(out, ref_out, atol=2e-6)
    for g, ref in zip(grads, ref_grads):
        np.testing.assert_allclose(g, ref, atol=5e-6)


@pytest.mark.parametrize("case", ["causal", "segments and window", "queries are the last keys"])
def test_unrolled_tile_loops_equal_rolled_ones(case, monkeypatch):
    """Few tiles are unrolled (static indices, folded masks); many stay a loop: same numbers."""
    kw = dict(CASES[case])
    S = 17
    T = kw.pop("q_len", S)
    seg = jnp.asarray(kw.pop("segment_ids")) if "segment_ids" in kw else None
    mask = layers.make_attention_mask(segment_ids=seg, causal=True, q_len=T, kv_len=S, **kw)
    q, k, v = _qkv(np.random.default_rng(5), 2, T, 6, 2, 8, S=S)

    def run(unroll_tiles):
        monkeypatch.setattr(attention, "UNROLL_TILES", unroll_tiles)
        loss = lambda q, k, v: jnp.sum(attention.blockwise_attention(q, k, v, mask, scale=0.3, block=4) ** 2)
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)

    (rolled, rolled_grads), (unrolled, unrolled_grads) = run(0), run(10_000)
    np.testing.assert_allclose(unrolled, rolled, rtol=1e-6)
    for g, ref in zip(unrolled_grads, rolled_grads):
        np.testing.assert_allclose(g, ref, atol=1e-6)


def test_blockwise_in_bfloat16_stays_within_bfloat16_rounding_of_the_reference():
    q, k, v = _qkv(np.random.default_rng(4), 2, 40, 4, 2, 16, dtype=jnp.bfloat16)
    mask = layers.make_attention_mask(segment_ids=jnp.ones((2, 40), jnp.int32), causal=True, q_len=40, kv_len=40)
    exact = layers.dot_product_attention(*(x.astype(jnp.float32) for x in (q, k, v)), mask, implementation="xla")
    for implementation in ("blockwise", "xla"):
        out = layers.dot_product_attention(q, k, v, mask, implementation=implementation)
        assert out.dtype == jnp.bfloat16
        assert float(jnp.max(jnp.abs(out.astype(jnp.float32) - exact))) < 3e-2


def test_blockwise_backward_keeps_no_sequence_by_sequence_array():
    B, T, N, H = 1, 2048, 4, 32
    q = jax.ShapeDtypeStruct((B, T, N, H), jnp.float32)
    kv = jax.ShapeDtypeStruct((B, T, 2, H), jnp.float32)
    mask = layers.make_attention_mask(segment_ids=jnp.ones((B, T), jnp.int32), causal=True, q_len=T, kv_len=T)

    def temp_bytes(implementation):
        def loss(q, k, v):
            return jnp.sum(layers.dot_product_attention(q, k, v, mask, implementation=implementation))

        grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        return grad.lower(q, kv, kv).compile().memory_analysis().temp_size_in_bytes

    one_score_matrix = B * N * T * T * 4
    assert temp_bytes("xla") >= one_score_matrix
    assert temp_bytes("blockwise") < one_score_matrix / 4


def test_auto_takes_the_blockwise_kernel_off_gpu_and_cudnn_says_why_not(monkeypatch):
    q, k, v = _qkv(np.random.default_rng(5), 1, 8, 2, 1, 8)
    mask = layers.make_attention_mask(causal=True, q_len=8, kv_len=8)
    assert "not an NVIDIA GPU" in attention.cudnn_unsupported(q, k, mask)
    with pytest.raises(ValueError, match="cuDNN attention cannot run here"):
        layers.dot_product_attention(q, k, v, mask, implementation="cudnn")
    blockwise = layers.dot_product_attention(q, k, v, mask, implementation="blockwise")
    np.testing.assert_array_equal(np.asarray(layers.dot_product_attention(q, k, v, mask)), np.asarray(blockwise))
    monkeypatch.setenv("FTC_ATTENTION", "xla")
    xla = layers.dot_product_attention(q, k, v, mask)
    np.testing.assert_array_equal(xla, layers.dot_product_attention(q, k, v, mask, implementation="xla"))
    monkeypatch.setenv("FTC_ATTENTION", "fast")
    with pytest.raises(ValueError, match="FTC_ATTENTION"):
        layers.dot_product_attention(q, k, v, mask)


def test_a_dense_boolean_mask_still_runs_the_xla_path():
    q, k, v = _qkv(np.random.default_rng(6), 1, 3, 2, 2, 8, S=5)
    mask = layers.make_attention_mask(causal=True, q_len=3, kv_len=5)
    dense = layers.dot_product_attention(q, k, v, mask.dense())
    np.testing.assert_allclose(np.asarray(dense), np.asarray(layers.dot_product_attention(q, k, v, mask)), atol=1e-6)
