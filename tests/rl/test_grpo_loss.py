"""objectives/grpo.py against TRL 1.16's GRPOTrainer._compute_loss on identical inputs (same
weights, prompts, completions, advantages, old and reference log-probs): the loss, its gradient
on every weight, and TRL's metrics, for each aggregation (grpo, bnpo, dr_grpo, dapo); group
advantages against TRL's formula; exact accumulation over micro-batches."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import train_testlib as tl
from data_testlib import make_tokenizer

from ftc.backends.jax.io import hf_checkpoint
from ftc.backends.jax.objectives import grpo
from ftc.backends.jax.rl.batch import completion_rows, place_completion_values

G, PROMPTS, P, C = 4, 2, 6, 8
TEMPERATURE = 0.7
SEQ = P + C


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny Llama as the reference, the same with noise as the policy, and a rollout batch:
    2 prompts x 4 completions of 1..8 tokens, with TRL's tensors for it."""
    import torch
    import transformers as tf

    root = tmp_path_factory.mktemp("grpo")
    tl.make_model_dir(root / "base")
    policy = tf.LlamaForCausalLM.from_pretrained(root / "base").eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    policy.save_pretrained(root / "policy")
    make_tokenizer().save_pretrained(root / "policy")

    rng = np.random.default_rng(0)
    n = G * PROMPTS
    prompt_ids = np.repeat(rng.integers(10, 300, size=(PROMPTS, P)), G, axis=0)  # a group shares its prompt
    lengths = np.array([1, 3, 8, 5, 2, 8, 6, 4])
    completion_ids = rng.integers(10, 300, size=(n, C))
    mask = (np.arange(C)[None] < lengths[:, None]).astype(np.int64)
    completion_ids = np.where(mask == 1, completion_ids, 3)  # TRL pads completions with the pad id

    def logps(model):
        full = torch.tensor(np.concatenate([prompt_ids, completion_ids], 1))
        attention = torch.tensor(np.concatenate([np.ones_like(prompt_ids), mask], 1))
        with torch.no_grad():
            logits = model(full, attention_mask=attention).logits[:, P - 1 : -1] / TEMPERATURE
        return torch.log_softmax(logits.float(), -1).gather(-1, full[:, P:, None]).squeeze(-1).numpy()

    current = logps(policy)
    reference = logps(tf.LlamaForCausalLM.from_pretrained(root / "base").eval())
    # Old log-probs as after some updates on this rollout: ratios spread past both clip edges.
    old = (current + rng.normal(0.0, 0.5, size=current.shape) * mask).astype(np.float32)
    rewards = rng.integers(0, 3, size=n).astype(np.float32)
    advantages = grpo.group_advantages(rewards, G)
    batch = {
        "prompt_ids": prompt_ids,
        "completion_ids": completion_ids,
        "completion_mask": mask,
        "advantages": advantages,
        "old": old,
        "reference": reference,
    }
    return root, batch


@pytest.fixture(scope="module")
def trl_trainer(setup):
    """One TRL GRPOTrainer on the policy; each test sets its loss_type, beta and KL correction."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    root, _ = setup
    args = GRPOConfig(
        output_dir=str(root / "trl"),
        beta=0.0,
        epsilon=0.2,
        epsilon_high=0.28,
        temperature=TEMPERATURE,
        max_completion_length=C,
        num_generations=G,
        per_device_train_batch_size=G * PROMPTS,
        report_to="none",
        use_cpu=True,
        bf16=False,  # GRPOConfig defaults to bf16 autocast: compare in float32
    )
    return GRPOTrainer(
        model=str(root / "policy"),
        reward_funcs=lambda completions, **_: [0.0] * len(completions),
        args=args,
        processing_class=make_tokenizer(),
        train_dataset=Dataset.from_list([{"prompt": "hi"}] * 8),
    )


def _trl(trainer, batch, loss_type: str, beta: float, correction: bool = True):
    """TRL's loss, gradient by HF weight name, and logged metrics on `batch` (eval mode: no dropout,
    no accumulation normaliser)."""
    import torch

    trainer.loss_type, trainer.beta = loss_type, beta
    trainer.args.use_bias_correction_kl = correction
    trainer._metrics["eval"].clear()
    trainer.model.eval()
    t = lambda x: torch.tensor(np.asarray(x))  # noqa: E731
    mask = t(batch["completion_mask"])
    inputs = {
        "prompt_ids": t(batch["prompt_ids"]),
        "prompt_mask": torch.ones_like(t(batch["prompt_ids"])),
        "completion_ids": t(batch["completion_ids"]),
        "completion_mask": mask,
        "advantages": t(batch["advantages"]),
        "old_per_token_logps": t(batch["old"]),
        "ref_per_token_logps": t(batch["reference"]),
        "num_items_in_batch": mask.sum(),
    }
    trainer.model.zero_grad()
    loss = trainer._compute_loss(trainer.model, inputs)
    loss.backward()
    grads = {name: p.grad.numpy().copy() for name, p in trainer.model.named_parameters()}
    metrics = {k: v[-1] for k, v in trainer._metrics["eval"].items()}
    return float(loss), grads, metrics


def _ours(batch, accum: int = 1):
    """The rollout batch in ftc's layout."""
    prompts = [list(p) for p in batch["prompt_ids"]]
    mask = batch["completion_mask"]
    completions = [list(c[: int(m.sum())]) for c, m in zip(batch["completion_ids"], mask, strict=True)]
    n = len(prompts)
    lengths = [P] * n
    return {
        "rows": completion_rows(prompts, completions, SEQ),
        "advantages": batch["advantages"],
        "old_logps": place_completion_values(lengths, batch["old"], mask, SEQ),
        "ref_logps": place_completion_values(lengths, batch["reference"], mask, SEQ),
        "row_weights": np.ones(n, np.float32),
        # dapo: the rollout's completion tokens per completion, over `accum` updates of this rollout
        "token_share": np.full(n, mask.sum() / n, np.float32),
    }


