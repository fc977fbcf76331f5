"""Lay tokenised items out as fixed-shape [N, T] numpy arrays, packed or one per row.

Shift convention (causal LMs): a sequence of n tokens `ids` takes n - 1 positions of a row:
    input_ids[t] = ids[t]        targets[t] = ids[t + 1]        weights[t] = token_weights[t + 1]
for t = 0 .. n - 2, so `weights[t]` is the loss weight on predicting `targets[t]` from
`input_ids[:t + 1]`, and no position ever predicts the first token of the next segment: the loss
needs no masking beyond `weights`. A sequence of up to T + 1 tokens fits a row of T positions
(data_clean caps sequences at max_seq_len = T tokens, so one always fits).

Per row, all int32 except weights (float32), all [T]:
    input_ids, targets, weights, segment_ids (1..k for the k sequences in the row, 0 = padding),
    positions (0, 1, ... restarting at each segment; 0 on padding).
Padding has input_ids = targets = 0, weights = 0, segment_ids = 0.

Packing is first-fit over the items in the order given (the caller shuffles with the seed first),
so it is deterministic; a max-segment-tree finds the first row with room in O(log rows).
Without packing every sequence gets its own row.

Preference pairs are never packed: `{"chosen": lm_row, "rejected": lm_row, "weights": 1.0}`.
Classification items are never packed: `input_ids`, `segment_ids` (1 on tokens), `positions`
[T] and `labels`, `weights` (1.0) scalars. A sequence is one segment, as the models expect.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from ftc.backends.jax.data.tokenize import Labelled, Pair, Tokens

LM_KEYS = ("input_ids", "targets", "weights", "segment_ids", "positions")


@dataclasses.dataclass(frozen=True)
class Packed:
    arrays: dict  # key -> np.ndarray with a leading [N] rows axis (nested for pairs)
    rows: int
    sequences: int
    efficiency: float  # share of positions holding a real (non-pad) token
    supervised: int  # positions with weight > 0 (for causal LMs; items for classification)


def _lm_arrays(n_rows: int, seq_len: int) -> dict[str, np.ndarray]:
    return {k: np.zeros((n_rows, seq_len), np.float32 if k == "weights" else np.int32) for k in LM_KEYS}


def _place(arrays: dict, row: int, offset: int, segment: int, t: Tokens) -> int:
    n = len(t.ids) - 1
    sl = slice(offset, offset + n)
    arrays["input_ids"][row, sl] = t.ids[:-1]
    arrays["targets"][row, sl] = t.ids[1:]
    arrays["weights"][row, sl] = t.weights[1:]
    arrays["segment_ids"][row, sl] = segment
    arrays["positions"][row, sl] = np.arange(n, dtype=np.int32)
    return offset + n


def first_fit(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Item indices per bin, each item in the first bin (lowest index) with room, in order."""
    size = 1
    while size < max(len(lengths), 1):
        size *= 2
    room = np.full(2 * size, -1, np.int64)  # max room in each subtree; -1 = bin not opened
    bins: list[list[int]] = []
    for i, need in enumerate(lengths):
        if need > capacity:
            raise ValueError(f"item {i} needs {need} positions, more than a row's {capacity}")
        if room[1] >= need:
            node = 1
            while node < size:
                node = 2 * node if room[2 * node] >= need else 2 * node + 1
            b = node - size
        else:
            b = len(bins)
            bins.append([])
            node = size + b
            room[node] = capacity
        bins[b].append(i)
        room[node] -= need
        node //= 2
        while node:
            room[node] = max(room[2 * node], room[2 * node + 1])
            node //= 2
    return bins


def pack_lm(items: Sequence[Tokens], *, seq_len: int, packing: bool) -> Packed:
    """Causal-LM rows [N, seq_len] from sequences of at most seq_len + 1 tokens each."""
    lengths = [len(t.ids) - 1 for t in items]
    if any(n < 1 for n in lengths):
        raise ValueError("a sequence of fewer than 2 tokens has nothing to predict (data_clean drops these)")
    bins = first_fit(lengths, seq_len) if packing else [[i] for i in range(len(items))]
    arrays = _lm_arrays(len(bins), seq_len)
    for row, members in enumerate(bins):
        offset = 0
        for segment, i in enumerate(members, start=1):
            offset = _place(arrays, row, offset, segment, items[i])
    return Packed(
        arrays, len(bins), len(items), _efficiency(arrays["segment_ids"]), int(np.count_nonzero(arrays["weights"]))
    )


def pad_pairs(items: Sequence[Pair], *, seq_len: int) -> Packed:
    """Preference rows: each side of a pair in its own [seq_len] row, one segment."""
    chosen, rejected = _lm_arrays(len(items), seq_len), _lm_arrays(len(items), seq_len)
    for row, pair in enumerate(items):
        _place(chosen, row, 0, 1, pair.chosen)
        _place(rejected, row, 0, 1, pair.rejected)
    arrays = {"chosen": chosen, "rejected": rejected, "weights": np.ones(len(items), np.float32)}
    segments = np.concatenate([chosen["segment_ids"], rejected["segment_ids"]])
    supervised = int(np.count_nonzero(chosen["weights"]) + np.count_nonzero(rejected["weights"]))
    return Packed(arrays, len(items), len(items), _efficiency(segments), supervised)


def pad_labelled(items: Sequence[Labelled], *, seq_len: int) -> Packed:
    """Classification rows: token ids [seq_len] padded, one label each."""
    n = len(items)
    arrays = {
        "input_ids": np.zeros((n, seq_len), np.int32),
        "segment_ids": np.zeros((n, seq_len), np.int32),
        "positions": np.zeros((n, seq_len), np.int32),
        "labels": np.asarray([x.label for x in items], np.int32).reshape(n),
        "weights": np.ones(n, np.float32),
    }
    for row, x in enumerate(items):
        k = len(x.ids)
        arrays["input_ids"][row, :k] = x.ids
        arrays["segment_ids"][row, :k] = 1
        arrays["positions"][row, :k] = np.arange(k, dtype=np.int32)
    return Packed(arrays, n, n, _efficiency(arrays["segment_ids"]), n)


@dataclasses.dataclass(frozen=True)
class Layout:
    """How one kind of tokenised item becomes rows; a format names the layout it uses."""

    name: str  # Datasets.kind: what the objective reads from a batch
    packs: bool  # whether data.packing can put several items in one row
    lay_out: Callable[[Sequence, int, bool], Packed]  # (items, seq_len, packing) -> Packed


def _lay_out_lm(items: Sequence[Tokens], seq_len: int, packing: bool) -> Packed:
    return pack_lm(items, seq_len=seq_len, packing=packing)


def _lay_out_pairs(items: Sequence[Pair], seq_len: int, packing: bool) -> Packed:
    return pad_pairs(items, seq_len=seq_len)


def _lay_out_labelled(items: Sequence[Labelled], seq_len: int, packing: bool) -> Packed:
    return pad_labelled(items, seq_len=seq_len)


LM = Layout("lm", True, _lay_out_lm)
PAIRS = Layout("preference", False, _lay_out_pairs)
LABELLED = Layout("classification", False, _lay_out_labelled)


def _efficiency(segment_ids: np.ndarray) -> float:
    return float(np.count_nonzero(segment_ids) / segment_ids.size) if segment_ids.size else 0.0
