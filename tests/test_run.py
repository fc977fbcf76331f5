"""backends/jax/pipeline.py end to end: a tiny Llama saved by transformers, chat JSONL data, `ftc run`."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest
import train_testlib as tl

from ftc.backends.jax import pipeline as run_lib
from ftc.backends.jax.models import shapes
from ftc.backends.jax.state import checkpoint as ckpt_lib
from ftc.spec import load_spec, spec_from_dict

STEPS = 8
SPEC = """ftc = 1
name = "{name}"
output_dir = "{output_dir}"
[model]
base = "{root}/model"
max_seq_len = 48
dtype = "float32"
[data]
format = "chat"
train = "{root}/train.jsonl"
validation = "{root}/valid.jsonl"
[training]
steps = {steps}
batch_size = 8
micro_batch_size = 4
learning_rate = 1e-3
log_every = 1
eval_every = 4
schedule = {{ kind = "cosine", warmup_steps = 2 }}
[mesh]
fsdp = 4
tensor = 2
[checkpoint]
every = 2
keep = 10
[logging]
progress = false
"""

DRIVER = """
import os, signal, sys
from ftc.spec import load_spec
from ftc.backends.jax.pipeline import run
spec = load_spec(sys.argv[1])
kill_at, sig = int(sys.argv[2]), getattr(signal, sys.argv[3])
run(spec, echo=lambda s: None, after_step=lambda step: os.kill(os.getpid(), sig) if step == kill_at else None)
"""


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    tl.make_model_dir(root / "model")
    tl.write_chat_data(root / "train.jsonl", 48)
    tl.write_chat_data(root / "valid.jsonl", 6, seed=1)
    return root


def write_spec(root, output_dir: str, name: str = "tiny", steps: int = STEPS) -> str:
    path = root / f"{output_dir}.toml"
    path.write_text(SPEC.format(name=name, output_dir=root / output_dir, root=root, steps=steps))
    return str(path)


def abstract_params_on_one_device(spec):
    _, hf_config = run_lib.read_model_config(spec.model.base)
    module = run_lib.build_model(hf_config, spec).module
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=one), nn.unbox(shapes.abstract_boxed_params(module))
    )


def final_params(run_dir: str) -> dict[str, np.ndarray]:
    """The parameters of a run's latest checkpoint, restored onto one device."""
    reader = ckpt_lib.Checkpointer(ckpt_lib.checkpoint_dir(run_dir), read_only=True)
    spec = spec_from_dict(reader.metadata()["spec"])
    return tl.flat(reader.restore_params(abstract_params_on_one_device(spec)))


def metrics(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def uninterrupted(root):
    spec = load_spec(write_spec(root, "straight"))
    summary = run_lib.run(spec, echo=lambda s: None)
    assert summary["step"] == STEPS
    return spec.run_dir


def test_run_writes_resolved_spec_metrics_tensorboard_and_checkpoints(root, uninterrupted):
    run_dir = uninterrupted
    spec = load_spec(write_spec(root, "straight"))
    with open(os.path.join(run_dir, "spec.resolved.json")) as f:
        assert json.load(f) == spec.to_dict()
    rows = metrics(run_dir)
    train = [r for r in rows if r["split"] == "train"]
    val = [r for r in rows if r["split"] == "validation"]
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    for r in train:
        assert {"loss", "learning_rate", "tokens_per_second", "grad_norm", "token_accuracy"} <= set(r)
        assert np.isfinite(r["loss"]) and r["tokens_per_second"] > 0
    assert train[0]["learning_rate"] == 0.0 and train[1]["learning_rate"] == pytest.approx(5e-4)  # warmup 2
    assert train[-1]["loss"] < train[0]["loss"]
    assert [r["step"] for r in val] == [0, 4, 8]  # the starting loss, then every eval_every steps
    assert val[-1]["loss"] < val[0]["loss"]
    with open(os.path.join(run_dir, "data_stats.json")) as f:
        stats = json.load(f)
    assert stats["train_clean"]["seen"] == 48 and stats["train_clean"]["kept"] == 48
    assert stats["validation_from"] == "file" and stats["validation_clean"]["kept"] == 6
    assert stats["packing"] and 0 < stats["packing_efficiency"] <= 1
    assert all(r["perplexity"] == pytest.approx(np.exp(r["loss"])) for r in val)
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(os.path.join(run_dir, "tensorboard")))
    reader = ckpt_lib.Checkpointer(ckpt_lib.checkpoint_dir(run_dir), read_only=True)
    assert reader.all_steps() == [2, 4, 6, 8]
    meta = reader.metadata()
    assert meta["spec"] == spec.to_dict() and meta["step"] == STEPS
    assert meta["tokenizer_hash"] == run_lib.tokenizer_hash(root / "model")
    assert meta["plan_fingerprint"]


