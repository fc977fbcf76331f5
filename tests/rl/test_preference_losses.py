"""DPO's loss types (objectives/dpo.py) and ORPO (objectives/orpo.py) against TRL 1.16's own
trainers on the same tokens: DPOTrainer._compute_loss for sigmoid / hinge / ipo / robust, and
trl.experimental ORPOTrainer.get_batch_loss_metrics pair by pair; plus `ftc run` with each."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import train_testlib as tl
from data_testlib import make_tokenizer, spec_data_options, write_jsonl

from ftc.backends.jax.data.datasets import build_datasets
from ftc.backends.jax.io.hf_checkpoint import load_model
from ftc.backends.jax.objectives import dpo, orpo
from ftc.backends.jax.train import step as ts

BETA = 0.3
SEQ = 32


def _pairs(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    words = "the quick brown fox jumps over lazy dog hello there how are you doing today blue".split()
    say = lambda k: " ".join(rng.choice(words, size=k))  # noqa: E731
    return [
        {
            "prompt": [{"role": "user", "content": f"{i} {say(int(rng.integers(1, 4)))}?"}],
            "chosen": [{"role": "assistant", "content": say(int(rng.integers(1, 6)))}],
            "rejected": [{"role": "assistant", "content": say(int(rng.integers(1, 6)))}],
        }
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny Llama as the reference, the same with noise as the policy, 6 pairs padded to 8 rows."""
    import torch
    import transformers as tf

    root = tmp_path_factory.mktemp("pref")
    tl.make_model_dir(root / "base")
    policy = tf.LlamaForCausalLM.from_pretrained(root / "base").eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    policy.save_pretrained(root / "policy")
    make_tokenizer().save_pretrained(root / "policy")
    data = build_datasets(
        **spec_data_options(
            "preference",
            train=write_jsonl(root / "pairs.jsonl", _pairs(6)),
            tokenizer=make_tokenizer(),
            max_seq_len=SEQ,
            batch_size=8,
            shuffle=False,
        )
    )
    batch = next(data.train_iterator())
    assert batch["weights"].tolist() == [1.0] * 6 + [0.0] * 2
    return root, batch


def _full_ids(rows: dict, n: int):
    """data_pack rows -> full token ids, attention mask, completion mask (HF / TRL layout)."""
    T = rows["input_ids"].shape[1]
    ids, attention, completion = (np.zeros((n, T + 1), np.int64) for _ in range(3))
    for b in range(n):
        k = int(np.count_nonzero(rows["segment_ids"][b]))
        ids[b, :k] = rows["input_ids"][b, :k]
        ids[b, k] = rows["targets"][b, k - 1]
        attention[b, : k + 1] = 1
        completion[b, 1 : k + 1] = rows["weights"][b, :k]
    return ids, attention, completion


def _module_and_params(path):
    loaded = load_model(path)
    return loaded.family.build(loaded.arch, jnp.float32), loaded.params


def _trl_dpo_loss(root, batch, n: int, loss_type: str, label_smoothing: float) -> float:
    import torch
    import transformers as tf
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(
        output_dir=str(root / f"trl-{loss_type}"),
        beta=BETA,
        loss_type=[loss_type],
        label_smoothing=label_smoothing,
        report_to="none",
        use_cpu=True,
        per_device_train_batch_size=2,
    )
    trainer = DPOTrainer(
        model=tf.LlamaForCausalLM.from_pretrained(root / "policy").eval(),
        ref_model=tf.LlamaForCausalLM.from_pretrained(root / "base").eval(),
        args=args,
        processing_class=make_tokenizer(),
        train_dataset=Dataset.from_list([{"prompt": "hi", "chosen": "yes", "rejected": "no"}]),
    )
    trainer.model.eval()
    sides = [_full_ids(batch[side], n) for side in ("chosen", "rejected")]
    inputs = {
        key: torch.tensor(np.concatenate([sides[0][i], sides[1][i]]))
        for i, key in enumerate(("input_ids", "attention_mask", "completion_mask"))
    }
    with torch.no_grad():
        return float(trainer._compute_loss(trainer.model, inputs, return_outputs=False))


