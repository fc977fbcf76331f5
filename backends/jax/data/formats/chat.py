"""chat: OpenAI-style conversations.

Row: `{"messages": [{"role", "content", optional "weight": 0|1}]}`. Content may be a string or a
list of `{"type": "text", "text": ...}` parts (joined). Columns of equal length
(`{"role": [...], "content": [...]}`, how tfds returns a Sequence feature) are read as rows.
Normalised: `{"messages": [{"role": str, "content": str, "weight"?: int}]}`.

Rendered with the tokenizer's chat template (tokenize.py finds each turn's tokens).
train_on="assistant" trains every assistant turn with weight != 0, never system/user tokens;
train_on="all" trains every token of every turn except turns with weight 0.
"""

from __future__ import annotations

from ftc.backends.jax.data import pack, tokenize
from ftc.backends.jax.data.formats.base import Format, blank
from ftc.backends.jax.data.read import BadRow, expect_messages, expect_object


def normalise(record) -> dict:
    record = expect_object(record)
    if "messages" not in record:
        raise BadRow('missing key \'messages\', expected an array of {"role", "content"} messages')
    return {"messages": expect_messages(record["messages"], "messages")}


def tokenize_rows(tokenizer, rows, train_on, label_names):
    return tokenize.chat_tokens(tokenizer, [(r.where, r.data["messages"], None) for r in rows], train_on)


def empty_reason(data: dict, train_on: str | None) -> str | None:
    messages = data["messages"]
    if all(blank(m["content"]) for m in messages):
        return "empty"
    trained = [
        m
        for m in messages
        if (train_on == "all" or m["role"] == "assistant") and m.get("weight", 1) and not blank(m["content"])
    ]
    return None if trained else "no_assistant_turn"


FORMAT = Format(
    name="chat",
    layout=pack.LM,
    normalise=normalise,
    tokenize=tokenize_rows,
    empty_reason=empty_reason,
    messages=lambda data: data["messages"],
    uses_train_on=True,
)
