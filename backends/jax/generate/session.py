"""What `ftc generate` and `ftc chat` do with a loaded Source: stream one prompt's text to a
writer, complete a prompt file in batches, hold a multi-turn chat. The CLI (ftc/commands/) only
parses options and prints.

Sampling keys: prompt i of a file draws with fold_in(key(seed), i), chat turn t with
fold_in(key(seed), t), so a file's completions do not depend on how it is batched.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Sequence

import jax

from ftc.backends.jax.data.read import DataError
from ftc.backends.jax.generate import sampler as sampler_lib
from ftc.backends.jax.generate.prompt_rows import PromptRow
from ftc.backends.jax.generate.source import Source
from ftc.backends.jax.generate.text import StopStrings, TemplateError, TextStream, encode_prompt


@dataclasses.dataclass(frozen=True)
class Streamed:
    text: str
    completion: sampler_lib.Completion
    prompt_tokens: int
    seconds: float  # prompt in to last token out
    first_token_seconds: float  # prompt in to first token out (prefill)

    @property
    def tokens_per_second(self) -> float:
        decode = self.seconds - self.first_token_seconds
        return (len(self.completion.tokens) - 1) / decode if decode > 0 else float("nan")

    def summary(self) -> str:
        return (
            f"{len(self.completion.tokens)} tokens ({self.completion.finish}) from a {self.prompt_tokens}-token prompt "
            f"in {self.seconds:.2f} s: first token {self.first_token_seconds:.2f} s, then "
            f"{self.tokens_per_second:.1f} tokens/s"
        )


def prompt_ids(source: Source, prompt: str | Sequence[dict], *, raw: bool, system: str | None = None) -> list[int]:
    """A prompt's token ids: chat models through their template (a system message first when
    given) unless `raw`; everything else as plain text."""
    if source.tokenizer is None:
        raise TemplateError(f"{source.name} has no tokenizer files: ftc cannot turn text into tokens for it")
    if isinstance(prompt, str) and (raw or not source.is_chat):
        if system:  # dropped silently, the user would read the completion as if it had been heard
            raise TemplateError(
                f"--system needs a chat template to write it, and {source.name} has none in its tokenizer"
                if not raw
                else "--system is a chat message: the chat template writes it, and --raw leaves the template out"
            )
        return encode_prompt(source.tokenizer, prompt, raw=True)
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system}, *messages]
    return encode_prompt(source.tokenizer, messages)


def stream_one(
    source: Source,
    sampler: sampler_lib.Sampler,
    params,
    ids: Sequence[int],
    key: jax.Array,
    config: sampler_lib.GenerateConfig,
    stops: StopStrings,
    write: Callable[[str], None],
) -> Streamed:
    """Generate from one prompt, writing its text as it grows (one decode step at a time)."""
    shown = TextStream(source.tokenizer, stops)
    started = time.perf_counter()
    first = None
    snap = None
    for snap in sampler_lib.stream(sampler, params, [list(ids)], key, config, chunk=1, stop=stops):
        first = time.perf_counter() - started if first is None else first
        write(shown.update(snap.tokens[0], final=snap.done[0]))
    completion = sampler_lib.Completion(snap.tokens[0], snap.finish[0])
    return Streamed(stops.text(completion.tokens), completion, len(ids), time.perf_counter() - started, first)


def prompt_problem(where: str, ids: Sequence[int], context: int) -> str | None:
    """Why a prompt of these ids cannot be generated from (`where` names it), or None."""
    if not ids:
        return f"{where}: the prompt is empty (0 tokens)"
    if len(ids) >= context:
        return (
            f"{where}: the prompt has {len(ids)} tokens; the model's context is {context} positions, "
            f"which leaves no room to generate"
        )
    return None


def complete_rows(
    source: Source,
    sampler: sampler_lib.Sampler,
    params,
    rows: Sequence[PromptRow],
    seed: int,
    config: sampler_lib.GenerateConfig,
    stops: StopStrings,
    *,
    raw: bool = False,
    system: str | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> list[dict]:
    """Every row with its completion: {**row, "completion", "finish_reason", "prompt_tokens",
    "completion_tokens"}. Every prompt is checked (file:line) before anything is generated."""
    encoded, problems = [], []
    for row in rows:
        try:
            ids = prompt_ids(source, row.prompt, raw=raw, system=system)
        except TemplateError as e:
            problems.append(f"{row.where}: {e}")
            continue
        problem = prompt_problem(row.where, ids, source.context)
        if problem:
            problems.append(problem)
        encoded.append(ids)
    if problems:
        raise DataError(f"{len(problems)} prompt(s) cannot be generated from", problems)
    base_key = jax.random.key(seed)
    order = sorted(range(len(rows)), key=lambda i: len(encoded[i]))  # similar lengths share a batch
    out: list[dict | None] = [None] * len(rows)
    from tqdm import tqdm

    with tqdm(total=len(rows), unit="prompt", disable=not progress, dynamic_ncols=True) as bar:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(base_key, jax.numpy.asarray(chunk))
            *_, snap = sampler_lib.stream(
                sampler,
                params,
                [encoded[i] for i in chunk],
                keys,
                config,
                chunk=16 if stops.stops else None,
                stop=stops,
            )
            for i, tokens, finish in zip(chunk, snap.tokens, snap.finish):
                tokens, finish = stops.settle(tokens, finish)
                out[i] = {
                    **rows[i].record,
                    "completion": stops.text(tokens),
                    "finish_reason": finish,
                    "prompt_tokens": len(encoded[i]),
                    "completion_tokens": len(tokens),
                }
            bar.update(len(chunk))
    return out


def chat(
    source: Source,
    sampler: sampler_lib.Sampler,
    params,
    lines: Iterable[str],
    write: Callable[[str], None],
    seed: int,
    config: sampler_lib.GenerateConfig,
    stops: StopStrings,
    *,
    system: str | None = None,
    reply_prefix: str = "",
) -> list[dict]:
    """A multi-turn chat over `lines` (the user's turns); /reset forgets the history, /exit (or
    the end of input) ends it. Older turns are dropped when the history outgrows the context.
    Returns the final history."""
    base = [{"role": "system", "content": system}] if system else []
    history = list(base)
    turn = 0
    for line in lines:
        text = line.rstrip("\n")
        if text.strip() in ("/exit", "/quit"):
            break
        if text.strip() == "/reset":
            history = list(base)
            write("(history cleared)\n")
        elif text.strip():
            history.append({"role": "user", "content": text})
            try:
                ids = prompt_ids(source, history, raw=False)
            except TemplateError as e:  # this turn only: the conversation goes on without it
                history.pop()
                write(f"({e})\n")
                continue
            while len(ids) + 1 >= source.context and len(history) > len(base) + 1:
                history = base + history[len(base) + 2 :]  # drop the oldest exchange
                write("(oldest turn dropped: the conversation outgrew the model's context)\n")
                ids = prompt_ids(source, history, raw=False)
            if len(ids) >= source.context:
                history.pop()
                write(f"(that message alone is {len(ids)} tokens; the model's context is {source.context})\n")
            else:
                key = jax.random.fold_in(jax.random.key(seed), turn)
                write(reply_prefix)
                reply = stream_one(source, sampler, params, ids, key, config, stops, write)
                write("\n")
                history.append({"role": "assistant", "content": reply.text})
                turn += 1
    return history
