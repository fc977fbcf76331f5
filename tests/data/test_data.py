import os

import numpy as np
import pytest
from data_testlib import chat, make_tokenizer, spec_data_options, write_jsonl

from ftc.backends.jax.data.datasets import ArraySpec, build_datasets
from ftc.backends.jax.data.read import DataError

TOK = make_tokenizer(eos_is_pad=True)


def chat_file(tmp_path, n=24, name="train.jsonl"):
    rows = [
        chat("user", f"question {i}?", "assistant", f"answer {i}.", "user", "why?", "assistant", f"because {i}.")
        for i in range(n)
    ]
    rows += [rows[0], chat("user", "no reply"), "{broken"]  # a duplicate, an empty row, a malformed line
    return write_jsonl(tmp_path / name, rows)


def build(path, **kw):
    options = dict(train=path, tokenizer=TOK, max_seq_len=160, batch_size=4, seed=0, on_bad_row="skip")
    return build_datasets(**spec_data_options(kw.pop("format", "chat"), **{**options, **kw}))


def test_chat_batches_have_the_documented_layout_and_train_only_assistant_tokens(tmp_path):
    ds = build(chat_file(tmp_path), validation_split=0.25)
    assert ds.kind == "lm" and ds.per_process_batch_size == 4
    batch = next(ds.train_iterator())
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
        "input_ids": ((4, 160), np.int32),
        "targets": ((4, 160), np.int32),
        "weights": ((4, 160), np.float32),
        "segment_ids": ((4, 160), np.int32),
        "positions": ((4, 160), np.int32),
    }
    assert ds.batch_spec()["weights"] == ArraySpec((4, 160), np.dtype(np.float32))
    supervised = TOK.decode(batch["targets"][batch["weights"] > 0])
    assert "answer" in supervised and "because" in supervised
    assert "question" not in supervised and "why" not in supervised and "user" not in supervised
    assert supervised.count("<|im_end|>") == supervised.count(".")  # every assistant turn closed by its trained eos
    s = ds.stats
    assert (s.rows_read, s.bad_rows_skipped) == (26, 1)
    assert s.train_clean.dropped_by_reason == {"duplicate": 1, "no_assistant_turn": 1} and s.train_clean.truncated == 0
    assert (s.train_sequences, s.validation_sequences) == (18, 6)
    assert s.packing and s.train_rows < s.train_sequences and 0.5 < s.packing_efficiency <= 1
    assert ds.steps_per_epoch == -(-s.train_rows // 4)
    assert "packing efficiency" in s.summary() and s.to_dict()["train_clean"]["dropped"]["duplicate"] == 1


def test_validation_split_is_seeded_and_disjoint_from_train(tmp_path):
    path = chat_file(tmp_path)
    a, b, c = (build(path, validation_split=0.25, seed=s) for s in (0, 0, 1))
    val = [conversations(d.validation_rows) for d in (a, b, c)]
    train = conversations(a.train_rows)
    assert val[0] == val[1] != val[2]
    assert len(val[0]) == 6 and len(train) == 18 and not val[0] & train
    assert sum(1 for _ in a.validation_batches()) == a.validation_steps == -(-a.stats.validation_rows // 4)


def conversations(arrays) -> set[str]:
    """The text of every packed segment."""
    out = set()
    for ids, seg in zip(arrays["input_ids"], arrays["segment_ids"]):
        out |= {TOK.decode(ids[seg == s]) for s in np.unique(seg[seg > 0])}
    return out


def test_second_call_reuses_the_tokenised_arrays_until_a_file_changes(tmp_path):
    path = chat_file(tmp_path)
    first = build(path)
    again = build(path, batch_size=8, process_index=1, process_count=2)  # loader options only
    assert again.train_rows is first.train_rows and again.per_process_batch_size == 4
    assert build(path, seed=1).train_rows is not first.train_rows
    with open(path, "a") as f:
        f.write('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "new"}]}\n')
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 10**9))
    changed = build(path)
    assert (
        changed.train_rows is not first.train_rows and changed.stats.train_sequences == first.stats.train_sequences + 1
    )