def _loss_and_grads(root, ours, loss_type: str, beta: float, correction: bool = True):
    loaded = hf_checkpoint.load_model(root / "policy")
    module = loaded.family.build(loaded.arch, jnp.float32)
    sums_fn = lambda p: grpo.grpo_sums(  # noqa: E731
        module,
        p,
        ours,
        jax.random.key(0),
        loss_type=loss_type,
        beta=beta,
        epsilon_low=0.2,
        epsilon_high=0.28,
        max_completion_length=C,
        temperature=TEMPERATURE,
        kl_correction=correction,
    )

    def loss(p):
        sums = sums_fn(p)
        return sums["loss_sum"] / sums["weight_sum"], sums

    (value, sums), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(loaded.params)
    by_name = dict(hf_checkpoint._hf_tensors_of(loaded.family, loaded.arch, grads))
    return float(value), by_name, grpo.summarize(jax.device_get(sums))


@pytest.mark.parametrize(
    ("loss_type", "beta", "correction"),
    [(lt, 0.0, True) for lt in grpo.LOSS_TYPES]
    + [(lt, 0.04, True) for lt in grpo.LOSS_TYPES]
    + [("grpo", 0.04, False)],
)
def test_grpo_loss_and_gradient_equal_trl_for_each_aggregation(setup, trl_trainer, loss_type, beta, correction):
    root, batch = setup
    theirs, their_grads, their_metrics = _trl(trl_trainer, batch, loss_type, beta, correction)
    ours, our_grads, metrics = _loss_and_grads(root, _ours(batch), loss_type, beta, correction)
    assert abs(theirs) > 1e-3  # a loss that is really there
    assert ours == pytest.approx(theirs, rel=1e-5, abs=1e-7), (loss_type, ours, theirs)
    assert set(our_grads) == set(their_grads)
    for name, g in their_grads.items():
        scale = float(np.abs(g).max())
        assert scale > 0, name
        np.testing.assert_allclose(our_grads[name], g, rtol=0, atol=2e-5 * scale + 1e-9, err_msg=name)
    assert float(metrics["entropy"]) == pytest.approx(their_metrics["entropy"], rel=1e-5)
    for key in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"):
        assert float(metrics[key]) == pytest.approx(their_metrics[key], abs=1e-6), key
    assert 0 < float(metrics["clip_ratio/low_mean"]) and 0 < float(metrics["clip_ratio/high_mean"])
    if beta:
        assert float(metrics["kl"]) == pytest.approx(their_metrics["kl"], rel=1e-5) and float(metrics["kl"]) > 0


def _loss(root, ours, loss_type: str) -> float:
    """The loss alone, eagerly (no gradient, no compile)."""
    loaded = hf_checkpoint.load_model(root / "policy")
    module = loaded.family.build(loaded.arch, jnp.float32)
    opts = dict(loss_type=loss_type, beta=0.0, epsilon_low=0.2, epsilon_high=0.28, max_completion_length=C)
    sums = grpo.grpo_sums(module, loaded.params, ours, jax.random.key(0), temperature=TEMPERATURE, **opts)
    return float(sums["loss_sum"] / sums["weight_sum"])


