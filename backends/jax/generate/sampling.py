"""Sampling rules: which next token, from one step's logits. Pure functions over [B, V] arrays.

The rules apply in transformers' order (temperature, top-k, top-p, min-p), each as transformers'
logits warper of the same name computes it, so a setting means what it means there:
  temperature  logits / temperature; 0 is greedy (argmax, the first of tied maxima, as torch's)
  top_k        keep the k largest logits (0: off)
  top_p        keep the smallest set of largest-probability tokens whose probability sums to at
               least top_p (1: off)
  min_p        keep tokens whose probability is at least min_p x the largest one (0: off)
Filtered-out tokens get -inf; the token is then drawn from softmax of what is left. A tie at a
top-k or top-p boundary keeps every tied token (transformers' sort picks one of them).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen. Hashable: jitted functions take it as a static argument."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0

    def __post_init__(self):
        problems = []
        if not self.temperature >= 0:
            problems.append(f"temperature={self.temperature}: expected >= 0 (0 is greedy)")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            problems.append(f"top_k={self.top_k}: expected an integer >= 0 (0 is off)")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p={self.top_p}: expected 0 < top_p <= 1 (1 is off)")
        if not 0 <= self.min_p <= 1:
            problems.append(f"min_p={self.min_p}: expected 0 <= min_p <= 1 (0 is off)")
        if problems:
            raise ValueError("sampling: " + "; ".join(problems))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


GREEDY = SamplingConfig()


def filtered_logits(logits_BV: jax.Array, config: SamplingConfig) -> jax.Array:
    """float32 logits after temperature, top-k, top-p and min-p: -inf outside the kept set."""
    x_BV = logits_BV.astype(jnp.float32)
    if config.greedy:
        return x_BV
    neg_inf = jnp.float32(-jnp.inf)
    if config.temperature != 1.0:
        x_BV = x_BV / jnp.float32(config.temperature)
    if config.top_k and config.top_k < x_BV.shape[-1]:
        kth_B1 = jax.lax.top_k(x_BV, config.top_k)[0][:, -1:]
        x_BV = jnp.where(x_BV < kth_B1, neg_inf, x_BV)
    if config.top_p < 1.0:
        sorted_BV = -jnp.sort(-x_BV, axis=-1)  # descending
        probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
        before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV  # mass of strictly larger tokens
        # The first token is always kept (transformers' min_tokens_to_keep=1).
        keep_BV = (before_BV < config.top_p).at[:, 0].set(True)
        threshold_B1 = jnp.min(jnp.where(keep_BV, sorted_BV, jnp.inf), axis=-1, keepdims=True)
        x_BV = jnp.where(x_BV < threshold_B1, neg_inf, x_BV)
    if config.min_p > 0.0:
        probs_BV = jax.nn.softmax(x_BV, axis=-1)
        floor_B1 = config.min_p * jnp.max(probs_BV, axis=-1, keepdims=True)
        x_BV = jnp.where(probs_BV < floor_B1, neg_inf, x_BV)
    return x_BV


def next_tokens(keys_B: jax.Array, logits_BV: jax.Array, config: SamplingConfig) -> jax.Array:
    """int32 [B]: one token per row, row b drawn with its own key `keys_B[b]` (unused when greedy)."""
    x_BV = filtered_logits(logits_BV, config)
    if config.greedy:
        return jnp.argmax(x_BV, axis=-1).astype(jnp.int32)
    return jax.vmap(lambda key, x_V: jax.random.categorical(key, x_V))(keys_B, x_BV).astype(jnp.int32)
