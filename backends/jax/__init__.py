"""The JAX backend: models, methods, data, train/eval steps, checkpoints, HF import/export."""

from ftc.backends.jax import host_devices

host_devices.reserve()  # before jax makes its CPU client: fake devices' collectives need threads
