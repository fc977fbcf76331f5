"""`ftc run` / `ftc export` / `ftc model verify` end to end on a tiny Qwen2-MoE saved by
transformers: the router aux loss is logged as its own metric, a run on an expert mesh killed with
SIGKILL resumes bitwise, the full export reloads in transformers with ftc's logits, and a LoRA run
on the experts exports a PEFT adapter (target_parameters) that PEFT loads with ftc's logits."""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import numpy as np
import peft
import pytest
import torch
import train_testlib as tl
import transformers
from click.testing import CliRunner
from data_testlib import make_tokenizer
from moe_testlib import make_moe_model

from ftc.backends.jax import pipeline as run_lib
from ftc.backends.jax.io import export as export_lib
from ftc.backends.jax.io import hf_checkpoint, verify
from ftc.backends.jax.state import checkpoint as ckpt_lib
from ftc.cli import main
from ftc.spec import load_spec

STEPS = 6
KILL_AT = 5  # the step-2 checkpoint is surely complete (Orbax commits one save before the next)
SPEC = """ftc = 1
name = "{name}"
output_dir = "{root}/runs"
[model]
base = "{root}/model"
max_seq_len = 48
dtype = "float32"
[data]
format = "chat"
train = "{root}/train.jsonl"
validation = "{root}/valid.jsonl"
[method]
kind = "{kind}"
{method}
[training]
steps = {steps}
batch_size = 8
micro_batch_size = 4
learning_rate = {lr}
log_every = 1
eval_every = 3
router_aux_loss_coef = 0.02
schedule = {{ kind = "constant" }}
[mesh]
data = 2
tensor = 2
expert = 2
[checkpoint]
every = 2
keep = 10
[export]
dtype = "float32"
[logging]
progress = false
tensorboard = false
"""
DRIVER = """
import os, signal, sys
from ftc.spec import load_spec
from ftc.backends.jax.pipeline import run
spec = load_spec(sys.argv[1])
kill_at = int(sys.argv[2])
kill = lambda step: os.kill(os.getpid(), signal.SIGKILL) if step == kill_at else None
run(spec, echo=lambda s: None, after_step=kill)
"""
BATCH = verify.fixed_batch(320, batch=3, seq_len=12, seed=5)
REAL = BATCH.attention_mask.astype(bool)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe-run")
    make_moe_model("qwen2_moe", seed=3, vocab_size=320).save_pretrained(root / "model")
    make_tokenizer().save_pretrained(root / "model")
    tl.write_chat_data(root / "train.jsonl", 48)
    tl.write_chat_data(root / "valid.jsonl", 6, seed=1)
    return root


def write_spec(root, name: str, kind: str = "full", method: str = "", steps: int = STEPS) -> str:
    lr = 1e-3 if kind == "full" else 3e-2
    path = root / f"{name}.toml"
    path.write_text(SPEC.format(name=name, root=root, kind=kind, method=method, steps=steps, lr=lr))
    return str(path)


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in open(f"{run_dir}/metrics.jsonl")]


def final_params(run_dir) -> dict[str, np.ndarray]:
    return tl.flat(export_lib.load_run(run_dir).params)


def ftc_logits(trained) -> np.ndarray:
    module = trained.model.eval_module
    apply = jax.jit(lambda p: module.apply({"params": p}, BATCH.input_ids, attention_mask=BATCH.attention_mask))
    return np.asarray(apply(trained.params), np.float32)


def torch_logits(model) -> np.ndarray:
    with torch.no_grad():
        out = model(torch.tensor(BATCH.input_ids).long(), attention_mask=torch.tensor(BATCH.attention_mask).long())
    return out.logits.float().numpy()


@pytest.fixture(scope="module")
def uninterrupted(root):
    spec = load_spec(write_spec(root, "straight"))
    assert run_lib.run(spec, echo=lambda s: None)["step"] == STEPS
    return spec.run_dir


def test_model_verify_checks_a_moe_checkpoint_against_transformers(root):
    result = CliRunner().invoke(main, ["model", "verify", str(root / "model")])
    assert result.exit_code == 0, result.output
    assert "OK" in result.output


def test_run_logs_the_router_aux_loss_as_its_own_metric(uninterrupted):
    rows = metrics(uninterrupted)
    train = [r for r in rows if r["split"] == "train"]
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    for r in train:
        assert r["aux_loss"] > 0  # transformers' load-balancing loss, unscaled
        assert r["loss_with_aux"] == pytest.approx(r["loss"] + 0.02 * r["aux_loss"], rel=1e-5)
    assert train[-1]["loss"] < train[0]["loss"]
    val = [r for r in rows if r["split"] == "validation"]
    assert [r["step"] for r in val] == [0, 3, 6] and all("aux_loss" in r for r in val)


