"""LoRA's fresh A factors are drawn flat and reshaped (XLA:CPU compiles a 1-D threefry draw in a
fraction of a multi-dimensional one's time): the values must be the multi-dimensional draw's."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ftc.backends.jax.methods.lora_params import lora_a_init


def test_lora_a_factor_drawn_flat_equals_the_multidimensional_uniform_draw_bitwise():
    key = jax.random.fold_in(jax.random.key(7), 3)
    for fan_in, shape in ((256, (4, 256, 16)), (704, (2, 704, 8)), (32, (3, 2, 32, 4))):
        bound = 1.0 / np.sqrt(fan_in)
        got = np.asarray(lora_a_init(fan_in)(key, shape))
        want = np.asarray(jax.random.uniform(key, shape, jnp.float32, -bound, bound))
        assert got.shape == shape and got.tobytes() == want.tobytes()
        assert np.abs(got).max() <= bound
