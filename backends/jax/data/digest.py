"""The training rows as a checkpoint knows them (no grain, no tfds: cheap to import): their
digest, and their arrays by path."""

from __future__ import annotations

import hashlib

import numpy as np

_WHOLE_DIGEST_BYTES = 256 << 20  # rows up to this size are hashed whole; larger ones sampled


def rows_digest(rows: dict) -> str:
    """A digest of the rows a data position indexes, kept in a checkpoint so that a resume on
    other data (data.train's files edited since) is refused instead of continuing at a position
    in other rows. Up to 256 MiB every byte counts (a second for most fine-tuning sets); past that,
    every array's shape and sum and 4096 evenly spaced rows, which a real edit changes too."""
    h = hashlib.blake2b(digest_size=16)
    leaves = named_leaves(rows)
    whole = sum(a.nbytes for _, a in leaves) <= _WHOLE_DIGEST_BYTES
    for path, array in leaves:
        h.update(f"{path} {array.dtype} {array.shape}\0".encode())
        if whole:
            h.update(np.ascontiguousarray(array).tobytes())
        else:
            picked = np.unique(np.linspace(0, len(array) - 1, num=min(len(array), 4096)).astype(np.int64))
            h.update(np.ascontiguousarray(array[picked]).tobytes())
            h.update(np.asarray(array.sum(dtype=np.float64 if array.dtype.kind == "f" else np.int64)).tobytes())
    return h.hexdigest()


def named_leaves(tree, prefix: str = "") -> list[tuple[str, np.ndarray]]:
    """("a/b", array) for every array of a nested dict, in sorted key order."""
    if isinstance(tree, dict):
        return [leaf for key in sorted(tree) for leaf in named_leaves(tree[key], f"{prefix}{key}/")]
    return [(prefix.rstrip("/"), np.asarray(tree))]
