"""chat: OpenAI-style conversations.

Row: `{"messages": [{"role", "content", optional "weight": 0|1}], optional "tools": [...]}`.
Content may be a string or a list of `{"type": "text", "text": ...}` parts (joined). OpenAI's
tool use reads as written: an assistant message's `tool_calls` (its content may then be null;
`arguments` JSON strings become objects, as chat templates take them), a tool message's
`tool_call_id` / `name`, and the row's `tools` (function definitions), all handed to the chat
template, which must write the calls (checked). Columns of equal length
(`{"role": [...], "content": [...]}`, how tfds returns a Sequence feature) are read as rows.
Normalised: `{"messages": [{"role": str, "content": str, "weight"?: int, "tool_calls"?: [...],
"tool_call_id"?: str, "name"?: str}], "tools"?: [...]}`; other keys are dropped.

Rendered with the tokenizer's chat template (tokenize.py finds each turn's tokens).
train_on="assistant" trains every assistant turn with weight != 0, never system/user tokens;
train_on="all" trains every token of every turn except turns with weight 0.
"""

from __future__ import annotations

from ftc.backends.jax.data import pack, tokenize
from ftc.backends.jax.data.formats.base import Format, blank
from ftc.backends.jax.data.read import BadRow, expect_messages, expect_object, kind_of


def normalise(record) -> dict:
    record = expect_object(record)
    if "messages" not in record:
        raise BadRow('missing key \'messages\', expected an array of {"role", "content"} messages')
    data = {"messages": expect_messages(record["messages"], "messages")}
    tools = record.get("tools")
    if tools is not None and tools != []:
        if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
            raise BadRow(f"'tools' is {kind_of(tools)}, expected an array of tool (function) definitions")
        data["tools"] = tools
    return data


def tokenize_rows(tokenizer, rows, train_on, label_names):
    conversations = [(r.where, r.data["messages"], None, r.data.get("tools")) for r in rows]
    return tokenize.chat_tokens(tokenizer, conversations, train_on)


def said_nothing(message: dict) -> bool:
    """No text and no tool call: a turn with nothing to train."""
    return blank(message["content"]) and not message.get("tool_calls")


def empty_reason(data: dict, train_on: str | None) -> str | None:
    messages = data["messages"]
    if all(said_nothing(m) for m in messages):
        return "empty"
    trained = [
        m
        for m in messages
        if (train_on == "all" or m["role"] == "assistant") and m.get("weight", 1) and not said_nothing(m)
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
