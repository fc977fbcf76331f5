"""preference: a prompt with a preferred and a rejected response (DPO).

Rows, either style:
- OpenAI `{"input": {"messages"}, "preferred_output": [msg], "non_preferred_output": [msg]}`;
- TRL `{"prompt", "chosen", "rejected"}` with strings or message lists (a missing prompt is the
  messages `chosen` and `rejected` share at the start, or for strings, as Anthropic's HH rows, the
  text they share up to its last whitespace; responses that repeat a given prompt's messages
  first are what follows them).
Normalised: `{"prompt", "chosen", "rejected"}`, all strings or all message lists (a string prompt
with message responses becomes one user message; string responses one assistant message).

Tokens: chosen and rejected each as prompt (weight 0) + response (weight 1), built like chat
(message prompts: the response's assistant turns with weight != 0) or completion (string prompts).
"""

from __future__ import annotations

import os

from ftc.backends.jax.data import pack, tokenize
from ftc.backends.jax.data.formats.base import Format, blank
from ftc.backends.jax.data.read import BadRow, DataError, expect_messages, expect_object, kind_of


def _str_or_messages(record: dict, key: str) -> str | list[dict]:
    if key not in record:
        raise BadRow(f"missing key {key!r}, expected a string or an array of messages")
    value = record[key]
    return value if isinstance(value, str) else expect_messages(value, key)


def normalise(record) -> dict:
    record = expect_object(record)
    if "input" in record or "preferred_output" in record:  # OpenAI preference format
        inp = record.get("input")
        if not isinstance(inp, dict):
            raise BadRow(
                "'input' is "
                + ("missing" if inp is None else kind_of(inp))
                + ', expected an object {"messages": [...]}'
            )
        if "messages" not in inp:
            raise BadRow("missing key 'input.messages', expected an array of messages")
        prompt = expect_messages(inp["messages"], "input.messages")
        chosen = expect_messages(record.get("preferred_output"), "preferred_output")
        rejected = expect_messages(record.get("non_preferred_output"), "non_preferred_output")
    elif "chosen" in record or "rejected" in record:  # TRL
        chosen = _str_or_messages(record, "chosen")
        rejected = _str_or_messages(record, "rejected")
        if record.get("prompt") is not None:  # a Parquet column holds null where a row has no prompt
            prompt = _str_or_messages(record, "prompt")
        elif isinstance(chosen, list) and isinstance(rejected, list):
            prompt, chosen, rejected = _split_shared_prefix(chosen, rejected)
        elif isinstance(chosen, str) and isinstance(rejected, str):
            prompt, chosen, rejected = _split_shared_text(chosen, rejected)
        else:
            raise BadRow(
                "missing key 'prompt', expected a string or an array of messages "
                "(it may be left out only when 'chosen' and 'rejected' are both strings or both message arrays)"
            )
    else:
        raise BadRow(
            'missing keys, expected {"input", "preferred_output", "non_preferred_output"} '
            '(OpenAI) or {"prompt", "chosen", "rejected"} (TRL)'
        )
    if any(isinstance(v, list) for v in (prompt, chosen, rejected)):
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        chosen, rejected = (
            [{"role": "assistant", "content": v}] if isinstance(v, str) else _after_prompt(prompt, v)
            for v in (chosen, rejected)
        )
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _after_prompt(prompt: list[dict], response: list[dict]) -> list[dict]:
    """A response list that repeats the prompt's messages first (the whole conversation beside an
    explicit prompt, as UltraFeedback's rows hold it, the prompt a string) is the rest of it;
    rendered as written the prompt would appear twice."""
    if len(response) > len(prompt):
        if response[: len(prompt)] == prompt:
            return response[len(prompt) :]
    return response


def _split_shared_text(chosen: str, rejected: str) -> tuple[str, str, str]:
    """Anthropic HH rows: two transcripts that differ only in the last answer. The prompt is
    their common start, cut at its last whitespace so no word is split between prompt and
    response; a space there starts the responses, as TRL's `extract_prompt` leaves it
    ("...Assistant:" + " The sky."): prompt and response are tokenised apart, and a BPE
    tokenizer writes " The" as one token, so a prompt ending in the space would train a lone
    space token followed by a word without its space, which generation never produces."""
    cut = len(os.path.commonprefix([chosen, rejected]))
    while cut and not chosen[cut - 1].isspace():
        cut -= 1
    if cut and chosen[cut - 1] == " ":
        cut -= 1
    if not chosen[:cut].strip():
        raise BadRow(
            "'chosen' and 'rejected' share no leading text and there is no 'prompt', "
            "expected a prompt (a shared start or a 'prompt' key)"
        )
    return chosen[:cut], chosen[cut:], rejected[cut:]


def _split_shared_prefix(chosen: list[dict], rejected: list[dict]):
    n = 0
    while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
        n += 1
    if n == 0:
        raise BadRow(
            "'chosen' and 'rejected' share no leading messages and there is no 'prompt', "
            "expected a prompt (shared first messages or a 'prompt' key)"
        )
    return chosen[:n], chosen[n:], rejected[n:]


def _pair(tokenizer, row) -> tokenize.Pair:
    prompt = row.data["prompt"]

    def side(response) -> tokenize.Tokens:
        if isinstance(prompt, str):
            return tokenize.completion_tokens(tokenizer, row.where, prompt, response)
        messages = prompt + response
        trained = [False] * len(prompt) + [m["role"] == "assistant" and m.get("weight", 1) != 0 for m in response]
        sequences = tokenize.chat_tokens(tokenizer, [(row.where, messages, trained)], "assistant")
        if len(sequences) != 1:  # a template that is not prefix-stable, and several trained turns
            raise DataError(
                f"{row.where}: the chat template renders earlier turns differently once later ones follow, so a "
                "response of several assistant turns cannot be one sequence; expected one assistant turn"
            )
        return sequences[0]

    return tokenize.Pair(row.where, side(row.data["chosen"]), side(row.data["rejected"]))


def tokenize_rows(tokenizer, rows, train_on, label_names):
    return [_pair(tokenizer, r) for r in rows]


def empty_reason(data: dict, train_on: str | None) -> str | None:
    def responseblank(r):
        return blank(r) if isinstance(r, str) else all(blank(m["content"]) for m in r)

    if responseblank(data["chosen"]) or responseblank(data["rejected"]):
        return "empty"
    return "same_pair" if data["chosen"] == data["rejected"] else None


def messages(data: dict) -> list[dict]:
    return data["prompt"] + data["chosen"] + data["rejected"] if isinstance(data["prompt"], list) else []


FORMAT = Format(
    name="preference",
    layout=pack.PAIRS,
    normalise=normalise,
    tokenize=tokenize_rows,
    empty_reason=empty_reason,
    messages=messages,
)
