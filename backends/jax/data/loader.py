"""grain pipelines over fixed-shape rows: deterministic, reshuffled per epoch, sharded by process.

Rows are a pytree (nested dicts) of numpy arrays with a leading [N] axis (data_pack's output).
One epoch is `steps_per_epoch = ceil(N / batch_size)` global batches: the epoch's order is a
permutation of N real rows and `steps * batch_size - N` empty rows (all zeros, so weight 0),
drawn afresh every epoch from (seed, epoch) alone, so any position of the stream can be read
without reading what came before. (numpy's permutation, not grain's `MapDataset.shuffle`: grain's
index_shuffle takes ~3 ms per index on domains of a few dozen rows, which small datasets hit.)

Sharding: global batch b is the slots [b * B, (b + 1) * B) of that stream; process p of P takes
slots [b * B + p * B / P, b * B + (p + 1) * B / P), i.e. the stream is cut into per-process batches
of B / P rows and process p takes every P-th one (`.batch(B // P)[p::P]`). The processes' shares
are disjoint and together are exactly the global batch, which is the same whatever P is: a run
on 1 host and on 4 hosts sees the same data at every step. grain's MapDataset is lazy, so a
process only ever reads the rows of its share.

State: a train iterator is grain's `DatasetIterator`; `get_state()` (a small dict,
`{"next_index": steps taken}`, the same on every process and for any process count) and
`set_state()` resume exactly mid-epoch.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from typing import Any

import grain
import numpy as np


def _leaves(tree) -> list[np.ndarray]:
    return [x for v in tree.values() for x in _leaves(v)] if isinstance(tree, dict) else [tree]


def num_rows(rows: dict) -> int:
    sizes = {len(x) for x in _leaves(rows)}
    if len(sizes) != 1:
        raise ValueError(f"row arrays disagree on the number of rows: {sorted(sizes)}")
    return sizes.pop()


def _take(tree, i: int):
    return {k: _take(v, i) for k, v in tree.items()} if isinstance(tree, dict) else tree[i]


def _empty(tree):
    return {k: _empty(v) for k, v in tree.items()} if isinstance(tree, dict) else np.zeros_like(tree[0])


class _Lookup:
    """Stream position -> row: position i is slot i % slots of epoch i // slots; a slot >= N is
    an empty (all-zero, weight 0) row."""

    def __init__(self, rows: dict, slots: int, seed: int | None):
        self._rows, self._n, self._slots, self._seed = rows, num_rows(rows), slots, seed
        self._blank = _empty(rows) if self._n else None
        self._order = functools.lru_cache(maxsize=2)(self._epoch_order)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self._seed, epoch]).permutation(self._slots)

    def __call__(self, index: int, _):
        epoch, slot = divmod(index, self._slots)
        if self._seed is not None:
            slot = int(self._order(epoch)[slot])
        return _take(self._rows, slot) if slot < self._n else self._blank


def steps_per_epoch(n_rows: int, batch_size: int) -> int:
    return math.ceil(n_rows / batch_size)


def _per_process(batch_size: int, process_index: int, process_count: int) -> int:
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, process_count = {process_count})")
    if batch_size < 1 or batch_size % process_count:
        raise ValueError(
            f"batch_size {batch_size} must be a positive multiple of the process count "
            f"{process_count} (each process loads batch_size / process_count rows)"
        )
    return batch_size // process_count


def train_dataset(
    rows: dict, *, batch_size: int, seed: int, shuffle: bool, process_index: int = 0, process_count: int = 1
) -> grain.MapDataset:
    """Endless per-process batches (nested dicts of [batch_size / process_count, ...] arrays)."""
    per_process = _per_process(batch_size, process_index, process_count)
    n = num_rows(rows)
    if n == 0:
        raise ValueError("no training rows")
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed {seed} must be in [0, 2**32)")
    slots = steps_per_epoch(n, batch_size) * batch_size
    ds = grain.MapDataset.range(slots).repeat(None).map_with_index(_Lookup(rows, slots, seed if shuffle else None))
    return ds.batch(per_process, drop_remainder=True)[process_index::process_count]


def eval_dataset(rows: dict, *, batch_size: int, process_index: int = 0, process_count: int = 1) -> grain.MapDataset:
    """One pass in order, the last batch filled with empty rows; every process gets the same
    number of batches."""
    per_process = _per_process(batch_size, process_index, process_count)
    slots = steps_per_epoch(num_rows(rows), batch_size) * batch_size
    ds = grain.MapDataset.range(slots).map_with_index(_Lookup(rows, slots, None))
    return ds.batch(per_process, drop_remainder=True)[process_index::process_count]


def iterate(ds: grain.MapDataset, state: dict | None = None) -> Iterator[Any]:
    """grain's checkpointable iterator over `ds`, positioned at `state` when given."""
    it = iter(ds)
    if state is not None:
        it.set_state(state)
    return it
