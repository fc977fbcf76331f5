import numpy as np
import pytest

from ftc.backends.jax.data.loader import eval_dataset, iterate, steps_per_epoch, train_dataset

N, B = 22, 8  # 3 steps per epoch: 24 slots, 2 of them empty rows


def rows(n=N):
    """Row i carries id i + 1 (0 marks an empty padding row) and a nested [4] array."""
    ids = np.arange(1, n + 1, dtype=np.int32)
    return {"id": ids, "nested": {"x": np.repeat(ids[:, None], 4, axis=1).astype(np.float32)}}


def ids_of(it, steps):
    return [next(it)["id"].tolist() for _ in range(steps)]


def test_each_epoch_is_a_fresh_permutation_of_every_row():
    it = iterate(train_dataset(rows(), batch_size=B, seed=3, shuffle=True))
    spe = steps_per_epoch(N, B)
    epochs = [sum(ids_of(it, spe), []) for _ in range(3)]
    for epoch in epochs:
        assert sorted(epoch) == [0, 0] + list(range(1, N + 1))
    assert epochs[0] != epochs[1] != epochs[2]
    batch = next(iterate(train_dataset(rows(), batch_size=B, seed=3, shuffle=True)))
    assert batch["id"].shape == (B,) and batch["nested"]["x"].shape == (B, 4)
    assert (batch["nested"]["x"] == batch["id"][:, None]).all()


def test_order_is_set_by_the_seed():
    first = ids_of(iterate(train_dataset(rows(), batch_size=B, seed=1, shuffle=True)), 6)
    assert first == ids_of(iterate(train_dataset(rows(), batch_size=B, seed=1, shuffle=True)), 6)
    assert first != ids_of(iterate(train_dataset(rows(), batch_size=B, seed=2, shuffle=True)), 6)
    unshuffled = ids_of(iterate(train_dataset(rows(), batch_size=B, seed=1, shuffle=False)), 3)
    assert sum(unshuffled, []) == list(range(1, N + 1)) + [0, 0]


@pytest.mark.parametrize("taken", [1, 3, 4])  # mid-epoch, at an epoch boundary, into the second epoch
def test_resume_from_state_matches_continuing(taken):
    ds = train_dataset(rows(), batch_size=B, seed=5, shuffle=True)
    it = iterate(ds)
    ids_of(it, taken)
    state = it.get_state()
    continued = ids_of(it, 5)
    resumed = ids_of(iterate(train_dataset(rows(), batch_size=B, seed=5, shuffle=True), state), 5)
    assert resumed == continued
    other = iterate(ds)
    other.set_state(state)
    assert ids_of(other, 5) == continued


@pytest.mark.parametrize("processes", [2, 4])
def test_process_shares_are_disjoint_and_make_up_the_global_batch(processes):
    steps = 7  # past two epochs
    whole = ids_of(iterate(train_dataset(rows(), batch_size=B, seed=9, shuffle=True)), steps)
    shares = [
        ids_of(
            iterate(
                train_dataset(rows(), batch_size=B, seed=9, shuffle=True, process_index=p, process_count=processes)
            ),
            steps,
        )
        for p in range(processes)
    ]
    for step in range(steps):
        parts = [shares[p][step] for p in range(processes)]
        assert all(len(part) == B // processes for part in parts)
        assert sum(parts, []) == whole[step]  # same global batch whatever the process count
        real = [i for part in parts for i in part if i]
        assert len(real) == len(set(real))


def test_eval_is_one_ordered_pass_padded_to_whole_batches_and_split_by_process():
    batches = [b["id"].tolist() for b in eval_dataset(rows(), batch_size=B)]
    assert batches == [list(range(1, 9)), list(range(9, 17)), list(range(17, 23)) + [0, 0]]
    halves = [
        [b["id"].tolist() for b in eval_dataset(rows(), batch_size=B, process_index=p, process_count=2)]
        for p in range(2)
    ]
    assert [h0 + h1 for h0, h1 in zip(*halves)] == batches


def test_batch_size_must_split_over_processes():
    with pytest.raises(ValueError, match="multiple of the process count"):
        train_dataset(rows(), batch_size=6, seed=0, shuffle=True, process_count=4)
