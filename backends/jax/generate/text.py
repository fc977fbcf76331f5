"""Between tokens and text: prompts rendered for the model, stop strings, streamed text.

    ids = encode_prompt(tokenizer, [{"role": "user", "content": "Hi"}])   # chat template + generation prompt
    ids = encode_prompt(tokenizer, "Once upon a time", raw=True)          # the text as is (with bos)
    stops = StopStrings(tokenizer, ["\\n\\n"], rows=2)                    # sampler.stream's `stop=`
    text = stops.text(tokens)                                            # cut before the first stop string

A chat prompt is rendered with the tokenizer's own chat template (`add_generation_prompt=True`)
and tokenised without adding special tokens again, exactly as the training data is (data/tokenize.py).
Text is decoded with special tokens skipped, so an EOS or end-of-turn token never shows.
"""

from __future__ import annotations

from collections.abc import Sequence

from ftc.backends.jax.generate.sampler import Snapshot


class TemplateError(ValueError):
    """A chat prompt the tokenizer's chat template cannot render (or a tokenizer without one)."""


def encode_prompt(tokenizer, prompt: str | Sequence[dict], *, raw: bool = False) -> list[int]:
    """Token ids of a prompt: messages through the chat template, text as is (raw)."""
    if isinstance(prompt, str) and (raw or not getattr(tokenizer, "chat_template", None)):
        return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if not getattr(tokenizer, "chat_template", None):
        raise TemplateError("the model's tokenizer has no chat template: give plain text prompts (--raw)")
    plain = [{"role": m["role"], "content": m["content"]} for m in messages]
    try:
        text = tokenizer.apply_chat_template(plain, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # jinja errors, raise_exception() in templates (e.g. role alternation)
        raise TemplateError(f"the chat template refused these messages: {type(e).__name__}: {e}") from e
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def decode(tokenizer, tokens: Sequence[int]) -> str:
    return tokenizer.decode(list(tokens), skip_special_tokens=True)


class StopStrings:
    """Ends a row when its text contains a stop string: pass as `sampler.stream(stop=...)`."""

    def __init__(self, tokenizer, stops: Sequence[str]):
        self.tokenizer = tokenizer
        self.stops = tuple(s for s in stops if s)

    def __call__(self, snap: Snapshot) -> list[bool]:
        if not self.stops:
            return [False] * len(snap.tokens)
        return [self.first(decode(self.tokenizer, tokens)) is not None for tokens in snap.tokens]

    def first(self, text: str) -> int | None:
        """Where the earliest stop string starts in `text`, or None."""
        found = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        return min(found) if found else None

    def text(self, tokens: Sequence[int]) -> str:
        """The row's text, cut before its first stop string."""
        text = decode(self.tokenizer, tokens)
        cut = self.first(text)
        return text if cut is None else text[:cut]

    def settle(self, tokens: Sequence[int], finish: str) -> tuple[list[int], str]:
        """(tokens up to the one that completes the first stop string, "stop_string") when the
        row's text holds one, else (tokens, finish) as they are. A batch checks its stops every
        few tokens, so a row may have run past its stop, even to an EOS (finish "stop"); its
        completion_tokens and finish_reason then say what the completion holds, as streamed."""
        tokens = list(tokens)
        if not self.stops or self.first(decode(self.tokenizer, tokens)) is None:
            return tokens, finish
        n = len(tokens)
        while n > 1 and self.first(decode(self.tokenizer, tokens[: n - 1])) is not None:
            n -= 1
        return tokens[:n], "stop_string"

    def held_back(self, text: str) -> int:
        """How many trailing characters could still become a stop string (not safe to print yet)."""
        return max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)


class TextStream:
    """The new printable text of one row as its tokens grow: never half a UTF-8 character, never
    (part of) a stop string."""

    def __init__(self, tokenizer, stops: StopStrings):
        self.tokenizer = tokenizer
        self.stops = stops
        self.shown = 0

    def update(self, tokens: Sequence[int], final: bool) -> str:
        text = self.stops.text(tokens)
        if not final:
            safe = len(text.rstrip("\ufffd"))  # an incomplete multi-byte character decodes to U+FFFD
            text = text[: safe - self.stops.held_back(text[:safe])]
        new = text[self.shown :]
        self.shown = max(self.shown, len(text))
        return new
