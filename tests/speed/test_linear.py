"""models/layers.py's `linear`: on CPU its backward pass is written out (the weight gradient's dot
transposes the smaller operand); it must give exactly what jax's own dot_general rule gives, for
every layout the families use, and be what `Dense` runs on CPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ftc.backends.jax.models import layers

# (x shape, kernel shape, contracted dims): q/k/v and MLP up (I < O), o_proj from (N, H) (two
# contracted dims), MLP down (I > O), an LM head (I << O), and a 2-d input.
LAYOUTS = {
    "qkv [B,T,D] x [D,N,H]": ((2, 5, 16), (16, 4, 8), 1),
    "o_proj [B,T,N,H] x [N,H,D]": ((2, 5, 4, 8), (4, 8, 16), 2),
    "mlp down [B,T,F] x [F,D]": ((2, 5, 48), (48, 16), 1),
    "lm head [B,T,D] x [D,V]": ((2, 5, 16), (16, 256), 1),
    "2-d [M,I] x [I,O]": ((7, 24), (24, 24), 1),
}


def _reference(x, kernel, n_in):
    contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
    return jax.lax.dot_general(x, kernel, (contract, ((), ())))


def _value_and_grads(fn, x, kernel, n_in, cotangent):
    out, vjp = jax.vjp(lambda x, k: fn(x, k, n_in), x, kernel)
    return (out, *vjp(cotangent))


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_written_out_backward_equals_jax_rule_in_float32(layout):
    x_shape, k_shape, n_in = LAYOUTS[layout]
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=x_shape), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=k_shape), jnp.float32)
    out_shape = x_shape[: len(x_shape) - n_in] + k_shape[n_in:]
    cotangent = jnp.asarray(rng.normal(size=out_shape), jnp.float32)
    ours = jax.jit(lambda x, k, g: _value_and_grads(layers._linear_cpu, x, k, n_in, g))(x, kernel, cotangent)
    ref = jax.jit(lambda x, k, g: _value_and_grads(_reference, x, k, n_in, g))(x, kernel, cotangent)
    for name, a, b in zip(("value", "dx", "dkernel"), ours, ref):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        # Same products, possibly summed in another order: float32 rounding only.
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5, err_msg=name)


def test_written_out_backward_keeps_bfloat16_dtypes_and_values():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(3, 6, 32)), jnp.bfloat16)
    kernel = jnp.asarray(rng.normal(size=(32, 64)), jnp.bfloat16)
    cotangent = jnp.asarray(rng.normal(size=(3, 6, 64)), jnp.bfloat16)
    ours = _value_and_grads(layers._linear_cpu, x, kernel, 1, cotangent)
    ref = _value_and_grads(_reference, x, kernel, 1, cotangent)
    for a, b in zip(ours, ref):
        assert a.dtype == b.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=2e-2, atol=5e-2)


def test_second_use_through_jit_grad_and_a_frozen_kernel():
    """A frozen kernel (LoRA's base) is not differentiated: the gradient wrt x alone still equals
    jax's, and the weight-gradient dot is left for XLA to drop."""
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(4, 8, 16)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(16, 40)), jnp.float32)

    def loss(fn):
        return jax.jit(jax.grad(lambda x: jnp.sum(jnp.tanh(fn(x, kernel, 1)) ** 2)))(x)

    np.testing.assert_allclose(np.asarray(loss(layers._linear_cpu)), np.asarray(loss(_reference)), rtol=1e-5, atol=1e-6)


def test_dense_runs_the_written_out_rule_on_cpu():
    assert jax.default_backend() == "cpu"
    jaxpr = jax.make_jaxpr(lambda x, k: layers.linear(x, k, 1))(jnp.ones((2, 3)), jnp.ones((3, 4)))
    assert "custom_vjp_call" in str(jaxpr)
