"""Turn normalised rows (data_read) into token ids and per-token loss weights.

`Tokens.weights[i]` is the loss weight of token i as a prediction target (predicted from the
tokens before it); `weights[0]` is never used. Weights are 0/1 here; data_pack shifts them.

Chat rows are rendered with the tokenizer's own chat template. Which tokens belong to which turn
is derived, not trusted to `return_assistant_tokens_mask` (that needs `{% generation %}` blocks,
which most templates lack): render messages[:i] and messages[:i+1]; the difference is turn i.
Every rendering must be a prefix of the next (checked). A template that rewrites earlier turns
once later ones follow (Qwen3's drops the <think> block of answers before the last question) is
trained, under train_on="assistant", as one sequence per assistant turn: the conversation up to
that turn, the turn rendered last, as the model writes it (`each_turn_last`; its rows are named
"where (assistant turn k of n)"); under train_on="all" it is refused with the row named. The full text is
tokenised once with offsets, and a token belongs to the turn its first character falls in.
An assistant turn's supervised span starts after the generation prompt (`<|im_start|>assistant\n`,
rendered with add_generation_prompt=True when that is a prefix of the turn) and ends at the last
non-space character of the turn, so the end-of-turn token (`<|im_end|>`, `<|eot_id|>`) is
trained and the newline the template writes after it is not. Nothing is masked by comparing
ids with pad, so pad == eos still trains the end of every turn.

What each format supervises is in its module (data/formats/); this module holds the shared
machinery (chat turns, prompt + completion) and runs a format's `tokenize` in chunks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from ftc.backends.jax.data import formats
from ftc.backends.jax.data.read import DataError, Row


@dataclasses.dataclass(frozen=True)
class Tokens:
    where: str
    ids: np.ndarray  # int32 [n]
    weights: np.ndarray  # float32 [n]; loss weight of token i as a target


@dataclasses.dataclass(frozen=True)
class Pair:
    where: str
    chosen: Tokens
    rejected: Tokens


@dataclasses.dataclass(frozen=True)
class Labelled:
    where: str
    ids: np.ndarray  # int32 [n]
    label: int


CHUNK_ROWS = 2048  # rows per tokenizer call: large enough for the fast tokenizer's batching


def tokenize_rows(
    rows: Sequence[Row],
    *,
    format: str,
    tokenizer: Any,
    train_on: str | None = None,
    label_names: Sequence[str] | None = None,
    progress: str | None = None,
) -> list[Tokens | Pair | Labelled]:
    """One tokenised item per row, in order. `progress`: a label for a progress bar with ETA,
    shown once tokenising has taken more than 2 s (about 3,000 chat rows/s on one CPU core).
    `train_on` is data.train_on, for the formats it applies to (None for the others)."""
    fmt = formats.get(format)
    fmt.check_train_on(train_on)
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(
            f"tokenizer {type(tokenizer).__name__} is not a fast (tokenizers-backed) "
            "tokenizer; ftc needs character offsets to find assistant turns"
        )
    if len(rows) <= CHUNK_ROWS:
        return fmt.tokenize(tokenizer, rows, train_on, label_names)
    from tqdm import tqdm

    out: list = []
    with tqdm(
        total=len(rows),
        desc=progress or "tokenizing",
        unit="row",
        delay=2.0,
        leave=False,
        disable=progress is None,
        dynamic_ncols=True,
    ) as bar:
        for start in range(0, len(rows), CHUNK_ROWS):
            chunk = rows[start : start + CHUNK_ROWS]
            out += fmt.tokenize(tokenizer, chunk, train_on, label_names)
            bar.update(len(chunk))
    return out


def encode_texts(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text with the tokenizer's own special tokens (bos/eos as its config says)."""
    return tokenizer(list(texts), add_special_tokens=True)["input_ids"] if texts else []


def i32(ids) -> np.ndarray:
    return np.asarray(ids, dtype=np.int32)


# ---------------------------------------------------------------------------- chat


RENDERED_KEYS = ("role", "content", "tool_calls", "tool_call_id", "name")  # not "weight": ftc's own


def _render(tokenizer, where: str, messages: list[dict], generation_prompt: bool = False, tools=None) -> str:
    if not messages and not generation_prompt:
        return ""
    plain = [{k: m[k] for k in RENDERED_KEYS if k in m} for m in messages]
    extra = {"tools": tools} if tools else {}
    try:
        text = tokenizer.apply_chat_template(plain, tokenize=False, add_generation_prompt=generation_prompt, **extra)
    except Exception as e:  # jinja errors, raise_exception() in templates (e.g. role alternation)
        raise DataError(
            f"{where}: the tokenizer's chat template refused this conversation: {type(e).__name__}: {e}"
        ) from e
    if not isinstance(text, str):
        raise DataError(f"{where}: apply_chat_template(tokenize=False) returned {type(text).__name__}, expected str")
    return text


