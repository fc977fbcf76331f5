"""backends/jax/objectives/dpo.py: the DPO loss and reward metrics against TRL's DPOTrainer (PyTorch) on the
same tokens, exact accumulation over micro-batches with padding pairs, and `ftc run` with
training.objective = "dpo" (full fine-tune: a frozen reference copy in the train state)."""

from __future__ import annotations

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import train_testlib as tl
from data_testlib import make_tokenizer, spec_data_options, write_jsonl

from ftc.backends.jax.data.datasets import build_datasets
from ftc.backends.jax.io.hf_checkpoint import load_model
from ftc.backends.jax.models import shapes
from ftc.backends.jax.objectives import dpo
from ftc.backends.jax.train import mesh as mesh_lib
from ftc.backends.jax.train import step as ts

BETA = 0.3
SEQ = 32


def _pairs(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    words = "the quick brown fox jumps over lazy dog hello there how are you doing today blue".split()
    say = lambda k: " ".join(rng.choice(words, size=k))
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
    """A tiny Llama as the reference, the same with noise added as the policy (both saved by
    transformers), and 6 preference pairs in the data pipeline's layout, padded to 8 rows."""
    import torch
    import transformers as tf

    root = tmp_path_factory.mktemp("dpo")
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
    batch = next(data.train_iterator())  # 6 real pairs + 2 all-zero padding rows (weight 0)
    assert batch["weights"].tolist() == [1.0] * 6 + [0.0] * 2
    return root, batch


def _full_ids(rows: dict, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """data_pack rows -> HF inputs: the full token ids (input_ids plus the last target), attention
    mask and TRL's completion mask (token i's loss weight; data_pack shifted it to row i - 1)."""
    T = rows["input_ids"].shape[1]
    ids, attention, completion = (np.zeros((n, T + 1), np.int64) for _ in range(3))
    for b in range(n):
        k = int(np.count_nonzero(rows["segment_ids"][b]))  # positions used: k + 1 tokens
        ids[b, :k] = rows["input_ids"][b, :k]
        ids[b, k] = rows["targets"][b, k - 1]
        attention[b, : k + 1] = 1
        completion[b, 1 : k + 1] = rows["weights"][b, :k]
    return ids, attention, completion


def _trl_loss_and_metrics(root, batch, n: int) -> tuple[float, dict]:
    import torch
    import transformers as tf
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    policy = tf.LlamaForCausalLM.from_pretrained(root / "policy").eval()
    reference = tf.LlamaForCausalLM.from_pretrained(root / "base").eval()
    args = DPOConfig(
        output_dir=str(root / "trl"),
        beta=BETA,
        loss_type=["sigmoid"],
        report_to="none",
        use_cpu=True,
        per_device_train_batch_size=2,
    )
    trainer = DPOTrainer(
        model=policy,
        ref_model=reference,
        args=args,
        processing_class=make_tokenizer(),
        train_dataset=Dataset.from_list([{"prompt": "hi", "chosen": "yes", "rejected": "no"}]),
    )
    trainer.model.eval()  # "eval" mode: no dropout; metrics land in trainer._metrics["eval"]
    sides = [_full_ids(batch[side], n) for side in ("chosen", "rejected")]  # TRL's batch: [chosen; rejected]
    inputs = {
        key: torch.tensor(np.concatenate([sides[0][i], sides[1][i]]))
        for i, key in enumerate(("input_ids", "attention_mask", "completion_mask"))
    }
    with torch.no_grad():
        loss = trainer._compute_loss(trainer.model, inputs, return_outputs=False)
    return float(loss), {k: v[-1] for k, v in trainer._metrics["eval"].items()}


def _module_and_params(path):
    loaded = load_model(path)
    return loaded.family.build(loaded.arch, jnp.float32), loaded.params


def _float64_logps(path, rows: dict, n: int) -> np.ndarray:
    """Summed response log-probs from transformers' model in float64: the formula's exact value."""
    import torch
    import transformers as tf

    model = tf.LlamaForCausalLM.from_pretrained(path).eval().double()
    ids, attention, completion = (torch.tensor(x) for x in _full_ids(rows, n))
    with torch.no_grad():
        logits = model(ids, attention_mask=attention).logits[:, :-1]
    token_logps = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return (token_logps * completion[:, 1:]).sum(-1).numpy()


def test_dpo_loss_and_rewards_equal_trl_on_the_same_tokens_padding_pairs_ignored(setup):
    root, batch = setup
    module, policy = _module_and_params(root / "policy")
    _, reference = _module_and_params(root / "base")
    sums_fn = jax.jit(lambda p, r, b: dpo.dpo_sums(module, p, b, jax.random.key(0), r, beta=BETA))
    ours = dpo.summarize(ts.host_metrics(sums_fn(policy, reference, batch)))
    trl_loss, trl = _trl_loss_and_metrics(root, batch, n=6)
    # The paper's formula in float64 on transformers' models: what both float32 results approximate.
    pc, pr = (_float64_logps(root / "policy", batch[s], 6) for s in ("chosen", "rejected"))
    rc, rr = (_float64_logps(root / "base", batch[s], 6) for s in ("chosen", "rejected"))
    margin = BETA * ((pc - rc) - (pr - rr))
    exact = float(np.mean(np.logaddexp(0.0, -margin)))  # -log sigmoid(margin)

    assert ours["pairs"] == 6.0
    assert abs(exact - math.log(2)) > 0.05  # policy and reference really differ
    # ftc is within 1e-6 of the exact value; TRL's own float32 path (fused LM head) is ~3.5e-5 off
    # it (measured), so ftc vs TRL is held to 1e-4.
    assert abs(ours["loss"] - exact) <= 1e-6 * exact, (ours["loss"], exact)
    assert abs(ours["loss"] - trl_loss) <= 1e-4 * trl_loss, (ours["loss"], trl_loss)
    assert abs(trl_loss - exact) <= 1e-4 * exact, (trl_loss, exact)
    assert ours["chosen_reward"] == pytest.approx(np.mean(BETA * (pc - rc)), abs=2e-6)
    assert ours["rejected_reward"] == pytest.approx(np.mean(BETA * (pr - rr)), abs=2e-6)
    assert ours["reward_margin"] == pytest.approx(np.mean(margin), abs=2e-6)
    for mine, theirs in (
        ("chosen_reward", "rewards/chosen"),
        ("rejected_reward", "rewards/rejected"),
        ("reward_margin", "rewards/margins"),
    ):
        assert ours[mine] == pytest.approx(trl[theirs], abs=1e-4), mine
    for mine, theirs in (("chosen_logp", "logps/chosen"), ("rejected_logp", "logps/rejected")):
        assert ours[mine] == pytest.approx(trl[theirs], rel=1e-6), mine
    assert ours["reward_accuracy"] == pytest.approx(trl["rewards/accuracies"]) == np.mean(margin > 0)
    assert 0.0 < ours["reward_accuracy"] < 1.0  # both outcomes occur, so the comparison means something


def _dpo_program(module, params, accum: int, mesh):
    mask = jax.tree.map(lambda _: True, params)
    tx = optax.sgd(0.5)
    state_abs = ts.abstract_state(jax.eval_shape(lambda: params), tx, mask, reference=True)
    replicated = {path: (None,) * np.ndim(x) for path, x in tl.flat(params).items()}
    state_sh = ts.state_shardings(mesh, state_abs, replicated)
    steps = ts.build_steps(
        module, tx, optax.constant_schedule(0.5), mask, mesh, state_sh, accum_steps=accum, objective=dpo.objective(BETA)
    )
    state = jax.jit(lambda p: ts.init_state(p, tx, mask, 0, reference=True), out_shardings=state_sh)(params)
    return steps, state


def test_dpo_step_is_the_same_for_any_micro_batching_and_leaves_the_reference_frozen(setup):
    root, batch = setup
    module, params = _module_and_params(root / "base")
    mesh = mesh_lib.make_mesh(1, 1, 1, jax.devices()[:1])
    # Rows 6 and 7 are padding pairs: micro-batches of 4 hold 4 + 2 real pairs, of 2 hold 2 + 2 + 2 + 0.
    results = {}
    for accum in (1, 2, 4):
        steps, state = _dpo_program(module, params, accum, mesh)
        state, first = steps.train(state, steps.put_train_batch(batch))
        first = ts.host_metrics(first)
        state, second = steps.train(state, steps.put_train_batch(batch))
        results[accum] = (first, ts.host_metrics(second), tl.flat(state["params"]), tl.flat(state["reference"]))
    want_first, want_second, want_params, _ = results[1]
    assert want_first["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference at the start
    assert want_first["pairs"] == 6.0 and want_second["loss"] < want_first["loss"]
    for accum in (2, 4):
        first, second, got_params, got_reference = results[accum]
        for key in ("loss", "reward_accuracy", "reward_margin", "chosen_reward", "grad_norm", "pairs"):
            assert second[key] == pytest.approx(want_second[key], rel=2e-5, abs=1e-6), (accum, key)
        assert first["grad_norm"] == pytest.approx(want_first["grad_norm"], rel=2e-5)
        for name, value in want_params.items():
            np.testing.assert_allclose(got_params[name], value, rtol=1e-4, atol=1e-6, err_msg=f"{accum} {name}")
        for name, value in tl.flat(params).items():  # the reference copy never moves
            assert got_reference[name].tobytes() == np.asarray(value).tobytes(), name


@pytest.mark.parametrize("kind", ["lora", "adapter"])
def test_method_reference_is_the_base_model_with_no_second_copy(setup, kind):
    """With lora / adapter params moved away from their start, DPO with the method disabled as the
    reference gives exactly the sums of DPO against the base model's own parameters."""
    from ftc.backends.jax.io.hf_checkpoint import read_hf_config
    from ftc.backends.jax.methods import base as methods

    root, batch = setup
    method = (
        {"kind": kind, "rank": 4, "alpha": 8, "targets": "all-linear"}
        if kind == "lora"
        else {"kind": kind, "reduction_factor": 4}
    )
    spec = tl.spec({"method": method, "model": {"max_seq_len": SEQ}})
    model = methods.build_model(read_hf_config(root / "base"), spec)
    base = load_model(root / "base").params
    params = methods.init_method_params(model, base, seed=0)
    noise = iter(jax.random.split(jax.random.key(1), 1000))
    moved = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 0.05 * jax.random.normal(next(noise), x.shape) if model.trainable(shapes.path_str(p)) else x,
        params,
    )
    disabled = jax.jit(
        lambda p, b: dpo.dpo_sums(
            model.eval_module,
            p,
            b,
            jax.random.key(0),
            beta=BETA,
            reference_params=lambda q: methods.disabled_params(model, q),
        )
    )
    # The base model's own module and params as an explicit reference: the same policy logps.
    explicit = jax.jit(
        lambda p, b: dpo.dpo_sums(
            model.eval_module, p, b, jax.random.key(0), methods.init_method_params(model, base, seed=0), beta=BETA
        )
    )
    got, want = ts.host_metrics(disabled(moved, batch)), ts.host_metrics(explicit(moved, batch))
    assert abs(got["loss_sum"] / got["weight_sum"] - math.log(2)) > 1e-3  # the policy really moved
    for key in dpo.SUM_KEYS:
        assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-6), key


DPO_SPEC = """ftc = 1
name = "dpo"
output_dir = "{root}/runs"
[model]
base = "{root}/base"
max_seq_len = {seq}
dtype = "float32"
[data]
format = "preference"
train = "{root}/train_pairs.jsonl"
validation = "{root}/valid_pairs.jsonl"
[training]
objective = "dpo"
dpo_beta = {beta}
steps = 6
batch_size = 8
micro_batch_size = 4
learning_rate = 3e-3
log_every = 1
eval_every = 3
schedule = {{ kind = "constant", warmup_steps = 0 }}
[mesh]
fsdp = 4
tensor = 2
[checkpoint]
every = 100
[logging]
progress = false
"""


def test_ftc_run_trains_dpo_from_a_frozen_reference_copy(setup):
    from ftc.backends.jax import pipeline as run_lib
    from ftc.backends.jax.state import checkpoint as ckpt_lib
    from ftc.spec import load_spec

    root, _ = setup
    write_jsonl(root / "train_pairs.jsonl", _pairs(8, seed=2))
    write_jsonl(root / "valid_pairs.jsonl", _pairs(4, seed=3))
    path = root / "dpo.toml"
    path.write_text(DPO_SPEC.format(root=root, seq=SEQ, beta=BETA))
    spec = load_spec(str(path))
    lines = []
    summary = run_lib.run(spec, echo=lines.append)
    assert summary["step"] == 6
    assert any("DPO reference copy" in line for line in lines)  # the plan counts the extra buffer
    with open(os.path.join(spec.run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    train = [r for r in rows if r["split"] == "train"]
    val = [r for r in rows if r["split"] == "validation"]
    assert [r["step"] for r in val] == [0, 3, 6]
    assert val[0]["loss"] == pytest.approx(math.log(2), abs=1e-6) and val[0]["reward_margin"] == 0.0
    with open(os.path.join(spec.run_dir, "data_stats.json")) as f:
        kept = json.load(f)["train_clean"]["kept"]  # pairs left after cleaning (e.g. chosen == rejected)
    assert train[0]["loss"] == pytest.approx(math.log(2), abs=1e-6) and train[0]["pairs"] == kept
    assert train[-1]["loss"] < train[0]["loss"] and train[-1]["reward_margin"] > 0
    for r in train:
        assert {"reward_accuracy", "chosen_reward", "rejected_reward", "tokens_per_second", "grad_norm"} <= set(r)
    meta = ckpt_lib.Checkpointer(ckpt_lib.checkpoint_dir(spec.run_dir), read_only=True).metadata()
    assert meta["spec"]["training"]["objective"] == "dpo"


def test_ftc_run_trains_dpo_with_lora_against_its_disabled_base(setup):
    from ftc.backends.jax import pipeline as run_lib
    from ftc.spec import load_spec

    root, _ = setup
    write_jsonl(root / "train_pairs.jsonl", _pairs(8, seed=2))
    write_jsonl(root / "valid_pairs.jsonl", _pairs(4, seed=3))
    path = root / "dpo_lora.toml"
    text = DPO_SPEC.format(root=root, seq=SEQ, beta=BETA).replace('name = "dpo"', 'name = "dpo-lora"')
    path.write_text(
        text.replace(
            "[training]", '[method]\nkind = "lora"\nrank = 4\nalpha = 8\ntargets = "all-linear"\n[training]'
        ).replace("3e-3", "3e-2")
    )
    spec = load_spec(str(path))
    lines = []
    assert run_lib.run(spec, echo=lines.append)["step"] == 6
    assert not any("DPO reference copy" in line for line in lines)  # no second copy of the base
    with open(os.path.join(spec.run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    train = [r for r in rows if r["split"] == "train"]
    assert train[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # B = 0: policy == reference
    # The policy moves away from a reference that stays the base: the margin grows, loss falls.
    assert train[-1]["loss"] < train[0]["loss"] - 0.01 and train[-1]["reward_margin"] > 0


def test_dpo_from_a_trained_lora_run_is_referenced_to_that_run_and_resumes(setup):
    """A LoRA DPO run started from a LoRA run (its factors trained) took the base with the adapter
    disabled as its reference, so at step 1 policy != reference (rewards not 0, loss not log 2);
    TRL copies the adapter as its reference. Now a frozen copy of the starting parameters, which a
    resume rebuilds with init_from's factors (it was refused: the rebuilt reference differed)."""
    import signal

    from ftc.backends.jax import pipeline as run_lib
    from ftc.spec import load_spec

    root, _ = setup
    write_jsonl(root / "train_pairs.jsonl", _pairs(8, seed=2))
    write_jsonl(root / "valid_pairs.jsonl", _pairs(4, seed=3))
    lora = '[method]\nkind = "lora"\nrank = 4\nalpha = 8\ntargets = "all-linear"\n[training]'

    def spec(name: str, init_from: str | None = None, steps: int = 3):
        text = DPO_SPEC.format(root=root, seq=SEQ, beta=BETA).replace('name = "dpo"', f'name = "{name}"')
        text = text.replace("[training]", lora).replace("3e-3", "3e-2").replace("steps = 6", f"steps = {steps}")
        if init_from:
            text = text.replace("[model]\n", f'[model]\ninit_from = "{init_from}"\n')
        (root / f"{name}.toml").write_text(text)
        return load_spec(str(root / f"{name}.toml"))

    first = spec("lora-first")
    run_lib.run(first, echo=lambda s: None)
    lines = []
    second = spec("lora-second", first.run_dir)
    run_lib.run(second, echo=lines.append)
    assert any("DPO reference copy" in line for line in lines)
    with open(os.path.join(second.run_dir, "metrics.jsonl")) as f:
        train = [r for r in map(json.loads, f) if r["split"] == "train"]
    assert train[0]["loss"] == pytest.approx(math.log(2), abs=1e-6) and train[0]["reward_margin"] == 0.0

    cut = spec("lora-cut", first.run_dir)
    stop = lambda step: os.kill(os.getpid(), signal.SIGTERM) if step == 1 else None  # noqa: E731
    with pytest.raises(run_lib.Interrupted):
        run_lib.run(cut, echo=lambda s: None, after_step=stop)
    assert run_lib.run(cut, echo=lambda s: None)["step"] == 3
    a, b = tl.checkpoint_params(second.run_dir), tl.checkpoint_params(cut.run_dir)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
