"""The decode-time attention over the key/value cache (models/kv_cache.py): on CPU a token attends
block by block over the slots filled so far, and must give what attending over every slot with
the empty ones masked gives."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftc.backends.jax.models import kv_cache


def _cache(S, index, pad_B, dtype=jnp.float32, B=3, K=2, H=8, seed=0):
    ks = jax.random.split(jax.random.key(seed), 2)
    valid_BS = jnp.arange(S)[None, :] >= jnp.asarray(pad_B)[:, None]
    return {
        "k": jax.random.normal(ks[0], (1, B, S, K, H), dtype),
        "v": jax.random.normal(ks[1], (1, B, S, K, H), dtype),
        "index": jnp.int32(index),
        "valid": valid_BS,
    }


@pytest.mark.parametrize("S", [280, 256, 408])  # 280, 408: the last block is clamped inside the cache
@pytest.mark.parametrize("window", [None, 4, 70])
def test_one_token_attending_the_filled_slots_block_by_block_equals_attending_every_slot_masked(S, window):
    B, N, K, H = 3, 6, 2, 8
    q_BTNH = jax.random.normal(jax.random.key(1), (B, 1, N, H))
    new_k, new_v = (jax.random.normal(jax.random.key(s), (B, 1, K, H)) for s in (2, 3))

    @jax.jit
    def both(cache):
        full_B1TS, sliding_B1TS = kv_cache.masks(cache, 1, window)
        mask_B1TS = sliding_B1TS if window else full_B1TS
        layer = {"k": cache["k"][0], "v": cache["v"][0]}
        out, written = kv_cache.attend(q_BTNH, new_k, new_v, layer, cache["index"], mask_B1TS, scale=H**-0.5)
        want = jax.nn.dot_product_attention(q_BTNH, written["k"], written["v"], mask=mask_B1TS, scale=H**-0.5)
        return out, want, written["k"]

    for index in [i for i in (0, 5, 63, 64, 200, 255, 279, 390, 407) if i < S]:
        cache = _cache(S, index, pad_B=[0, min(3, index), min(index, 40)])  # a query sees its own slot
        out, want, written_k = both(cache)
        np.testing.assert_allclose(np.asarray(out), np.asarray(want), rtol=2e-5, atol=2e-6, err_msg=f"index {index}")
        np.testing.assert_array_equal(written_k[:, index], new_k[:, 0])


def test_the_block_by_block_attention_is_what_cpu_decoding_runs_on_a_long_cache():
    jaxpr = jax.make_jaxpr(lambda q, k, v, layer, index, mask: kv_cache.attend(q, k, v, layer, index, mask, scale=0.1))
    cache = _cache(4 * kv_cache.FILLED_BLOCK, 10, pad_B=[0, 0, 0])
    q, kv = jnp.ones((3, 1, 4, 8)), jnp.ones((3, 1, 2, 8))
    layer = {"k": cache["k"][0], "v": cache["v"][0]}
    mask = kv_cache.masks(cache, 1, None)[0]
    assert "while" in str(jaxpr(q, kv, kv, layer, cache["index"], mask))  # the loop over filled blocks
    short = _cache(4 * kv_cache.FILLED_BLOCK - 8, 10, pad_B=[0, 0, 0])
    layer = {"k": short["k"][0], "v": short["v"][0]}
    mask = kv_cache.masks(short, 1, None)[0]
    assert "while" not in str(jaxpr(q, kv, kv, layer, short["index"], mask))  # a short cache: one pass
