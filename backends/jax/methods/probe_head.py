"""The probe's head: a linear or MLP classifier trained on cached features, and its metrics.

The head trains on standardised features (train mean/std); the standardisation is folded into
the head's first layer afterwards, so the head returned and exported reads raw features.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ftc.backends.jax.methods.probe_features import ProbeConfig

# ---------------------------------------------------------------- head


def init_head(rng: jax.Array, features: int, num_labels: int, config: ProbeConfig, bias: bool) -> dict:
    """Head parameters, kernels [in, out]. An MLP always has biases (it never maps onto an HF class)."""
    k1, k2 = jax.random.split(rng)
    if config.head == "linear":
        head = {"out_kernel": jnp.zeros((features, num_labels))}  # convex: zero is a fine start
        if bias:
            head["out_bias"] = jnp.zeros((num_labels,))
        return head
    return {
        "hidden_kernel": jax.random.normal(k1, (features, config.head_hidden)) / math.sqrt(features),
        "hidden_bias": jnp.zeros((config.head_hidden,)),
        "out_kernel": jax.random.normal(k2, (config.head_hidden, num_labels)) / math.sqrt(config.head_hidden),
        "out_bias": jnp.zeros((num_labels,)),
    }


def head_logits(head: dict, x_BF: jax.Array) -> jax.Array:
    """Linear: x W (+ b). MLP: gelu(x W1 + b1) W2 + b2, with exact (erf) gelu as torch's default."""
    if "hidden_kernel" in head:
        x_BF = jax.nn.gelu(x_BF @ head["hidden_kernel"] + head["hidden_bias"], approximate=False)
    logits_BC = x_BF @ head["out_kernel"]
    return logits_BC + head["out_bias"] if "out_bias" in head else logits_BC


@dataclasses.dataclass(frozen=True)
class Standardizer:
    """x' = (x - mean) / scale. Centring is off for bias-free heads (no bias to fold it into)."""

    mean: np.ndarray
    scale: np.ndarray

    @classmethod
    def fit(cls, x: np.ndarray, center: bool) -> Standardizer:
        mean = x.mean(0) if center else np.zeros(x.shape[1], np.float32)
        scale = np.sqrt(((x - mean) ** 2).mean(0))
        return cls(mean.astype(np.float32), np.where(scale > 1e-6, scale, 1.0).astype(np.float32))

    def __call__(self, x):
        return (x - self.mean) / self.scale


def fold_standardizer(head: dict, std: Standardizer) -> dict:
    """The same head reading raw features: W' = W / s, b' = b - (m / s) W."""
    head = {k: np.asarray(v, np.float32) for k, v in head.items()}
    first = "hidden" if "hidden_kernel" in head else "out"
    kernel = head[f"{first}_kernel"]
    out = dict(head)
    out[f"{first}_kernel"] = kernel / std.scale[:, None]
    if f"{first}_bias" in head:
        out[f"{first}_bias"] = head[f"{first}_bias"] - (std.mean / std.scale) @ kernel
    elif np.any(std.mean != 0):
        raise ValueError("a bias-free head cannot absorb centred features")
    return out


def train_head(
    features: np.ndarray,
    labels: np.ndarray,
    num_labels: int,
    config: ProbeConfig,
    *,
    bias: bool,
    steps: int,
    batch_size: int,
    tx: optax.GradientTransformation,
    l2: float = 0.0,
    seed: int = 0,
    log_every: int = 0,
    log=None,
) -> tuple[dict, list[dict]]:
    """Minibatch mean cross-entropy (+ l2/2 · sum of squared kernels) on standardised features.

    Returns (head reading raw features, logged losses). `l2 = 1 / (C · N)` is scikit-learn's
    LogisticRegression(C) objective on the same standardised features.
    """
    std = Standardizer.fit(features, center=bias)
    x = jnp.asarray(std(features))
    y = jnp.asarray(labels, jnp.int32)
    rng_init, rng_data = jax.random.split(jax.random.key(seed))
    head = init_head(rng_init, x.shape[1], num_labels, config, bias)
    opt_state = tx.init(head)
    batch_size = min(batch_size, x.shape[0])

    def loss_fn(head, x_BF, y_B):
        loss = optax.softmax_cross_entropy_with_integer_labels(head_logits(head, x_BF), y_B).mean()
        return loss + 0.5 * l2 * sum(jnp.sum(v**2) for k, v in head.items() if k.endswith("kernel"))

    @jax.jit
    def step(head, opt_state, index_B):
        loss, grads = jax.value_and_grad(loss_fn)(head, x[index_B], y[index_B])
        updates, opt_state = tx.update(grads, opt_state, head)
        return optax.apply_updates(head, updates), opt_state, loss

    steps_per_epoch = x.shape[0] // batch_size
    history, order = [], None
    for i in range(steps):
        epoch, j = divmod(i, steps_per_epoch)
        if j == 0:
            order = jax.random.permutation(jax.random.fold_in(rng_data, epoch), x.shape[0])
        head, opt_state, loss = step(head, opt_state, order[j * batch_size : (j + 1) * batch_size])
        if log_every and ((i + 1) % log_every == 0 or i + 1 == steps):
            entry = {"step": i + 1, "loss": float(loss)}
            history.append(entry)
            if log:
                log(entry)
    return fold_standardizer(jax.device_get(head), std), history


def predict_logits(head: dict, features: np.ndarray) -> np.ndarray:
    return np.asarray(head_logits({k: jnp.asarray(v) for k, v in head.items()}, jnp.asarray(features)))


# ---------------------------------------------------------------- metrics


def accuracy(y_true, y_pred) -> float:
    return float(np.mean(np.asarray(y_true) == np.asarray(y_pred)))


def macro_f1(y_true, y_pred) -> float:
    """Unweighted mean F1 over the labels present in y_true or y_pred (scikit-learn's default)."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    scores = []
    for c in np.union1d(y_true, y_pred):
        tp = np.sum((y_pred == c) & (y_true == c))
        fp = np.sum((y_pred == c) & (y_true != c))
        fn = np.sum((y_pred != c) & (y_true == c))
        scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores))


def classification_metrics(y_true, y_pred, majority_label: int) -> dict:
    """Accuracy and macro-F1, and the same for always predicting the train set's majority label."""
    majority = np.full_like(np.asarray(y_true), majority_label)
    return {
        "accuracy": accuracy(y_true, y_pred),
        "macro_f1": macro_f1(y_true, y_pred),
        "majority_accuracy": accuracy(y_true, majority),
        "majority_macro_f1": macro_f1(y_true, majority),
        "examples": int(len(y_true)),
    }
