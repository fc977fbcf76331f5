"""The contract every data format implements: what one `data.format` value means at each stage.

A row goes read -> clean -> tokenise -> lay out (datasets.py runs the stages); everything that
differs between formats is a field of its `Format`, everything else is shared code that never
names a format. A format module defines `FORMAT = Format(...)` and one line in the registry
(data/formats/__init__.py) makes it known.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pack.py reaches this module through tokenize -> read -> the registry
    from ftc.backends.jax.data.pack import Layout

TRAIN_ON = ("assistant", "all")


def no_messages(data: dict) -> list[dict]:
    return []


def blank(text: str) -> bool:
    """Nothing but whitespace: what data.clean.drop_empty counts as empty."""
    return not text.strip()


@dataclasses.dataclass(frozen=True)
class Format:
    name: str  # the data.format value
    # How its tokenised items become batch rows (pack.LM, pack.PAIRS, pack.LABELLED);
    # `layout.name` is `Datasets.kind`.
    layout: Layout
    # One parsed JSON value -> the row's normalised data (the only shape later stages see);
    # a value of the wrong shape raises read.BadRow naming the key and what was expected.
    normalise: Callable[[Any], dict]
    # (tokenizer, rows, train_on, label_names) -> one tokenised item per row, in order.
    tokenize: Callable[..., list]
    # (data, train_on) -> the clean.py reason a row has nothing to train ("empty", ...), or None.
    empty_reason: Callable[[dict, str | None], str | None]
    # The messages of a row whose roles data.clean.roles checks.
    messages: Callable[[dict], list[dict]] = no_messages
    # (rows, data.labels) -> class names in label-id order, for formats whose items carry a label.
    label_names: Callable[[Sequence[Any], Sequence[str] | None], tuple[str, ...]] | None = None
    # Whether data.train_on applies (the schema's x-ftc-when on data.train_on lists the same formats).
    uses_train_on: bool = False

    def check_train_on(self, train_on: str | None) -> None:
        if self.uses_train_on and train_on not in TRAIN_ON:
            raise ValueError(f"train_on {train_on!r} is not 'assistant' or 'all'")
