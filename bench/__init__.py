"""Benchmarks of ftc against the PyTorch stack (run as modules: python -m bench.train_speed)."""
