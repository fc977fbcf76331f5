"""sharegpt: ShareGPT conversations, trained as chat rows.

Row: `{"conversations": [{"from", "value", optional "weight": 0|1}], optional "system": str}`
(turns written `{"role", "content"}` under `conversations`, as some exports do, read alike).
`from` names the speaker: human / user -> user, gpt / assistant / chatgpt -> assistant,
system -> system, observation / tool -> tool, function_call -> assistant; any other name is
kept as the role (data.clean.roles then decides). A top-level `system` string becomes a leading
system message. Normalised: the chat format's `{"messages": [{"role", "content", "weight"?}]}`,
so everything after reading (cleaning, the chat template, train_on, packing) is chat's.
"""

from __future__ import annotations

import dataclasses

from ftc.backends.jax.data.formats import chat
from ftc.backends.jax.data.read import (
    BadRow,
    columns_to_rows,
    expect_object,
    expect_string,
    expect_weight,
    json_text,
    kind_of,
)

ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "system": "system",
    "observation": "tool",
    "tool": "tool",
    "function_call": "assistant",
}


def normalise(record) -> dict:
    record = expect_object(record)
    if "conversations" not in record:
        raise BadRow('missing key \'conversations\', expected an array of {"from", "value"} turns')
    turns = columns_to_rows(json_text(record["conversations"], "conversations"))
    if not isinstance(turns, list) or not turns:
        what = "an empty array" if turns == [] else kind_of(turns)
        raise BadRow(f'\'conversations\' is {what}, expected a non-empty array of {{"from", "value"}} turns')
    messages = []
    if record.get("system") is not None:
        messages.append({"role": "system", "content": expect_string(record, "system")})
    for i, turn in enumerate(turns):
        here = f"conversations[{i}]"
        if not isinstance(turn, dict):
            raise BadRow(f'{here!r} is {kind_of(turn)}, expected a turn object {{"from", "value"}}')
        speaker_key, text_key = ("role", "content") if "from" not in turn and "role" in turn else ("from", "value")
        speaker = expect_string(turn, speaker_key, here + ".")
        message = {"role": ROLES.get(speaker, speaker), "content": expect_string(turn, text_key, here + ".")}
        if "weight" in turn:
            message["weight"] = expect_weight(turn["weight"], here + ".weight")
        messages.append(message)
    return {"messages": messages}


FORMAT = dataclasses.replace(chat.FORMAT, name="sharegpt", normalise=normalise)