def turn_spans(
    tokenizer, where: str, messages: list[dict], trained: Sequence[bool], whole_turns: bool = False, tools=None
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans [start, end) to train.

    `trained[i]` says whether turn i is supervised. With `whole_turns` (train_on="all") a span is
    all of the turn's rendering; otherwise it leaves out the generation prompt and the trailing
    whitespace (see module docstring). `tools`: the row's tool definitions, for the template."""

    def render(msgs, generation_prompt=False):
        return _render(tokenizer, where, msgs, generation_prompt, tools)

    full = render(messages)
    spans, prev = [], ""
    for i, message in enumerate(messages):
        upto = full if i == len(messages) - 1 else render(messages[: i + 1])
        if message.get("tool_calls"):
            without = {k: v for k, v in message.items() if k != "tool_calls"}
            if render([*messages[:i], without]) == upto:
                raise DataError(
                    f"{where}: messages[{i}] calls tools, and the tokenizer's chat template does not write "
                    "tool_calls (training on it would teach an empty turn); use a template that renders them"
                )
        if not upto.startswith(prev) or not full.startswith(upto):
            raise NotPrefixStable(
                f"{where}: the chat template does not render conversations prefix by prefix "
                f"(rendering messages[:{i + 1}] does not extend messages[:{i}], or is not the start of "
                f"the whole conversation); ftc finds each turn's tokens from those prefixes. Use a "
                f"template that renders earlier turns the same whatever follows them."
            )
        if trained[i] and whole_turns:
            spans.append((len(prev), len(upto)))
        elif trained[i]:
            start, end = len(prev), len(upto.rstrip())
            if message["role"] == "assistant":
                header = render(messages[:i], generation_prompt=True)
                if upto.startswith(header) and len(prev) <= len(header) <= end:
                    start = len(header)
            if start < end:
                spans.append((start, end))
        prev = upto
    return full, spans


def trains(message: dict, train_on: str) -> bool:
    """Whether a chat turn is supervised. An assistant turn with no text and no tool call is not
    (under "assistant"): it would teach an empty answer, and data.clean already counts a row whose
    only answers are empty as having no assistant turn."""
    if message.get("weight", 1) == 0:
        return False
    if train_on == "all":
        return True
    return message["role"] == "assistant" and bool(message["content"].strip() or message.get("tool_calls"))


class NotPrefixStable(DataError):
    """The template renders an earlier turn differently once later turns follow it."""


def each_turn_last(tokenizer, where: str, messages: list[dict], trained: Sequence[bool], tools=None):
    """For a template that is not prefix-stable (Qwen3's leaves out the <think> block of answers
    before the last question): one sequence per trained assistant turn, the conversation up to it
    with that turn rendered last, as the model will write it, and trained alone; earlier turns
    read as the template writes history. [(where, text, spans)], or None where the turns cannot be
    found this way either (a trained turn that is not the assistant's; a header not a prefix)."""
    turns = [i for i, t in enumerate(trained) if t]
    out = []
    for n, i in enumerate(turns, start=1):
        if messages[i]["role"] != "assistant":
            return None
        text = _render(tokenizer, where, messages[: i + 1], tools=tools)
        header = _render(tokenizer, where, messages[:i], generation_prompt=True, tools=tools)
        end = len(text.rstrip())
        if not text.startswith(header):
            return None
        named = where if len(turns) == 1 else f"{where} (assistant turn {n} of {len(turns)})"
        out.append((named, text, [(len(header), end)] if len(header) < end else []))
    return out


def _weights_from_spans(offsets, spans) -> np.ndarray:
    starts = np.asarray([s for s, _ in offsets], dtype=np.int64)
    weights = np.zeros(len(starts), np.float32)
    for lo, hi in spans:
        weights[(starts >= lo) & (starts < hi)] = 1.0
    return weights


def chat_tokens(
    tokenizer, conversations: Sequence[tuple[str, list[dict], Sequence[bool] | None]], train_on: str
) -> list[Tokens]:
    """(where, messages, trained-or-None[, tools]) each -> Tokens; one tokenizer call for all texts.
    One Tokens per conversation, except under a template that is not prefix-stable, where
    train_on="assistant" gives one per trained assistant turn (each_turn_last)."""
    if conversations and not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"{conversations[0][0]}: the tokenizer has no chat template, and conversations (messages) are "
            "rendered with it; set model.tokenizer to a chat model's tokenizer (an -Instruct one), or write "
            "the rows as completion (prompt, completion) or text rows"
        )
    pieces = []  # (where, text, spans): one per conversation, or per turn (each_turn_last)
    for where, messages, trained, *tools in conversations:  # tools: a chat row's tool definitions
        tools = next(iter(tools), None)
        if trained is None:
            trained = [trains(m, train_on) for m in messages]
        try:
            text, spans = turn_spans(tokenizer, where, messages, trained, whole_turns=train_on == "all", tools=tools)
            pieces.append((where, text, spans))
        except NotPrefixStable:
            split = None if train_on == "all" else each_turn_last(tokenizer, where, messages, trained, tools)
            if split is None:
                raise
            pieces += split
    if not pieces:
        return []
    enc = tokenizer([text for _, text, _ in pieces], add_special_tokens=False, return_offsets_mapping=True)
    return [
        Tokens(where, i32(ids), _weights_from_spans(offsets, spans))
        for (where, _, spans), ids, offsets in zip(pieces, enc["input_ids"], enc["offset_mapping"])
    ]


# ---------------------------------------------------------------------------- completion


def _bos_prefix(tokenizer) -> list[int]:
    """The special tokens the tokenizer puts before a text (e.g. [bos]), from how it encodes one."""
    with_specials = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    for k in range(len(with_specials) - len(plain) + 1):
        if with_specials[k : k + len(plain)] == plain:
            return list(with_specials[:k])
    return []


def _eos_id(tokenizer, where: str) -> int:
    if tokenizer.eos_token_id is None:
        raise DataError(
            f"{where}: the tokenizer has no eos token; completions end with one so the model learns to stop"
        )
    return int(tokenizer.eos_token_id)


def completion_tokens(tokenizer, where: str, prompt: str, completion: str) -> Tokens:
    head = _bos_prefix(tokenizer) + tokenizer(prompt, add_special_tokens=False)["input_ids"]
    tail = tokenizer(completion, add_special_tokens=False)["input_ids"] + [_eos_id(tokenizer, where)]
    weights = np.concatenate([np.zeros(len(head), np.float32), np.ones(len(tail), np.float32)])
    return Tokens(where, i32(head + tail), weights)
