"""models/layers.py's `recomputed` parts (norms, MLP activations): the backward pass recomputes
their intermediates instead of saving them. Values and gradients must equal plain autodiff's, and
a scanned decoder's backward must keep fewer per-layer buffers than it did (six MLP-width
tensors per layer before, three now; no norm statistics)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import print_saved_residuals

from ftc.backends.jax.models import layers, llama

RNG = np.random.default_rng(0)


def _normal(*shape):
    return jnp.asarray(RNG.normal(size=shape), jnp.float32)


def _value_and_grads(fn, *args):
    out, vjp = jax.vjp(fn, *args)
    return (out, *vjp(jax.random.normal(jax.random.key(1), out.shape)))  # the same cotangent for both forms


def _assert_close(ours, ref):
    for a, b in zip(ours, ref, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["silu", "gelu_pytorch_tanh", "gelu", "quick_gelu"])
def test_gated_and_activation_equal_plain_autodiff(name):
    act = layers.ACTIVATIONS[name]
    gate, up = _normal(3, 5, 24), _normal(3, 5, 24)
    ours = _value_and_grads(lambda g, u: layers.gated(act, g, u), gate, up)
    _assert_close(ours, _value_and_grads(lambda g, u: act(g) * u, gate, up))
    ours = _value_and_grads(lambda x: layers.activation(name, x), gate)
    _assert_close(ours, _value_and_grads(act, gate))


def _plain_rms(x, w, eps, unit_offset):
    normed = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)
    return normed * (1.0 + w) if unit_offset else w * normed


def _plain_layer_norm(x, w, b, eps):
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps) * w + b


@pytest.mark.parametrize("unit_offset", [False, True])
def test_rms_norm_equals_plain_autodiff(unit_offset):
    x = _normal(2, 7, 32)
    norm = layers.RMSNorm(eps=1e-6, unit_offset=unit_offset)
    w = _normal(32)
    ours = _value_and_grads(lambda x, w: norm.apply({"params": {"weight": w}}, x), x, w)
    _assert_close(ours, _value_and_grads(lambda x, w: _plain_rms(x, w, 1e-6, unit_offset), x, w))


def test_layer_norm_equals_plain_autodiff():
    x, w, b = _normal(2, 7, 32), _normal(32), _normal(32)
    norm = layers.LayerNorm(eps=1e-5)
    ours = _value_and_grads(lambda x, w, b: norm.apply({"params": {"weight": w, "bias": b}}, x), x, w, b)
    _assert_close(ours, _value_and_grads(lambda x, w, b: _plain_layer_norm(x, w, b, 1e-5), x, w, b))


def test_scanned_decoder_keeps_three_mlp_buffers_per_layer_and_no_norm_statistics(capsys):
    L, B, T, D, F = 3, 2, 16, 32, 88
    arch = llama.config_from_hf(
        {
            "model_type": "llama",
            "vocab_size": 64,
            "hidden_size": D,
            "intermediate_size": F,
            "num_hidden_layers": L,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
        }
    )
    model = llama.build(arch)
    ids = jnp.asarray(RNG.integers(0, 64, size=(B, T)), jnp.int32)
    params = model.init(jax.random.key(0), ids)["params"]

    def loss(params):
        return jnp.sum(model.apply({"params": params}, ids) ** 2)

    capsys.readouterr()
    print_saved_residuals(loss, params)  # one line per residual: "f32[3,2,16,88] output of ..."
    saved = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    # gate, up and their product (the down projection's input); autodiff alone saved six.
    assert saved.count(f"f32[{L},{B},{T},{F}]") == 3, saved
    assert f"f32[{L},{B},{T},1]" not in saved, saved
