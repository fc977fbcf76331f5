import numpy as np
import pytest
from data_testlib import chat, spec_row_clean_options

from ftc.backends.jax.data.clean import clean_lengths, clean_rows, row_hash
from ftc.backends.jax.data.read import DataError, Row
from ftc.backends.jax.data.tokenize import Labelled, Pair, Tokens


def rows_of(*datas) -> list[Row]:
    return [Row(f"f.jsonl:{i + 1}", d) for i, d in enumerate(datas)]


def test_chat_counts_duplicates_empty_no_assistant_and_unknown_roles():
    rows = rows_of(
        chat("user", "hi", "assistant", "hello"),
        chat("user", "hi", "assistant", "hello"),  # duplicate
        chat("user", "  ", "assistant", ""),  # empty
        chat("system", "s", "user", "only a question"),  # no assistant turn
        {
            "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0}]
        },  # none trained
        chat("user", "hi", "bot", "42", "assistant", "ok"),  # unknown role
        chat("user", "hi", "assistant", "hello!"),
    )
    kept, report = clean_rows(rows, format="chat", **spec_row_clean_options("chat", unknown_roles="drop"))
    assert [r.where for r in kept] == ["f.jsonl:1", "f.jsonl:7"]
    assert report.dropped_by_reason == {"duplicate": 1, "empty": 1, "no_assistant_turn": 2, "unknown_role": 1}
    assert (report.seen, report.kept) == (7, 2)


def test_options_turn_checks_off():
    rows = rows_of(
        chat("user", "hi", "assistant", "hello"),
        chat("user", "hi", "assistant", "hello"),
        chat("user", "q"),
        chat("user", "hi", "tool", "x", "assistant", "a"),
    )
    kept, report = clean_rows(
        rows,
        format="chat",
        **spec_row_clean_options("chat", dedupe=False, drop_empty=False, roles=("user", "assistant", "tool")),
    )
    assert len(kept) == 4 and report.dropped == ()


def test_unknown_roles_error_names_every_row():
    rows = rows_of(
        chat("user", "hi", "assistant", "a"), chat("user", "hi", "bot", "a"), chat("human", "hi", "assistant", "a")
    )
    with pytest.raises(DataError) as e:
        clean_rows(rows, format="chat", **spec_row_clean_options("chat"))
    assert e.value.problems == (
        "f.jsonl:2: role 'bot' is not one of 'assistant', 'system', 'tool', 'user'",
        "f.jsonl:3: role 'human' is not one of 'assistant', 'system', 'tool', 'user'",
    )


def test_other_formats_empty_rows_and_validation_rows_seen_in_train():
    kept, report = clean_rows(
        rows_of({"prompt": "p", "completion": " \n"}, {"prompt": "", "completion": "x"}),
        format="completion",
        **spec_row_clean_options("completion"),
    )
    assert len(kept) == 1 and report.dropped_by_reason == {"empty": 1}
    pairs = rows_of(
        {"prompt": "p", "chosen": "a", "rejected": "a"},
        {"prompt": "p", "chosen": "", "rejected": "b"},
        {"prompt": "p", "chosen": "a", "rejected": "b"},
    )
    kept, report = clean_rows(pairs, format="preference", **spec_row_clean_options("preference"))
    assert len(kept) == 1 and report.dropped_by_reason == {"same_pair": 1, "empty": 1}
    train = {"text": "seen", "label": "x"}
    kept, report = clean_rows(
        rows_of(train, {"text": "new", "label": "x"}),
        format="classification",
        exclude={row_hash(train)},
        **spec_row_clean_options("classification"),
    )
    assert [r.data["text"] for r in kept] == ["new"] and report.dropped_by_reason == {"in_train": 1}


def test_row_hash_is_stable_and_ignores_key_order():
    a = {"messages": [{"role": "user", "content": "é"}]}
    b = {"messages": [{"content": "é", "role": "user"}]}
    # pinned: the same row hashes the same on every machine and Python run (no hash() salt)
    assert row_hash(a) == row_hash(b) == "c4a01eb6dbd9d1cad52f36b7e105f3aa"
    assert row_hash(a) != row_hash({"messages": [{"role": "user", "content": "e"}]})


