"""What one rollout holds, for the plan's memory estimate (compiler/memory.py `RolloutShape`):
the sampler's buckets (generate/sampler.py) applied to an RL spec's sizes, so the KV cache the
plan counts is the one the sampler allocates.

    shape = rollout_shape(completions=16, max_new_tokens=64, max_seq_len=256, reference=True)

A prompt may take up to max_seq_len - max_new_tokens + 1 tokens (rl/loop.py's `prompt_data`), so
the cache is counted for the longest prompt the spec lets through. An objective's record returns
it from `Registered.rollout(spec)`; PPO adds its value head's per-token arrays.
"""

from __future__ import annotations

from ftc.backends.jax.generate.prompt_batch import MIN_NEW_BUCKET, MIN_PROMPT_BUCKET, bucket
from ftc.compiler.memory import RolloutShape


def rollout_shape(
    *, completions: int, max_new_tokens: int, max_seq_len: int, reference: bool, per_token_arrays: int = 0
) -> RolloutShape:
    """The rollout of `completions` rows, each a prompt of at most max_seq_len - max_new_tokens + 1
    tokens plus up to max_new_tokens sampled ones, trained as max_seq_len-position rows."""
    longest_prompt = max(1, max_seq_len - max_new_tokens + 1)
    return RolloutShape(
        sample_rows=bucket(completions, 1),
        cache_slots=bucket(longest_prompt, MIN_PROMPT_BUCKET) + bucket(max_new_tokens, MIN_NEW_BUCKET),
        scored_rows=completions,
        seq_len=max_seq_len,
        reference=reference,
        per_token_arrays=per_token_arrays,
    )
