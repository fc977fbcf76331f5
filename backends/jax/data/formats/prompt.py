"""prompt: what an online RL objective (grpo) samples completions for.

Row: `{"messages": [{"role", "content"}, ...], "answer"?: str | number}` -- OpenAI's chat format
as its reinforcement fine-tuning takes it: the conversation so far (ending with a user or system
message: the model answers next) and, optionally, the reference answer the `exact_match`,
`contains` and `numeric` rewards compare with. Other keys are ignored. TRL's GRPO rows read too:
`{"prompt": [messages]}`, or `{"prompt": "text"}` as one user message.
Normalised: `{"messages": [...], "answer": str | None, "text": str | None}` (`text`: the prompt
string of a `{"prompt": "text"}` row).

Tokens: the messages through the chat template with the generation prompt, no weight (nothing of
a prompt is trained; the completion sampled from it is). A tokenizer without a chat template (a
base model's) takes a text prompt as it is, as TRL does; message prompts need the template.
"""

from __future__ import annotations

import numpy as np

from ftc.backends.jax.data import pack
from ftc.backends.jax.data.formats.base import Format, blank
from ftc.backends.jax.data.read import BadRow, DataError, expect_messages, expect_object, kind_of


def normalise(record) -> dict:
    record = expect_object(record)
    text = None
    if "messages" in record:
        messages = expect_messages(record["messages"], "messages")
    elif isinstance(record.get("prompt"), str):  # TRL's GRPO rows: a text prompt is the user's turn
        text = record["prompt"]
        messages = [{"role": "user", "content": text}]
    elif "prompt" in record:  # TRL's conversational GRPO rows
        messages = expect_messages(record["prompt"], "prompt")
    else:
        raise BadRow(
            'missing key \'messages\', expected an array of {"role", "content"} messages (the prompt; '
            "TRL's 'prompt', a string or messages, reads too)"
        )
    if messages[-1]["role"] == "assistant":
        raise BadRow(
            "'messages' ends with an assistant message: expected the prompt only (it ends with the user's "
            "turn); put the expected answer in 'answer'"
        )
    answer = record.get("answer")
    if isinstance(answer, bool) or not (answer is None or isinstance(answer, (str, int, float))):
        raise BadRow(f"'answer' is {kind_of(answer)}, expected a string or a number")
    return {"messages": messages, "answer": None if answer is None else str(answer), "text": text}


def prompt_ids(tokenizer, messages) -> list[int]:
    """The prompt's token ids: the chat template with the generation prompt (generate/text.py)."""
    from ftc.backends.jax.generate.text import encode_prompt

    return encode_prompt(tokenizer, list(messages))


def tokenize_rows(tokenizer, rows, train_on, label_names):
    from ftc.backends.jax.data.tokenize import Tokens

    templated = bool(getattr(tokenizer, "chat_template", None))
    out = []
    for r in rows:
        if templated:
            ids = prompt_ids(tokenizer, r.data["messages"])
        elif r.data.get("text") is not None:  # a base model: the text is the prompt (with BOS)
            ids = list(tokenizer(r.data["text"], add_special_tokens=True)["input_ids"])
        else:
            raise DataError(
                f"{r.where}: the tokenizer has no chat template, and a prompt of messages is rendered with it; "
                'set model.tokenizer to a chat model\'s tokenizer, or write the prompt as text: {"prompt": "..."}'
            )
        ids = np.asarray(ids, np.int32)
        out.append(Tokens(r.where, ids, np.zeros(len(ids), np.float32)))
    return out


def empty_reason(data: dict, train_on: str | None) -> str | None:
    return "empty" if all(blank(m["content"]) for m in data["messages"]) else None


FORMAT = Format(
    name="prompt",
    layout=pack.LM,
    normalise=normalise,
    tokenize=tokenize_rows,
    empty_reason=empty_reason,
    messages=lambda data: data["messages"],
)