def test_the_aggregations_are_different_losses_and_dapo_spreads_the_rollout_over_its_updates(setup):
    root, batch = setup
    values = {lt: _loss(root, _ours(batch), lt) for lt in grpo.LOSS_TYPES}
    assert len({round(values[lt], 6) for lt in ("grpo", "bnpo", "dr_grpo")}) == 3, values
    # One update on the whole rollout: dapo's normaliser is the rollout's tokens, as bnpo's.
    assert values["dapo"] == pytest.approx(values["bnpo"], rel=1e-6)
    # Two updates per rollout, each on half its completions (TRL's steps_per_generation = 2): a
    # step's normaliser is half the rollout's tokens, whatever the step's own tokens are.
    full = _ours(batch)
    half = jax.tree.map(lambda x: x[:4], full)
    mask = batch["completion_mask"]
    bnpo_half = _loss(root, half, "bnpo")
    want = bnpo_half * mask[:4].sum() / (mask.sum() / 2)
    assert mask[:4].sum() != mask.sum() / 2  # the step's own tokens are not half the rollout's
    assert _loss(root, half, "dapo") == pytest.approx(want, rel=1e-6)


def test_group_advantages_equal_trls_formula_for_each_scaling():
    import torch
    from trl.trainer.utils import nanstd

    rewards = np.array([1.0, 0.0, 2.0, 1.0, 0.5, 0.5, 0.5, 0.5, 3.0, -1.0, 0.0, 2.0], np.float32)
    r = torch.tensor(rewards)
    mean = r.view(-1, 4).mean(1).repeat_interleave(4)
    group_std = nanstd(r.view(-1, 4), dim=1).repeat_interleave(4)
    want = {
        "group": (r - mean) / (group_std + 1e-4),
        "batch": (r - mean) / (nanstd(r) + 1e-4),
        "none": r - mean,
    }
    for scale, expected in want.items():
        np.testing.assert_allclose(grpo.group_advantages(rewards, 4, scale), expected.numpy(), rtol=1e-6, atol=1e-6)
    assert np.all(grpo.group_advantages(rewards, 4)[4:8] == 0)  # a group of equal rewards teaches nothing


def test_group_advantages_refuse_a_group_of_one_and_ragged_groups():
    with pytest.raises(ValueError, match="group_size=1"):
        grpo.group_advantages(np.ones(4), 1)
    with pytest.raises(ValueError, match="5 rewards do not split into groups of 2"):
        grpo.group_advantages(np.ones(5), 2)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])  # per-completion and per-token denominators
def test_micro_batches_and_padding_rows_change_nothing(setup, loss_type):
    """Sums over 2 micro-batches (one with a padding row) give the full batch's loss and gradient."""
    root, batch = setup
    full = _ours(batch)
    value, grads, _ = _loss_and_grads(root, full, loss_type, 0.04)
    loaded = hf_checkpoint.load_model(root / "policy")
    module = loaded.family.build(loaded.arch, jnp.float32)
    opts = dict(loss_type=loss_type, beta=0.04, epsilon_low=0.2, epsilon_high=0.28, max_completion_length=C)

    def part(lo, hi, pad):
        b = jax.tree.map(lambda x: x[lo:hi], full)
        if pad:  # a padding row: any content, row weight 0
            b = jax.tree.map(lambda x: np.concatenate([x, x[:1]]), b)
            b["row_weights"] = np.concatenate([b["row_weights"][:-1], [0.0]]).astype(np.float32)
        return b

    def total(p):
        sums = [
            grpo.grpo_sums(module, p, part(lo, hi, pad), jax.random.key(0), temperature=TEMPERATURE, **opts)
            for lo, hi, pad in ((0, 3, True), (3, 8, False))
        ]
        return (sums[0]["loss_sum"] + sums[1]["loss_sum"]) / (sums[0]["weight_sum"] + sums[1]["weight_sum"])

    split_value, split_grads = jax.jit(jax.value_and_grad(total))(loaded.params)
    assert float(split_value) == pytest.approx(value, rel=1e-5)
    split_by_name = dict(hf_checkpoint._hf_tensors_of(loaded.family, loaded.arch, split_grads))
    for name, g in grads.items():
        np.testing.assert_allclose(split_by_name[name], g, rtol=0, atol=1e-5 * float(np.abs(g).max()) + 1e-10)