def toks(where, n_prompt, n_answer):
    n = n_prompt + n_answer
    return Tokens(where, np.arange(n, dtype=np.int32), np.r_[np.zeros(n_prompt), np.ones(n_answer)].astype(np.float32))


def test_overlong_truncate_drop_and_error_counts():
    items = [toks("a:1", 3, 3), toks("a:2", 4, 6), toks("a:3", 9, 2), toks("a:4", 2, 0)]
    kept, report = clean_lengths(items, max_seq_len=8, overlong="truncate")
    assert [(x.where, len(x.ids)) for x in kept] == [("a:1", 6), ("a:2", 8)]
    assert kept[1].weights.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    # a:3 loses every supervised token to truncation: dropped as overlong; a:4 has none at all
    assert report.dropped_by_reason == {"overlong": 1, "no_target": 1} and report.truncated == 1
    kept, report = clean_lengths(items, max_seq_len=8, overlong="drop")
    assert [x.where for x in kept] == ["a:1"] and report.dropped_by_reason == {"overlong": 2, "no_target": 1}
    with pytest.raises(DataError) as e:
        clean_lengths(items, max_seq_len=8, overlong="error")
    assert e.value.problems == (
        "a:2: 10 tokens, more than max_seq_len = 8",
        "a:3: 11 tokens, more than max_seq_len = 8",
    )


def test_overlong_applies_to_both_sides_of_a_pair_and_to_classification():
    pair = Pair("p:1", toks("p:1", 3, 2), toks("p:1", 3, 8))
    kept, report = clean_lengths([pair], max_seq_len=6, overlong="truncate")
    assert len(kept[0].chosen.ids) == 5 and len(kept[0].rejected.ids) == 6 and report.truncated == 1
    kept, _ = clean_lengths([Labelled("c:1", np.arange(10, dtype=np.int32), 1)], max_seq_len=4, overlong="truncate")
    assert kept[0].ids.tolist() == [0, 1, 2, 3]


def test_reports_chain_across_passes():
    _, rows_report = clean_rows(
        rows_of({"text": "a"}, {"text": "a"}, {"text": "b"}), format="text", **spec_row_clean_options("text")
    )
    _, len_report = clean_lengths([toks("x", 0, 20), toks("y", 0, 3)], max_seq_len=4, overlong="drop")
    both = rows_report.then(len_report)
    assert (both.seen, both.kept) == (3, 1)
    assert both.dropped_by_reason == {"duplicate": 1, "overlong": 1}
    assert both.summary() == "kept 1 of 3, 1 duplicate, 1 overlong"


def test_overlong_split_cuts_a_long_text_into_max_seq_len_pieces_that_keep_every_token():
    ids = np.arange(70, dtype=np.int32)
    weights = np.concatenate([np.zeros(5), np.ones(65)]).astype(np.float32)
    items = [Tokens("doc.jsonl:1", ids, weights), Tokens("doc.jsonl:2", ids[:10], weights[:10])]
    kept, report = clean_lengths(items, max_seq_len=32, overlong="split")
    assert [k.where for k in kept] == [f"doc.jsonl:1 (part {k} of 3)" for k in (1, 2, 3)] + ["doc.jsonl:2"]
    np.testing.assert_array_equal(np.concatenate([k.ids for k in kept[:3]]), ids)
    np.testing.assert_array_equal(np.concatenate([k.weights for k in kept[:3]]), weights)
    assert (report.split, report.truncated, report.kept) == (
        1,
        0,
        4,
    ) and "1 split into max_seq_len pieces" in report.summary()
    pair = Pair("p.jsonl:1", items[0], items[0])
    with pytest.raises(
        DataError, match=r"p.jsonl:1: 70 tokens, more than max_seq_len = 32, and data.clean.overlong = 'split'"
    ):
        clean_lengths([pair], max_seq_len=32, overlong="split")
