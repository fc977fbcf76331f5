"""A PPO spec through `ftc lint` and `ftc plan`: the reward, answer and length rules GRPO has apply
to the ppo_ keys (one set of rules, by the keys' prefix), PPO's own bounds come from the schema,
another objective's keys are refused; the plan counts the value head's weights as trained, for a
full fine-tune and for LoRA; a fresh value-head model computes exactly its base's logits."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import train_testlib as tl
from data_testlib import write_jsonl

from ftc.spec import lint_file

GOOD = """ftc = 1
name = "p"
[model]
base = "{base}"
max_seq_len = 64
[data]
format = "prompt"
train = "{train}"
{method}[training]
objective = "ppo"
steps = 4
batch_size = 8
micro_batch_size = 8
learning_rate = 1e-5
ppo_max_new_tokens = 16
ppo_rewards = [{{ kind = "numeric" }}, {{ kind = "regex", pattern = "Answer: \\\\d+", weight = 0.5 }}]
"""
LORA = '[method]\nkind = "lora"\nrank = 4\nalpha = 8\n'


def _write(tmp_path, text: str, rows=None, base="/nonexistent/model", method="") -> str:
    train = tmp_path / "prompts.jsonl"
    write_jsonl(train, rows or [{"messages": [{"role": "user", "content": "1+1?"}], "answer": "2"}])
    path = tmp_path / "p.toml"
    path.write_text(text.format(train=train, base=base, method=method))
    return str(path)


def _errors(tmp_path, text: str, rows=None) -> dict[str, str]:
    return {i.key_path: i.message for i in lint_file(_write(tmp_path, text, rows)) if i.severity == "error"}


def test_a_good_ppo_spec_lints_clean(tmp_path):
    assert _errors(tmp_path, GOOD) == {}


def test_the_rl_reward_rules_apply_to_ppo_rewards_with_their_key_paths(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "hi"}]}]
    message = _errors(tmp_path, GOOD, rows)["training.ppo_rewards[0].kind"]
    assert "1 training row(s) have no" in message and "prompts.jsonl:1" in message
    bad_regex = GOOD.replace('"Answer: \\\\d+"', '"(unclosed"')
    assert "not a valid regular expression" in _errors(tmp_path, bad_regex)["training.ppo_rewards[1].pattern"]
    none = _errors(tmp_path, GOOD.replace("ppo_rewards = [", "ppo_rewards = [] #"))
    assert "PPO needs at least one reward" in none["training.ppo_rewards"]
    assert "no room for a prompt" in _errors(tmp_path, GOOD.replace("= 16", "= 64"))["training.ppo_max_new_tokens"]
    typo = _errors(tmp_path, GOOD.replace('kind = "numeric"', 'kind = "numeric", wieght = 2'))
    assert "did you mean 'weight'" in typo["training.ppo_rewards[0].wieght"]  # the shared reward item ($defs)
    chat = _errors(tmp_path, GOOD.replace('format = "prompt"', 'format = "chat"'))
    assert "has no answer field" in chat["training.ppo_rewards[0].kind"]


def test_ppo_bounds_and_other_objectives_keys_are_refused(tmp_path):
    assert "must be <= 1" in _errors(tmp_path, GOOD + "ppo_gamma = 1.5\n")["training.ppo_gamma"]
    assert (
        "must be >= 1" in _errors(tmp_path, GOOD + "ppo_updates_per_rollout = 0\n")["training.ppo_updates_per_rollout"]
    )
    assert "must be > 0" in _errors(tmp_path, GOOD + "ppo_value_clip = 0\n")["training.ppo_value_clip"]
    assert "applies only when" in _errors(tmp_path, GOOD + "grpo_group_size = 4\n")["training.grpo_group_size"]
    sft = _errors(tmp_path, GOOD.replace('objective = "ppo"', 'objective = "sft"'))
    assert "applies only when training.objective is 'ppo'" in sft["training.ppo_rewards"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = tmp_path_factory.mktemp("ppo-plan") / "base"
    tl.make_model_dir(path)
    return str(path)


@pytest.mark.parametrize("method", ["", LORA, LORA.replace('"lora"', '"qlora"') + "quant_block_size = 32\n"])
def test_ftc_plan_of_a_ppo_spec_counts_the_value_head_as_trained(tmp_path, base, method):
    from ftc.backends.jax import pipeline
    from ftc.spec import load_spec

    spec = load_spec(_write(tmp_path, GOOD, base=base, method=method))
    ppo = pipeline.plan_spec(spec, device_count=1)
    sft = pipeline.plan_spec(load_spec(_write(tmp_path, GOOD.replace("ppo", "grpo"), base=base, method=method)), 1)
    head = {p.path: p for p in ppo.params if p.path.startswith("ftc_value_head/")}
    assert set(head) == {"ftc_value_head/kernel", "ftc_value_head/bias"} and all(p.trainable for p in head.values())
    assert head["ftc_value_head/kernel"].shape == (32,)
    assert ppo.param_count == sft.param_count + 33 and ppo.trainable_count == sft.trainable_count + 33
    assert ppo.objective == "ppo"


def test_a_fresh_value_head_model_computes_its_bases_logits_and_zero_values():
    from ftc.backends.jax.methods.value_head import OUTPUT, WithValueHead
    from ftc.backends.jax.models import family_for

    config = tl.tiny_llama_config()
    family = family_for(config)
    inner = family.build(family.config_from_hf(config), jnp.float32)
    module = WithValueHead(inner)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 320, (2, 7)), jnp.int32)
    params = jax.jit(module.init)(jax.random.key(0), ids)["params"]
    logits, values = jax.jit(lambda p: module.apply({"params": p}, ids, output=OUTPUT))(params)
    base_params = {k: v for k, v in params.items() if k != "ftc_value_head"}
    base_logits = jax.jit(lambda p: inner.apply({"params": p}, ids))(base_params)
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(base_logits))
    assert values.shape == (2, 7) and not np.any(np.asarray(values))