# ~40 s on 2 cores. Without it the fast tests still pin SIGKILL-resume (tests/test_run.py) and expert
# meshes equal one device (tests/moe/test_moe_train.py).
@pytest.mark.slow
def test_a_run_on_an_expert_mesh_killed_with_sigkill_resumes_bitwise(root, uninterrupted):
    spec_path = write_spec(root, "killed")
    driver = root / "driver.py"
    driver.write_text(DRIVER)
    out = subprocess.run(
        [sys.executable, str(driver), spec_path, str(KILL_AT)], capture_output=True, text=True, timeout=600
    )
    assert out.returncode == -9, out.stderr[-3000:]
    run_dir = load_spec(spec_path).run_dir
    saved = ckpt_lib.latest_step(run_dir)
    assert saved in (2, 4), saved  # the step-4 save may have been cut off mid-write
    assert run_lib.run(load_spec(spec_path), echo=lambda s: None)["step"] == STEPS  # resumes
    want, got = final_params(uninterrupted), final_params(run_dir)
    assert want.keys() == got.keys()
    for name in want:
        assert got[name].tobytes() == want[name].tobytes(), name
    keys = ("step", "split", "loss", "aux_loss")
    assert [tuple(r[k] for k in keys) for r in metrics(run_dir)] == [
        tuple(r[k] for k in keys) for r in metrics(uninterrupted)
    ]


def test_full_export_reloads_in_transformers_with_ftc_logits(uninterrupted, tmp_path):
    result = CliRunner().invoke(main, ["export", uninterrupted, "--out", str(tmp_path / "hf"), "--verify"])
    assert result.exit_code == 0, result.output
    assert "verify: OK" in result.output
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert type(reloaded).__name__ == "Qwen2MoeForCausalLM"
    ours = ftc_logits(export_lib.load_run(uninterrupted))
    assert np.abs(torch_logits(reloaded) - ours)[REAL].max() < 1e-4


def test_lora_run_on_the_experts_exports_a_peft_adapter_peft_loads(root, tmp_path):
    spec = load_spec(write_spec(root, "lora", "lora", 'rank = 4\nalpha = 8\ntargets = "all-linear"', steps=3))
    run_lib.run(spec, echo=lambda s: None)
    trained = export_lib.load_run(spec.run_dir)
    params, base = tl.flat(trained.params), tl.flat(hf_checkpoint.load_model(root / "model").params)
    factors = [p for p in params if "experts" in p and p.endswith("/b")]
    assert factors and all(np.abs(params[p]).max() > 0 for p in factors), "the expert factors trained"
    for name, value in base.items():  # the frozen base, experts and router included, never moved
        assert params[name].tobytes() == value.tobytes(), name
    ours = ftc_logits(trained)
    result = CliRunner().invoke(main, ["export", spec.run_dir, "--out", str(tmp_path / "peft"), "--format", "peft"])
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    targets = config["target_parameters"]
    assert any(t.endswith("experts.gate_up_proj") for t in targets), targets
    assert any(t.endswith("experts.down_proj") for t in targets), targets
    base_model = transformers.AutoModelForCausalLM.from_pretrained(root / "model", dtype=torch.float32).eval()
    peft_model = peft.PeftModel.from_pretrained(base_model, tmp_path / "peft").eval()
    assert np.abs(torch_logits(peft_model) - ours)[REAL].max() < 1e-4
    merged = transformers.AutoModelForCausalLM.from_pretrained(spec.run_dir + "/export", dtype=torch.float32).eval()
    assert np.abs(torch_logits(merged) - ours)[REAL].max() < 1e-4

    # `ftc generate` on the run (LoRA on the experts, unmerged) and on its merged export: same text.
    def generate(source):
        args = ["generate", source, "--prompt", "the quick brown", "--raw", "--max-new-tokens", "8"]
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.output
        lines = result.output.splitlines()  # "model: ...", the completion, "8 tokens (length) ..."
        assert lines[0].startswith("model:") and lines[-1].startswith("8 tokens (length)"), lines
        return lines[1:-1]

    from_run = generate(spec.run_dir)
    assert from_run and from_run == generate(spec.run_dir + "/export")
