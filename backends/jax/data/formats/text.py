"""text: plain text, every token trained.

Row: `{"text"}`, a string; normalised to the same key.
Tokens: tokenizer(text) with its own special tokens (bos/eos as its config says), all weight 1.
"""

from __future__ import annotations

import numpy as np

from ftc.backends.jax.data import pack, tokenize
from ftc.backends.jax.data.formats.base import Format, blank
from ftc.backends.jax.data.read import expect_object, expect_string


def normalise(record) -> dict:
    return {"text": expect_string(expect_object(record), "text")}


def tokenize_rows(tokenizer, rows, train_on, label_names):
    encoded = tokenize.encode_texts(tokenizer, [r.data["text"] for r in rows])
    return [tokenize.Tokens(r.where, tokenize.i32(ids), np.ones(len(ids), np.float32)) for r, ids in zip(rows, encoded)]


def empty_reason(data: dict, train_on: str | None) -> str | None:
    return "empty" if blank(data["text"]) else None


FORMAT = Format(
    name="text",
    layout=pack.LM,
    normalise=normalise,
    tokenize=tokenize_rows,
    empty_reason=empty_reason,
)