def test_step0_validation_loss_equals_transformers_loss_on_the_same_tokens(root, uninterrupted):
    """The correctness gate: the starting validation loss `ftc run` logs (on a 4x2 fsdp x tensor
    mesh, packed rows, micro-batches) is transformers' PyTorch loss on the same tokens and weights:
    each packed sequence run on its own, token cross-entropy weighted by the pipeline's weights."""
    import torch
    import transformers as tf

    spec = load_spec(write_spec(root, "straight"))
    data = run_lib.build_data(spec, run_lib.load_tokenizer(root / "model"))
    model = tf.LlamaForCausalLM.from_pretrained(root / "model").eval()
    loss_sum = weight_sum = 0.0
    sequences = 0
    with torch.no_grad():
        for batch in data.validation_batches(spec.training.micro_batch_size):
            for row, segments in enumerate(batch["segment_ids"]):
                for s in np.unique(segments[segments > 0]):
                    at = segments == s
                    logits = model(torch.tensor(batch["input_ids"][row][at])[None]).logits[0].double()
                    nll = torch.nn.functional.cross_entropy(
                        logits, torch.tensor(batch["targets"][row][at], dtype=torch.long), reduction="none"
                    )
                    weights = torch.tensor(batch["weights"][row][at], dtype=torch.float64)
                    loss_sum += float((nll * weights).sum())
                    weight_sum += float(weights.sum())
                    sequences += 1
    assert sequences == 6 and weight_sum > 0
    start = [r for r in metrics(uninterrupted) if r["split"] == "validation" and r["step"] == 0]
    assert len(start) == 1 and start[0]["loss_weight"] == weight_sum
    want = loss_sum / weight_sum
    assert abs(start[0]["loss"] - want) <= 1e-5 * want, (start[0]["loss"], want)


