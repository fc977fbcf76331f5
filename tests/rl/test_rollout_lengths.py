"""How long a rollout's completions are: grpo_max_new_tokens is what the sampler is given, from
one token up to what model.max_seq_len leaves past the prompt, also where that runs past
config.json's max_position_embeddings (a rotary model runs there; the plan notes it)."""

from __future__ import annotations

import pytest
import rl_testlib as rl

SPEC = """ftc = 1
name = "{name}"
output_dir = "{root}/runs"
[model]
base = "{root}/base"
max_seq_len = {seq}
dtype = "float32"
[data]
format = "prompt"
train = "{root}/prompts.jsonl"
[training]
objective = "grpo"
steps = 1
batch_size = 8
micro_batch_size = 8
log_every = 1
grpo_group_size = 4
grpo_max_new_tokens = {new}
grpo_rewards = [{{ kind = "length", min_tokens = 2, max_tokens = 4 }}]
[mesh]
fsdp = 8
[logging]
progress = false
"""


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return rl.make_root(tmp_path_factory.mktemp("rollout-lengths"))


def _rollout(root, name, seq, new):
    from ftc.backends.jax import pipeline as run_lib

    spec = rl.load(root, SPEC, name, seq=seq, new=new)
    assert run_lib.run(spec, echo=lambda s: None)["step"] == 1
    (row,) = rl.train_metrics(spec)
    return row


def test_completions_run_to_max_new_tokens_past_the_models_max_position_embeddings(root):
    """The tiny Llama's config says 64 positions and the prompts have 30 tokens: the sampler cut
    every completion at 34 tokens although max_seq_len 112 leaves room for the 80 asked for."""
    row = _rollout(root, "past-positions", seq=112, new=80)
    assert row["completions/max_length"] > 34, row
    assert row["completions/max_length"] <= 80


def test_a_one_token_completion_trains(root):
    row = _rollout(root, "one-token", seq=48, new=1)
    assert row["completions/max_length"] == row["completions/min_length"] == 1.0
    assert row["completions/mean_length"] == 1.0 and row["reward"] == 0.5  # length: 1 token of at least 2
