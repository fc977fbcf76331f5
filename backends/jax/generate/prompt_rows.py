"""Prompt files for `ftc generate --file` and `ftc eval`: JSONL, one prompt per line (or any file
kind training data comes in: data/sources/).

    {"messages": [{"role": "system", ...}, {"role": "user", "content": "Hi"}]}   OpenAI chat rows
    {"prompt": "Once upon a time"}                                               completion rows
A chat row whose last message is the assistant's has that message as its reference answer (it is
left out of the prompt); a completion row's reference is its "completion". Other keys are kept and
written back beside the completion. Every problem names its file:line and what was expected.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from ftc.backends.jax.data import sources as data_sources
from ftc.backends.jax.data.read import BadRow, DataError, expect_messages, expect_object, expect_string


@dataclasses.dataclass(frozen=True)
class PromptRow:
    where: str  # "path:line" (a source's row name: data/sources/)
    record: dict  # the row as read
    prompt: str | tuple[dict, ...]  # text, or messages without the reference
    reference: str | None  # the expected answer, when the row has one


def parse_row(record) -> tuple[str | tuple[dict, ...], str | None]:
    """(prompt, reference) of one row, or BadRow saying what was expected."""
    record = expect_object(record)
    if "messages" in record:
        messages = expect_messages(record["messages"], "messages")
        if messages[-1]["role"] == "assistant":
            if len(messages) == 1:
                raise BadRow("'messages' holds only an assistant message: expected a prompt (a user message) before it")
            return tuple(messages[:-1]), messages[-1]["content"]
        return tuple(messages), None
    if "prompt" in record:
        reference = expect_string(record, "completion") if "completion" in record else None
        return expect_string(record, "prompt"), reference
    raise BadRow(
        f"no 'messages' or 'prompt' key (keys: {', '.join(sorted(record)) or 'none'}); expected "
        '{"messages": [{"role", "content"}, ...]} or {"prompt": "..."}'
    )


def read_prompt_rows(path: str | Path) -> list[PromptRow]:
    """Every row of a prompt file; DataError listing every bad row (file:line) otherwise. The file is
    read as training data is (data/sources/: JSONL, a JSON array, CSV/TSV, Parquet, compressed),
    so a spec's data.validation always reads as prompts for `ftc eval` and a run's samples."""
    entry = os.fspath(path)
    try:
        source = data_sources.source_for(entry)
    except ValueError:  # jsonl claims any file: nothing claims a missing one
        what = "a directory, expected a file" if os.path.isdir(entry) else "no such file"
        raise DataError(f"{path}: cannot read the prompt file ({what})") from None
    rows, problems = [], []
    try:
        for where, record in source.records(entry, None):
            try:
                if isinstance(record, BadRow):
                    raise record
                prompt, reference = parse_row(record)
            except BadRow as e:
                problems.append(f"{where}: {e}")
                continue
            rows.append(PromptRow(where, record, prompt, reference))
    except OSError as e:
        raise DataError(f"{path}: cannot read the prompt file ({e.strerror or e})") from None
    if problems:
        raise DataError(f"{path}: {len(problems)} bad prompt row(s)", problems)
    if not rows:
        raise DataError(f"{path}: no prompt rows (the file is empty); expected one JSON object per line")
    return rows
