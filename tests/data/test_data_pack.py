import numpy as np

from ftc.backends.jax.data.pack import LM_KEYS, first_fit, pack_lm, pad_labelled, pad_pairs
from ftc.backends.jax.data.tokenize import Labelled, Pair, Tokens


def sequences(lengths, seed=0):
    """Sequence k has ids 1000*(k+1) + i, so every token says which sequence it came from."""
    rng = np.random.default_rng(seed)
    return [
        Tokens(f"s:{k}", (1000 * (k + 1) + np.arange(n)).astype(np.int32), rng.integers(0, 2, n).astype(np.float32))
        for k, n in enumerate(lengths)
    ]


def test_first_fit_puts_each_item_in_the_first_bin_with_room():
    assert first_fit([6, 5, 4, 3, 2], 10) == [[0, 2], [1, 3, 4]]
    assert first_fit([10, 1, 9, 1], 10) == [[0], [1, 2], [3]]
    lengths = list(np.random.default_rng(1).integers(1, 50, 300))
    bins = first_fit(lengths, 64)
    assert sorted(i for b in bins for i in b) == list(range(300))
    assert all(sum(lengths[i] for i in b) <= 64 for b in bins)
    # first fit: an item never fits an earlier bin than the one it went to, as that bin stood then
    fill = []
    for i, n in enumerate(lengths):
        home = next(j for j, b in enumerate(bins) if i in b)
        assert all(fill[j] + n > 64 for j in range(home)), i
        if home == len(fill):
            fill.append(0)
        fill[home] += n
    assert first_fit(lengths, 64) == bins  # deterministic


def test_packing_never_mixes_segments_and_weights_are_zero_across_boundaries():
    items = sequences([5, 17, 3, 9, 2, 12, 8, 30, 4, 6])
    T = 32
    packed = pack_lm(items, seq_len=T, packing=True)
    a = packed.arrays
    assert set(a) == set(LM_KEYS) and all(a[k].shape == (packed.rows, T) for k in LM_KEYS)
    assert a["weights"].dtype == np.float32 and all(a[k].dtype == np.int32 for k in LM_KEYS if k != "weights")
    found = set()
    for r in range(packed.rows):
        seg = a["segment_ids"][r]
        used = seg > 0
        assert (np.diff(seg[used]) >= 0).all()  # segments contiguous, in order
        assert used[: used.sum()].all()  # padding only at the end
        for s in np.unique(seg[used]):
            at = np.flatnonzero(seg == s)
            owner = a["input_ids"][r, at] // 1000
            assert (owner == owner[0]).all() and (a["targets"][r, at] // 1000 == owner[0]).all()  # never crosses
            item = items[owner[0] - 1]
            assert a["positions"][r, at].tolist() == list(range(len(at)))
            assert a["input_ids"][r, at].tolist() == item.ids[:-1].tolist()
            assert a["targets"][r, at].tolist() == item.ids[1:].tolist()
            assert a["weights"][r, at].tolist() == item.weights[1:].tolist()
            found.add(item.where)
        pad = seg == 0
        assert (
            (a["weights"][r, pad] == 0).all()
            and (a["input_ids"][r, pad] == 0).all()
            and (a["positions"][r, pad] == 0).all()
        )
    assert found == {t.where for t in items}
    tokens = sum(len(t.ids) - 1 for t in items)
    assert packed.efficiency == tokens / (packed.rows * T)
    assert packed.rows < len(items)


def test_without_packing_each_sequence_has_its_own_row():
    items = sequences([5, 33, 3])
    packed = pack_lm(items, seq_len=32, packing=False)
    assert packed.rows == 3
    assert packed.arrays["segment_ids"].max(axis=1).tolist() == [1, 1, 1]
    assert (packed.arrays["segment_ids"] > 0).sum(axis=1).tolist() == [4, 32, 2]


def test_pairs_and_labelled_items_are_padded_one_per_row():
    ch, rj = sequences([4, 6])
    packed = pad_pairs([Pair("p:1", ch, rj)], seq_len=8)
    assert packed.arrays["chosen"]["input_ids"][0].tolist() == ch.ids[:-1].tolist() + [0] * 5
    assert packed.arrays["rejected"]["targets"][0].tolist() == rj.ids[1:].tolist() + [0] * 3
    assert packed.arrays["weights"].tolist() == [1.0]
    lab = pad_labelled([Labelled("c:1", np.array([5, 6, 7], np.int32), 2)], seq_len=5)
    assert lab.arrays["input_ids"].tolist() == [[5, 6, 7, 0, 0]]
    assert lab.arrays["segment_ids"].tolist() == [[1, 1, 1, 0, 0]]
    assert lab.arrays["positions"].tolist() == [[0, 1, 2, 0, 0]]
    assert lab.arrays["labels"].tolist() == [2] and lab.arrays["labels"].dtype == np.int32