def test_resume_after_sigkill_at_a_random_step_matches_uninterrupted_run(root, uninterrupted):
    # From step 5 on, the step-2 checkpoint is surely complete (Orbax starts the step-4 save only
    # once the step-2 one has committed); the step-4 or step-6 save may be cut off mid-write.
    kill_at = random.Random().randint(5, STEPS - 1)
    spec_path = write_spec(root, "killed")
    driver = root / "driver.py"
    driver.write_text(DRIVER)
    out = subprocess.run(
        [sys.executable, str(driver), spec_path, str(kill_at), "SIGKILL"], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == -signal.SIGKILL, f"kill_at={kill_at}\n{out.stderr[-3000:]}"
    run_dir = load_spec(spec_path).run_dir
    saved = ckpt_lib.latest_step(run_dir)
    assert saved is not None and saved < kill_at, (kill_at, saved)

    summary = run_lib.run(load_spec(spec_path), echo=lambda s: None)  # resumes
    assert summary["step"] == STEPS
    want, got = final_params(uninterrupted), final_params(run_dir)
    for name in want:
        assert got[name].tobytes() == want[name].tobytes(), f"{name} differs (killed at step {kill_at})"
    # metrics.jsonl reads as one run: each step once, the same losses as the uninterrupted run.
    rows = [(r["step"], r["split"], r["loss"]) for r in metrics(run_dir)]
    assert rows == [(r["step"], r["split"], r["loss"]) for r in metrics(uninterrupted)], f"killed at {kill_at}"


def test_sigterm_saves_a_checkpoint_then_exits_nonzero(root):
    spec = load_spec(write_spec(root, "stopped"))
    handler_before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(run_lib.Interrupted, match="SIGTERM: saved a checkpoint at step 3") as e:
        run_lib.run(
            spec,
            echo=lambda s: None,
            after_step=lambda step: os.kill(os.getpid(), signal.SIGTERM) if step == 3 else None,
        )
    assert isinstance(e.value, SystemExit) and e.value.code  # a non-zero exit status
    assert ckpt_lib.latest_step(spec.run_dir) == 3  # not a multiple of checkpoint.every: the interrupt's save
    assert signal.getsignal(signal.SIGTERM) is handler_before


def test_ftc_run_refuses_to_resume_with_a_changed_learning_rate(root, uninterrupted):
    from click.testing import CliRunner

    from ftc.cli import main

    result = CliRunner().invoke(main, ["run", write_spec(root, "straight"), "--set", "training.learning_rate=0.5"])
    assert result.exit_code == 1, result.output
    assert "refusing to resume" in result.output
    assert "training.learning_rate: 0.001 -> 0.5" in result.output


def test_init_from_an_earlier_run_starts_from_its_final_parameters(root, uninterrupted):
    spec = load_spec(write_spec(root, "second"), [f"model.init_from={uninterrupted}"])
    abstract = abstract_params_on_one_device(spec)
    shardings = jax.tree.map(lambda s: s.sharding, abstract)
    params = run_lib.initial_params(spec, spec.model.base, abstract, shardings)
    want = final_params(uninterrupted)
    assert set(tl.flat(params)) == set(want)
    for name, value in tl.flat(params).items():
        assert value.tobytes() == want[name].tobytes(), name


def test_runs_keep_compiled_steps_in_the_persistent_cache(monkeypatch, tmp_path):

    before = jax.config.jax_compilation_cache_dir
    try:
        jax.config.update("jax_compilation_cache_dir", None)
        monkeypatch.setenv("FTC_CACHE", str(tmp_path / "ftc-cache"))
        assert jax.device_count() == 8  # fake CPU devices: the cache is used there too
        assert run_lib.use_compilation_cache() == str(tmp_path / "ftc-cache" / "jax")
        jax.config.update("jax_compilation_cache_dir", str(tmp_path / "mine"))  # the user's own choice stays
        assert run_lib.use_compilation_cache() == str(tmp_path / "mine")
        jax.config.update("jax_compilation_cache_dir", None)
        monkeypatch.setenv("FTC_COMPILATION_CACHE", "0")  # off
        assert run_lib.use_compilation_cache() is None and not jax.config.jax_compilation_cache_dir
    finally:
        jax.config.update("jax_compilation_cache_dir", before)


def test_resume_takes_a_new_micro_batch_and_remat_but_refuses_a_base_whose_config_changed(root, tmp_path):
    """The one resume rule: keys in RESUMABLE_CHANGES may change (the plan's fingerprint stays);
    with the spec the same, a changed plan fingerprint (here the base's config.json) is refused."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(root / "model", model)
    path = tmp_path / "short.toml"
    path.write_text(
        SPEC.format(name="short", output_dir=tmp_path / "runs", root=root, steps=2).replace(
            f'base = "{root}/model"', f'base = "{model}"'
        )
    )
    assert run_lib.run(load_spec(str(path)), echo=lambda s: None)["step"] == 2
    run_dir = load_spec(str(path)).run_dir
    first = ckpt_lib.Checkpointer(ckpt_lib.checkpoint_dir(run_dir), read_only=True).metadata()
    longer = load_spec(str(path), ["training.steps=4", "training.micro_batch_size=8", "training.remat=full"])
    assert run_lib.run(longer, echo=lambda s: None)["step"] == 4
    second = ckpt_lib.Checkpointer(ckpt_lib.checkpoint_dir(run_dir), read_only=True).metadata()
    assert second["plan_fingerprint"] == first["plan_fingerprint"]

    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps(config | {"intermediate_size": 2 * config["intermediate_size"]}))
    with pytest.raises(ckpt_lib.ResumeRefusedError, match=r"plan fingerprint: \w+ -> \w+ \(the same spec compiles to"):
        run_lib.run(load_spec(str(path), ["training.steps=6"]), echo=lambda s: None)
