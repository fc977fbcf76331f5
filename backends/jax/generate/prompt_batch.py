"""Prompts laid out for the sampler (generate/sampler.py): bucketed shapes, left padding, limits."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

MIN_PROMPT_BUCKET = 16
MIN_NEW_BUCKET = 16


class PromptError(ValueError):
    """A prompt the sampler cannot run (empty, longer than the model's context)."""


def bucket(n: int, minimum: int) -> int:
    """The smallest 2^k or 1.5 x 2^k >= max(n, minimum): shapes compile once per bucket, not per
    prompt, and padding wastes at most a third of a bucket."""
    power = max(minimum, 1 << max(n - 1, 0).bit_length())
    three_quarters = power * 3 // 4
    return three_quarters if power > minimum and three_quarters >= n and power % 4 == 0 else power


@dataclasses.dataclass(frozen=True)
class PromptBatch:
    """Prompts laid out for the sampler (numpy): left-padded ids, lengths, per-row token limits."""

    ids: np.ndarray  # int32 [B, P]
    lengths: np.ndarray  # int32 [B]
    limits: np.ndarray  # int32 [B]: tokens row b may generate (0 for the padding rows)
    rows: int  # real rows (the first `rows` of B)
    new_tokens: int  # N, the bucketed token buffer


def lay_out(prompts: Sequence[Sequence[int]], max_new_tokens: int, context: int, pad_id: int) -> PromptBatch:
    """Bucket and left-pad `prompts`; refuses an empty prompt or one that fills the context."""
    if not prompts:
        raise PromptError("no prompts to generate from")
    lengths = [len(p) for p in prompts]
    for i, n in enumerate(lengths):
        if n == 0:
            raise PromptError(f"prompt {i} is empty (0 tokens)")
        if n >= context:
            raise PromptError(
                f"prompt {i} has {n} tokens; the model's context is {context} positions, so it leaves no room "
                f"to generate (shorten it below {context} tokens)"
            )
    B = bucket(len(prompts), 1)
    P = bucket(max(lengths), MIN_PROMPT_BUCKET)
    ids = np.full((B, P), pad_id, np.int32)
    for i, p in enumerate(prompts):
        ids[i, P - len(p) :] = np.asarray(p, np.int32)
    lengths_B = np.ones(B, np.int32)
    lengths_B[: len(prompts)] = lengths
    limits = np.zeros(B, np.int32)
    limits[: len(prompts)] = [min(max_new_tokens, context - n) for n in lengths]
    return PromptBatch(ids, lengths_B, limits, len(prompts), bucket(max_new_tokens, MIN_NEW_BUCKET))
