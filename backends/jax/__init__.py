"""The JAX backend: models, methods, data, train/eval steps, checkpoints, HF import/export."""