def _float64_logps(path, rows: dict, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(summed response log-probs, response token counts) from transformers' model in float64."""
    import torch
    import transformers as tf

    model = tf.LlamaForCausalLM.from_pretrained(path).eval().double()
    ids, attention, completion = (torch.tensor(x) for x in _full_ids(rows, n))
    with torch.no_grad():
        logits = model(ids, attention_mask=attention).logits[:, :-1]
    token_logps = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return (token_logps * completion[:, 1:]).sum(-1).numpy(), completion[:, 1:].sum(-1).numpy()


def _exact(root, batch, loss_type: str, e: float) -> float:
    """The loss type's formula (the papers' equations, TRL's normalisation) in float64."""
    (pc, nc), (pr, nr) = (_float64_logps(root / "policy", batch[s], 6) for s in ("chosen", "rejected"))
    (rc, _), (rr, _) = (_float64_logps(root / "base", batch[s], 6) for s in ("chosen", "rejected"))
    d = (pc - rc) - (pr - rr)
    logsig = lambda x: -np.logaddexp(0.0, -x)  # noqa: E731
    per_pair = {
        "sigmoid": lambda: -logsig(BETA * d),
        "hinge": lambda: np.maximum(0.0, 1.0 - BETA * d),
        "ipo": lambda: ((pc - rc) / nc - (pr - rr) / nr - 1.0 / (2.0 * BETA)) ** 2,
        "robust": lambda: (-(1 - e) * logsig(BETA * d) + e * logsig(-BETA * d)) / (1 - 2 * e),
    }[loss_type]()
    return float(np.mean(per_pair))


@pytest.mark.parametrize(("loss_type", "smoothing"), [("sigmoid", 0.0), ("hinge", 0.0), ("ipo", 0.0), ("robust", 0.2)])
def test_each_dpo_loss_type_equals_trl_and_the_float64_formula_on_the_same_tokens(setup, loss_type, smoothing):
    root, batch = setup
    module, policy = _module_and_params(root / "policy")
    _, reference = _module_and_params(root / "base")
    fn = jax.jit(
        lambda p, r, b: dpo.dpo_sums(
            module, p, b, jax.random.key(0), r, beta=BETA, loss_type=loss_type, label_smoothing=smoothing
        )
    )
    ours = dpo.summarize(ts.host_metrics(fn(policy, reference, batch)))
    theirs = _trl_dpo_loss(root, batch, 6, loss_type, smoothing)
    exact = _exact(root, batch, loss_type, smoothing)
    assert ours["pairs"] == 6.0  # padding pairs left out
    assert ours["loss"] == pytest.approx(exact, rel=2e-6), (loss_type, ours["loss"], exact)
    # TRL's float32 path (fused LM head) is off the float64 value by up to 1.1e-4 relative (ipo,
    # measured; 3.5e-5 for sigmoid), so ftc vs TRL is held to 2e-4.
    assert ours["loss"] == pytest.approx(theirs, rel=2e-4), (loss_type, ours["loss"], theirs)


def test_dpo_loss_types_differ_from_each_other(setup):
    """The comparison above could pass for a loss that ignores loss_type; this pins them apart."""
    root, batch = setup
    module, policy = _module_and_params(root / "policy")
    _, reference = _module_and_params(root / "base")
    got = {}
    for lt, e in (("sigmoid", 0.0), ("hinge", 0.0), ("ipo", 0.0), ("robust", 0.2)):
        sums = dpo.dpo_sums(
            module, policy, batch, jax.random.key(0), reference, beta=BETA, loss_type=lt, label_smoothing=e
        )
        got[lt] = float(sums["loss_sum"] / sums["weight_sum"])
    assert len({round(v, 5) for v in got.values()}) == 4, got


def test_dpo_objective_refuses_an_unknown_loss_type_and_bad_smoothing():
    with pytest.raises(ValueError, match="dpo_loss_type='kto'"):
        dpo.objective(0.1, loss_type="kto")
    with pytest.raises(ValueError, match=r"dpo_label_smoothing must be in \[0, 0.5\)"):
        dpo.objective(0.1, loss_type="robust", label_smoothing=0.5)


def _trl_orpo(root, batch, i: int) -> tuple[float, dict]:
    """TRL's ORPOTrainer loss and metrics on pair `i` alone (a batch of one)."""
    import torch
    import transformers as tf
    from datasets import Dataset
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    tok = make_tokenizer()
    args = ORPOConfig(
        output_dir=str(root / "trl-orpo"), beta=BETA, report_to="none", use_cpu=True, per_device_train_batch_size=1
    )
    trainer = ORPOTrainer(
        model=tf.LlamaForCausalLM.from_pretrained(root / "policy").eval(),
        args=args,
        processing_class=tok,
        train_dataset=Dataset.from_list([{"prompt": "hi", "chosen": " yes", "rejected": " no"}]),
    )
    trainer.model.eval()
    inputs = {}
    for side in ("chosen", "rejected"):
        ids, attention, completion = _full_ids({k: v[i : i + 1] for k, v in batch[side].items()}, 1)
        k = int(attention.sum())
        labels = np.where(completion == 1, ids, -100)  # the response's tokens; the prompt is -100
        inputs[f"{side}_input_ids"] = torch.tensor(ids[:, :k])
        inputs[f"{side}_attention_mask"] = torch.tensor(attention[:, :k])
        inputs[f"{side}_labels"] = torch.tensor(labels[:, :k])
    with torch.no_grad():
        loss, metrics = trainer.get_batch_loss_metrics(trainer.model, inputs, train_eval="eval")
    return float(loss), {k: float(v) for k, v in metrics.items()}


def test_orpo_loss_equals_trl_pair_by_pair_and_the_batch_is_their_mean(setup):
    root, batch = setup
    module, policy = _module_and_params(root / "policy")
    fn = jax.jit(lambda p, b: orpo.orpo_sums(module, p, b, jax.random.key(0), beta=BETA))
    ours = orpo.summarize(ts.host_metrics(fn(policy, batch)))
    losses, nlls, ratios = [], [], []
    for i in range(6):
        one = jax.tree.map(lambda x, i=i: x[i : i + 1], batch)
        mine = orpo.summarize(ts.host_metrics(fn(policy, one)))
        loss, trl = _trl_orpo(root, batch, i)
        assert mine["loss"] == pytest.approx(loss, rel=1e-5), i
        assert mine["nll_loss"] == pytest.approx(trl["eval_nll_loss"], rel=1e-5), i
        assert mine["log_odds_ratio"] == pytest.approx(trl["eval_log_odds_ratio"], rel=1e-4, abs=1e-6), i
        assert mine["log_odds_chosen"] == pytest.approx(trl["eval_log_odds_chosen"], rel=1e-4, abs=1e-6), i
        assert mine["chosen_reward"] == pytest.approx(trl["eval_rewards/chosen"], rel=1e-5), i
        losses.append(loss)
        nlls.append(trl["eval_nll_loss"])
        ratios.append(trl["eval_log_odds_ratio"])
    assert ours["pairs"] == 6.0
    assert ours["loss"] == pytest.approx(np.mean(losses), rel=1e-5)
    assert ours["loss"] == pytest.approx(np.mean(nlls) - BETA * np.mean(ratios), rel=1e-5)
    assert np.std(ratios) > 1e-3  # pairs really differ


def test_orpo_log1mexp_is_finite_with_finite_gradients_near_zero():
    x = jnp.array([-1e-6, -0.5, -0.7, -5.0, -80.0])
    want = np.log1p(-np.exp(np.asarray(x, np.float64)))
    np.testing.assert_allclose(orpo.log1mexp(x), want, rtol=1e-5)
    grads = jax.grad(lambda v: jnp.sum(orpo.log1mexp(v)))(x)
    assert np.all(np.isfinite(grads))


SPEC = """ftc = 1
name = "{name}"
output_dir = "{root}/runs"
[model]
base = "{root}/base"
max_seq_len = {seq}
dtype = "float32"
[data]
format = "preference"
train = "{root}/train_pairs.jsonl"
[training]
objective = "{objective}"
{keys}
steps = 4
batch_size = 8
micro_batch_size = 4
learning_rate = 3e-3
log_every = 1
schedule = {{ kind = "constant", warmup_steps = 0 }}
[mesh]
fsdp = 4
tensor = 2
[checkpoint]
every = 100
[logging]
progress = false
"""


@pytest.mark.parametrize(
    ("objective", "keys", "metric"),
    [
        ("dpo", 'dpo_loss_type = "ipo"', "reward_margin"),
        ("orpo", "orpo_beta = 0.2", "log_odds_ratio"),
    ],
)
def test_ftc_run_trains_each_preference_objective_and_its_loss_falls(setup, objective, keys, metric):
    from ftc.backends.jax import pipeline as run_lib
    from ftc.spec import load_spec

    root, _ = setup
    write_jsonl(root / "train_pairs.jsonl", _pairs(8, seed=2))
    name = f"{objective}-{keys.split(chr(10))[0].split('=')[-1].strip().strip(chr(34))}"
    path = root / f"{name}.toml"
    path.write_text(SPEC.format(name=name, root=root, seq=SEQ, objective=objective, keys=keys))
    spec = load_spec(str(path))
    assert run_lib.run(spec, echo=lambda _: None)["step"] == 4
    with open(os.path.join(spec.run_dir, "metrics.jsonl")) as f:
        train = [r for r in map(json.loads, f) if r["split"] == "train"]
    assert train[-1]["loss"] < train[0]["loss"] and train[-1][metric] > train[0][metric]


def test_lint_refuses_dpo_keys_that_do_not_apply_naming_the_key_path(tmp_path):
    from ftc.spec import lint_file

    def lint(training: str) -> str:
        path = tmp_path / "s.toml"
        path.write_text(
            'ftc = 1\nname = "x"\n[model]\nbase = "m"\n[data]\nformat = "preference"\ntrain = "t.jsonl"\n'
            "[training]\n" + training
        )
        return "\n".join(str(i) for i in lint_file(path))

    out = lint('objective = "dpo"\ndpo_label_smoothing = 0.1\n')
    assert "training.dpo_label_smoothing" in out and "robust" in out, out
    assert "training.dpo_loss_type" in lint('objective = "orpo"\ndpo_loss_type = "ipo"\n')
    assert "training.dpo_loss_type" in lint('objective = "dpo"\ndpo_loss_type = "kto"\n')
    assert "training.dpo_label_smoothing" in lint(
        'objective = "dpo"\ndpo_loss_type = "robust"\ndpo_label_smoothing = 0.5\n'
    )
    assert "training." not in lint('objective = "orpo"\norpo_beta = 0.2\n')
