"""The RL objectives stay finite where float32 runs out: a prompt or padding position whose
log-probability is past exp's range (low temperatures make those common) must not reach the
loss, which only the completion tokens enter."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import rl_testlib as rl

from ftc.backends.jax.objectives import grpo

B, T, PROMPT = 2, 6, 3


class _PeakedModel:
    """A stand-in causal LM whose logits put `params["w"]` on token 0 everywhere: a target of
    another token has log-probability about -w."""

    def apply(self, variables, ids, **_):
        return jnp.zeros(ids.shape + (5,)).at[:, :, 0].set(variables["params"]["w"])


def _batch():
    """Two rows whose prompt targets (token 3) have log-prob -200 and whose completion targets
    (token 0) have log-prob 0; the rollout's old and reference log-probs are 0 off the completion,
    as rl/rollout.py's logps_function gives them."""
    weights = jnp.zeros((B, T)).at[:, PROMPT:].set(1.0)
    rows = {
        "input_ids": jnp.ones((B, T), jnp.int32),
        "targets": jnp.full((B, T), 3, jnp.int32).at[:, PROMPT:].set(0),
        "segment_ids": jnp.ones((B, T), jnp.int32),
        "positions": jnp.tile(jnp.arange(T), (B, 1)),
        "weights": weights,
    }
    zeros = jnp.zeros((B, T))
    return {
        "rows": rows,
        "advantages": jnp.array([1.0, -1.0]),
        "old_logps": zeros,
        "ref_logps": zeros,
        "row_weights": jnp.ones(B),
        "token_share": jnp.full(B, float(T - PROMPT)),
    }


@pytest.mark.parametrize("loss_type", grpo.LOSS_TYPES)
def test_grpo_kl_ignores_prompt_log_probs_past_exps_range(loss_type):
    params = {"w": jnp.float32(200.0)}
    logps, _ = grpo.token_logps_and_entropy(_PeakedModel(), params, _batch()["rows"], jax.random.key(0), 1.0)
    assert float(logps[0, 0]) < -150  # exp(-logp) is inf in float32

    def loss(p):
        sums = grpo.grpo_sums(
            _PeakedModel(),
            p,
            _batch(),
            jax.random.key(0),
            loss_type=loss_type,
            beta=0.04,
            epsilon_low=0.2,
            epsilon_high=0.2,
            max_completion_length=T - PROMPT,
        )
        return sums["loss_sum"], sums

    (value, sums), grad = jax.value_and_grad(loss, has_aux=True)(params)
    assert np.isfinite(float(value)) and np.isfinite(float(grad["w"]))
    # The completion tokens' log-probs equal the reference's (0): no KL, and the policy term is
    # -A per token, A = +1 and -1: the two rows cancel.
    assert float(sums["kl_sum"]) == pytest.approx(0.0, abs=1e-6)
    assert float(value) == pytest.approx(0.0, abs=1e-5)


RUN = (
    rl.SPEC_HEAD
    + """[training]
objective = "grpo"
steps = 2
batch_size = 4
micro_batch_size = 4
grpo_group_size = 2
grpo_max_new_tokens = 4
grpo_rewards = [{{ kind = "model", path = "{root}/rm", name = "rm" }}]
[mesh]
fsdp = 4
tensor = 2
[logging]
progress = false
"""
)


def test_a_grpo_run_whose_reward_model_gives_nan_stops_naming_the_reward_and_prompt(tmp_path):
    """A reward model whose logits overflow (a head of 1e38s: finite weights, inf logits, a nan
    softmax): the run stops at the first rollout saying which reward and which prompt row, not
    that the loss is nan and the learning rate should be lower. A head holding nan is refused
    when the reward model loads, naming the tensor."""
    import torch
    import train_testlib as tl
    import transformers as tf
    from data_testlib import make_tokenizer

    from ftc.backends.jax import pipeline as run_lib
    from ftc.backends.jax.rl import reward_model, rewards
    from ftc.spec import load_spec

    rl.make_root(tmp_path)
    tok = make_tokenizer()
    rm = tf.LlamaForSequenceClassification(tf.LlamaConfig(**tl.TINY, num_labels=2, pad_token_id=tok.pad_token_id))
    with torch.no_grad():
        rm.score.weight.fill_(1e38)
    rm.save_pretrained(tmp_path / "rm", safe_serialization=True)
    tok.save_pretrained(tmp_path / "rm")
    path = tmp_path / "nan.toml"
    path.write_text(RUN.format(root=tmp_path, name="nan-reward"))
    with pytest.raises(
        rewards.RewardError, match=r"reward 'rm' \(model\) is nan for a completion of .*prompts\.jsonl:\d"
    ):
        run_lib.run(load_spec(str(path)), echo=lambda s: None)

    with torch.no_grad():
        rm.score.weight[0, 3] = float("nan")
    rm.save_pretrained(tmp_path / "rm", safe_serialization=True)
    (reward,) = rewards.parse([{"kind": "model", "path": str(tmp_path / "rm")}])
    with pytest.raises(reward_model.RewardModelError, match=r"rm: the weights hold nan or inf in score\.weight"):
        reward_model.load(reward)


@pytest.mark.parametrize("scale", grpo.SCALES)
def test_group_advantages_of_rewards_near_float32s_range_are_finite(scale):
    """Rewards of a weight near 3.4e38 summed to inf over a group: every advantage nan."""
    rewards = np.array([3e38, 0.0, 3e38, 3e38, 1.0, 2.0, 3.0, 4.0], np.float32)
    advantages = grpo.group_advantages(rewards, 4, scale)
    assert advantages.dtype == np.float32 and np.all(np.isfinite(advantages)), advantages
    assert advantages[1] < 0 < advantages[0] and advantages[4] < 0 < advantages[7]
