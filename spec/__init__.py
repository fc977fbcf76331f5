"""Spec loading, defaults and validation. Imports no jax, flax, torch or transformers."""
