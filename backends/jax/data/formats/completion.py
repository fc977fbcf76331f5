"""completion: a prompt and the text that should follow it.

Row: `{"prompt", "completion"}`, both strings; normalised to the same keys.
Tokens: [bos if the tokenizer adds one] + prompt (weight 0) + completion + eos (weight 1).
"""

from __future__ import annotations

from ftc.backends.jax.data import pack, tokenize
from ftc.backends.jax.data.formats.base import Format, blank
from ftc.backends.jax.data.read import expect_object, expect_string


def normalise(record) -> dict:
    record = expect_object(record)
    return {"prompt": expect_string(record, "prompt"), "completion": expect_string(record, "completion")}


def tokenize_rows(tokenizer, rows, train_on, label_names):
    return [tokenize.completion_tokens(tokenizer, r.where, r.data["prompt"], r.data["completion"]) for r in rows]


def empty_reason(data: dict, train_on: str | None) -> str | None:
    return "empty" if blank(data["completion"]) else None


FORMAT = Format(
    name="completion",
    layout=pack.LM,
    normalise=normalise,
    tokenize=tokenize_rows,
    empty_reason=empty_reason,
    uses_train_on=True,
)