def test_supervised_tokens_are_the_same_packed_or_not(tmp_path):
    path = chat_file(tmp_path)
    packed, unpacked = build(path, packing=True), build(path, packing=False)
    assert unpacked.stats.train_rows == unpacked.stats.train_sequences
    assert packed.stats.train_rows < unpacked.stats.train_rows
    total = [
        sum(float(next(it)["weights"].sum()) for _ in range(d.steps_per_epoch))
        for d in (packed, unpacked)
        for it in [d.train_iterator()]
    ]
    assert total[0] == total[1] == packed.stats.supervised_tokens == unpacked.stats.supervised_tokens


def test_classification_layout_labels_and_validation_file(tmp_path):
    train = write_jsonl(
        tmp_path / "t.jsonl", [{"text": f"hello {i}", "label": ["spam", "ham"][i % 2]} for i in range(6)]
    )
    valid = write_jsonl(tmp_path / "v.jsonl", [{"text": "hello 0", "label": "spam"}, {"text": "fresh", "label": "ham"}])
    ds = build(train, format="classification", validation=valid, max_seq_len=16)
    assert ds.kind == "classification" and ds.label_names == ("ham", "spam")
    assert not ds.stats.packing
    assert ds.stats.validation_clean.dropped_by_reason == {"in_train": 1}
    (batch,) = list(ds.validation_batches())
    assert batch["labels"].tolist() == [0, 0, 0, 0] and batch["weights"].tolist() == [1, 0, 0, 0]
    assert batch["input_ids"].shape == (4, 16) and batch["labels"].dtype == np.int32
    bad = write_jsonl(tmp_path / "b.jsonl", [{"text": "x", "label": "eggs"}])
    with pytest.raises(DataError, match="b.jsonl:1: label 'eggs' is not one of the labels"):
        build(train, format="classification", validation=bad, max_seq_len=16)


def test_preference_batches_pair_chosen_and_rejected(tmp_path):
    rows = [{"prompt": f"q{i} ", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(3)]
    ds = build(write_jsonl(tmp_path / "p.jsonl", rows), format="preference", max_seq_len=16)
    batch = next(ds.train_iterator())
    assert set(batch) == {"chosen", "rejected", "weights"}
    assert batch["chosen"]["input_ids"].shape == (4, 16) and batch["weights"].shape == (4,)
    real = batch["weights"] > 0
    assert real.sum() == 3
    for side, word in (("chosen", "good"), ("rejected", "bad")):
        for row in range(4):
            text = TOK.decode(batch[side]["targets"][row][batch[side]["weights"][row] > 0])
            assert (word in text) == bool(real[row])


def test_nothing_left_to_train_is_a_clear_error(tmp_path):
    path = write_jsonl(tmp_path / "e.jsonl", [chat("user", "q"), chat("system", "s")])
    with pytest.raises(DataError, match="no training rows left after cleaning"):
        build(path)


def test_a_validation_file_with_nothing_left_after_cleaning_is_an_error_not_a_run_without_validation(tmp_path):
    train = chat_file(tmp_path)
    rows = [chat("user", "question 0?", "assistant", "answer 0.", "user", "why?", "assistant", "because 0.")] * 2
    valid = write_jsonl(tmp_path / "valid.jsonl", rows + [chat("user", "no reply")])  # in train, again, empty
    with pytest.raises(
        DataError, match=rf"^{valid}: no validation sequences left after cleaning \(kept 0 of 3, .*dedupe = false"
    ):
        build(train, validation=valid)
    long_answer = write_jsonl(tmp_path / "long.jsonl", [chat("user", "q " * 100, "assistant", "a")])
    with pytest.raises(DataError, match=r"no validation sequences left after cleaning \(kept 0 of 1, 1 overlong\)"):
        build(train, validation=long_answer, clean={**spec_data_options("chat")["clean"], "overlong": "drop"})


def test_rows_whose_answers_all_fall_past_max_seq_len_name_the_file_and_the_limit(tmp_path):
    path = write_jsonl(tmp_path / "long.jsonl", [chat("user", "question " * 80, "assistant", "answer")])
    with pytest.raises(
        DataError,
        match=rf"^{path}: no training sequences left .*1 overlong\); overlong: nothing "
        r"supervised within model.max_seq_len = 32 tokens",
    ):
        build(path, max_seq_len=32)
