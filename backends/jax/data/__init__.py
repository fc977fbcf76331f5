"""Data: read, clean, tokenise, pack and load training rows (datasets.py wires them)."""
