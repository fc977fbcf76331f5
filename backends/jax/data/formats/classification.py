"""classification: a text and its class.

Row: `{"text", "label"}` with label a string or a non-negative int (1.0 reads as 1); normalised
to the same keys.
Tokens: tokenizer(text) with its special tokens, and the label's index in the class names
(`data.labels` when given, else taken from the training rows: see `label_names_of`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from ftc.backends.jax.data import pack, tokenize
from ftc.backends.jax.data.formats.base import Format, blank
from ftc.backends.jax.data.read import BadRow, DataError, Row, expect_object, expect_string


def normalise(record) -> dict:
    record = expect_object(record)
    text = expect_string(record, "text")
    if "label" not in record:
        raise BadRow("missing key 'label', expected a string or a non-negative integer")
    label = record["label"]
    if isinstance(label, float) and label.is_integer():
        label = int(label)  # pandas writes an integer column with a missing value as floats: 1.0
    if isinstance(label, bool) or not (isinstance(label, str) or isinstance(label, int) and label >= 0):
        raise BadRow(f"'label' is {json.dumps(label)}, expected a string or a non-negative integer")
    return {"text": text, "label": label}


# A softmax over one class is 1 whatever the logits: the loss is 0 and nothing trains.
ONE_CLASS = "with one class, cross-entropy is 0 and the head learns nothing"
MAX_CLASSES = 100_000  # integer labels name classes 0..max: a stray huge one is a data error


def label_names_of(rows: Sequence[Row], labels: Sequence[str] | None = None) -> tuple[str, ...]:
    """Class names: `labels` when given, else the sorted string labels of `rows` (numerals by
    value), or "0".."max" when the rows' labels are integers."""
    if labels is not None:
        names = tuple(str(x) for x in labels)
        if len(set(names)) != len(names):
            raise DataError(f"data.labels has duplicates: {list(names)}")
        if len(names) < 2:
            raise DataError(f"data.labels={list(names)}: expected at least 2 class names ({ONE_CLASS})")
        return names
    values = [r.data["label"] for r in rows]
    if not values:
        raise DataError("no classification rows to take label names from")
    strings = [v for v in values if isinstance(v, str)]
    if strings and len(strings) != len(values):
        first_int = next(r for r in rows if not isinstance(r.data["label"], str))
        raise DataError(
            "labels mix strings and integers; give data.labels to name the integers",
            [f"{first_int.where}: label {first_int.data['label']} is an integer, other rows' labels are strings"],
        )
    if strings:  # numerals in order ("2" before "10"): labels read from CSV cells are strings
        names = tuple(sorted(set(strings), key=lambda x: (not numeral(x), int(x) if numeral(x) else 0, x)))
        if len(names) < 2:
            raise DataError(
                f"{rows[0].where}: label {names[0]!r}, as every training row's: expected at least 2 "
                f"classes ({ONE_CLASS}; give data.labels to name classes the rows lack)"
            )
        return names
    top = max(values)
    if top == 0:
        raise DataError(
            f"{rows[0].where}: label 0, as every training row's: expected at least 2 classes "
            f"({ONE_CLASS}; give data.labels to name classes the rows lack)"
        )
    if top >= MAX_CLASSES:  # "0".."top" would be built (and a head that wide trained)
        row = next(r for r in rows if r.data["label"] == top)
        raise DataError(
            f"{row.where}: label {top} makes {top + 1} classes of integer labels 0..{top}, more than {MAX_CLASSES}; "
            "expected class indices (give data.labels to name them, or use string labels)"
        )
    return tuple(str(i) for i in range(top + 1))


def numeral(label: str) -> bool:
    return label.isascii() and label.isdigit()


def label_indexer(label_names: Sequence[str]):
    index = {name: i for i, name in enumerate(label_names)}

    def label_of(row: Row) -> int:
        label = row.data["label"]
        if isinstance(label, int):
            if label < len(label_names):
                return label
            raise DataError(
                f"{row.where}: label {label} is out of range, expected 0..{len(label_names) - 1} "
                f"({len(label_names)} labels)"
            )
        if label in index:
            return index[label]
        if numeral(label) and int(label) < len(label_names):  # an index written as text (a CSV cell)
            return int(label)
        raise DataError(
            f"{row.where}: label {label!r} is not one of the labels "
            f"{list(label_names)[:20]}{' ...' if len(label_names) > 20 else ''}"
        )

    return label_of


def tokenize_rows(tokenizer, rows, train_on, label_names):
    if label_names is None:
        raise ValueError("classification needs label_names (see label_names_of)")
    index = label_indexer(label_names)
    labels = [index(r) for r in rows]
    encoded = tokenize.encode_texts(tokenizer, [r.data["text"] for r in rows])
    return [tokenize.Labelled(r.where, tokenize.i32(ids), y) for r, ids, y in zip(rows, encoded, labels)]


def empty_reason(data: dict, train_on: str | None) -> str | None:
    return "empty" if blank(data["text"]) else None


FORMAT = Format(
    name="classification",
    layout=pack.LABELLED,
    normalise=normalise,
    tokenize=tokenize_rows,
    empty_reason=empty_reason,
    label_names=label_names_of,
)
