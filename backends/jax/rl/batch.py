"""Rollout batches: prompt + completion token ids -> the causal-LM rows the RL objectives train on.

A row is one sequence prompt + completion, right-padded to `seq_len` positions in the data
pipeline's layout (data/pack.py): input_ids = tokens[:-1], targets = tokens[1:], segment_ids 1 on
real positions, positions 0.., and weights 1 exactly on the targets that are completion tokens
(the token mask of objectives/grpo.py). Completion token c of a prompt of length P is the target
at position P - 1 + c, so per-completion-token arrays (log-probs, KL) are placed there.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def completion_rows(
    prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], seq_len: int
) -> dict[str, np.ndarray]:
    """[N, seq_len] rows for N (prompt, completion) pairs; a completion may be empty (no weight)."""
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    n = len(prompts)
    rows = {k: np.zeros((n, seq_len), np.int32) for k in ("input_ids", "targets", "segment_ids", "positions")}
    rows["weights"] = np.zeros((n, seq_len), np.float32)
    for i, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
        if not prompt:
            raise ValueError(f"row {i}: an empty prompt has no position to predict the completion from")
        tokens = np.asarray(list(prompt) + list(completion), np.int32)
        k = len(tokens) - 1  # positions used
        if k > seq_len:
            raise ValueError(
                f"row {i}: prompt {len(prompt)} + completion {len(completion)} tokens need {k} positions, "
                f"more than seq_len={seq_len}"
            )
        rows["input_ids"][i, :k] = tokens[:-1]
        rows["targets"][i, :k] = tokens[1:]
        rows["segment_ids"][i, :k] = 1
        rows["positions"][i, :k] = np.arange(k)
        rows["weights"][i, len(prompt) - 1 : k] = 1.0
    return rows


def place_completion_values(
    prompt_lengths: Sequence[int], values_NC: np.ndarray, mask_NC: np.ndarray, seq_len: int
) -> np.ndarray:
    """[N, seq_len] float32: per-completion-token values [N, C] at their target positions (row layout
    above); positions outside a completion's masked tokens are 0."""
    out = np.zeros((len(prompt_lengths), seq_len), np.float32)
    for i, p in enumerate(prompt_lengths):
        c = int(np.count_nonzero(mask_NC[i]))
        out[i, p - 1 : p - 1 + c] = values_NC[i, :c]
    return out
