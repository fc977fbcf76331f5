"""`ftc export`: every method's export reloads in transformers / PEFT / PyTorch hooks and computes
ftc's logits; the directory is written atomically; refusals say why."""

from __future__ import annotations

import errno
import json

import jax
import jax.numpy as jnp
import method_runs_testlib as mr
import numpy as np
import peft
import pytest
import torch
import transformers
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from ftc.backends import torch_adapters
from ftc.backends.jax.io import export as export_lib
from ftc.backends.jax.io import hf_checkpoint, verify
from ftc.backends.jax.methods import adapter as adapters
from ftc.backends.jax.methods import lora
from ftc.cli import main

BATCH = verify.fixed_batch(320, batch=3, seq_len=12, seed=5)
REAL = BATCH.attention_mask.astype(bool)
TOL = 1e-4


def ftc_logits(trained: export_lib.TrainedRun, module=None, params=None) -> np.ndarray:
    """The trained model's logits in float32 (the method's model, no dropout)."""
    module = module or trained.model.eval_module
    params = jax.tree.map(
        lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x,
        trained.params if params is None else params,
    )
    out = jax.jit(lambda p: module.apply({"params": p}, BATCH.input_ids, attention_mask=BATCH.attention_mask))(params)
    return np.asarray(out, np.float32)


def torch_logits(model) -> np.ndarray:
    with torch.no_grad():
        out = model(
            torch.tensor(BATCH.input_ids, dtype=torch.long),
            attention_mask=torch.tensor(BATCH.attention_mask, dtype=torch.long),
        )
    return out.logits.float().numpy()


def max_diff(a, b) -> float:
    return float(np.abs(a - b)[REAL].max())


def hf(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def cli(*args):
    return CliRunner().invoke(main, ["export", *map(str, args)])


@pytest.fixture(scope="module")
def runs():
    """kind -> TrainedRun, restored once per module."""
    cache = {}

    def get(kind):
        if kind not in cache:
            cache[kind] = export_lib.load_run(mr.trained(kind).run_dir)
        return cache[kind]

    return get


def test_full_export_reloads_in_transformers_with_ftc_logits_in_float32_and_bfloat16(runs, tmp_path):
    trained = runs("full")
    result = cli(trained.run_dir, "--out", tmp_path / "f32", "--dtype", "float32")
    assert result.exit_code == 0, result.output
    assert max_diff(torch_logits(hf(tmp_path / "f32")), ftc_logits(trained)) < TOL
    assert (tmp_path / "f32" / "tokenizer.json").is_file()
    manifest = json.loads((tmp_path / "f32" / export_lib.MANIFEST).read_text())
    assert (manifest["method"], manifest["format"], manifest["step"]) == ("full", "hf", mr.STEPS)
    # The run wrote the same export at its end (its spec says float32): byte for byte.
    end_of_run = trained.run_dir / "export" / "model.safetensors"
    assert end_of_run.read_bytes() == (tmp_path / "f32" / "model.safetensors").read_bytes()

    result = cli(trained.run_dir, "--out", tmp_path / "bf16", "--dtype", "bfloat16", "--verify")
    assert result.exit_code == 0, result.output
    assert "verify: OK" in result.output and "rounding the weights to bfloat16 moves" in result.output
    with safe_open(tmp_path / "bf16" / "model.safetensors", "np") as f:
        assert all(f.get_slice(k).get_dtype() == "BF16" for k in f.keys())


def test_lora_exports_reload_in_peft_and_merged_in_transformers_with_ftc_logits(runs, tmp_path):
    trained = runs("lora")
    ours = ftc_logits(trained)
    base = hf(trained.model_dir)
    assert max_diff(torch_logits(base), ours) > 1e-3  # the trained factors matter

    result = cli(trained.run_dir, "--out", tmp_path / "peft", "--format", "peft", "--dtype", "float32")
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(trained.model_dir.resolve()) and config["r"] == 4
    assert (config["lora_dropout"], config["task_type"]) == (0.2, "CAUSAL_LM")
    peft_model = peft.PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    assert max_diff(torch_logits(peft_model), ours) < TOL

    result = cli(trained.run_dir, "--out", tmp_path / "merged", "--format", "hf", "--dtype", "float32", "--verify")
    assert result.exit_code == 0, result.output
    assert max_diff(torch_logits(hf(tmp_path / "merged")), ours) < TOL


@pytest.mark.slow  # trains a QLoRA run of its own unless test_run_methods' slow test did
def test_qlora_peft_export_reloads_on_the_dequantised_base_and_merged_export_matches(runs, tmp_path):
    trained = runs("qlora")
    ours = ftc_logits(trained)
    plan = trained.model.plan
    hf_checkpoint.save_hf(
        tmp_path / "dequantised",
        (
            trained.model.family,
            trained.model.arch,
            lora.merged_params(plan, trained.params, include_lora=False),
            trained.hf_config,
        ),
        dtype="float32",
    )
    result = cli(trained.run_dir, "--out", tmp_path / "peft", "--format", "peft", "--verify")
    assert result.exit_code == 0, result.output
    assert "verify: OK" in result.output
    peft_model = peft.PeftModel.from_pretrained(hf(tmp_path / "dequantised"), tmp_path / "peft").eval()
    assert max_diff(torch_logits(peft_model), ours) < TOL
    # On the original (unquantised) base the adapter computes something measurably different.
    original = peft.PeftModel.from_pretrained(hf(trained.model_dir), tmp_path / "peft").eval()
    assert max_diff(torch_logits(original), ours) > 10 * TOL

    assert cli(trained.run_dir, "--out", tmp_path / "merged", "--format", "hf").exit_code == 0
    assert max_diff(torch_logits(hf(tmp_path / "merged")), ours) < TOL


def test_adapter_exports_reload_through_torch_hooks_with_ftc_logits(runs, tmp_path):
    trained = runs("adapter")
    ours = ftc_logits(trained)
    assert max_diff(torch_logits(hf(trained.model_dir)), ours) > 1e-3

    assert cli(trained.run_dir, "--out", tmp_path / "adapters", "--format", "adapters").exit_code == 0
    model = hf(trained.model_dir)
    torch_adapters.load_adapters(model, tmp_path / "adapters")
    assert max_diff(torch_logits(model), ours) < TOL

    # format hf: the base plus ftc_adapters/, one self-contained directory.
    result = cli(trained.run_dir, "--out", tmp_path / "hf", "--format", "hf", "--verify")
    assert result.exit_code == 0 and "verify: OK" in result.output, result.output
    model = hf(tmp_path / "hf")
    torch_adapters.load_adapters(model, tmp_path / "hf" / adapters.HF_SUBDIR)
    assert max_diff(torch_logits(model), ours) < TOL

    result = cli(trained.run_dir, "--out", tmp_path / "peft", "--format", "peft")
    assert result.exit_code == 1 and "cannot be merged" in result.output
    assert not (tmp_path / "peft").exists()


def test_export_refuses_a_non_empty_out_unless_forced(runs, tmp_path):
    trained = runs("full")
    out = tmp_path / "out"
    assert cli(trained.run_dir, "--out", out).exit_code == 0
    (out / "notes.txt").write_text("mine")
    result = cli(trained.run_dir, "--out", out)
    assert result.exit_code == 1 and "exists and is not empty" in result.output and "--force" in result.output
    assert (out / "notes.txt").read_text() == "mine"
    result = cli(trained.run_dir, "--out", out, "--force", "--dtype", "float16")
    assert result.exit_code == 0, result.output
    assert not (out / "notes.txt").exists()
    assert json.loads((out / export_lib.MANIFEST).read_text())["dtype"] == "float16"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # nothing left beside it


def test_a_failed_export_leaves_no_partial_directory(runs, tmp_path, monkeypatch):
    trained = runs("full")
    written = {}

    def disk_full(self):  # the weights are written, then the disk fills up while finishing the shards
        written["temp"] = [p.name for p in self.out_dir.iterdir()]
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(hf_checkpoint._ShardWriter, "finish", disk_full)
    with pytest.raises(OSError, match="No space left"):
        export_lib.write_export(trained, tmp_path / "new", format="hf", dtype="float32")
    assert written["temp"]  # it failed midway, with shard data already on disk
    assert list(tmp_path.iterdir()) == []

    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "keep.txt").write_text("previous export")
    with pytest.raises(OSError):
        export_lib.write_export(trained, tmp_path / "old", format="hf", dtype="float32", force=True)
    assert [p.name for p in tmp_path.iterdir()] == ["old"]  # the previous export is untouched
    assert (tmp_path / "old" / "keep.txt").read_text() == "previous export"

    with pytest.raises(export_lib.ExportError, match="export dtype 'int8'"):
        export_lib.write_export(trained, tmp_path / "int8", format="hf", dtype="int8")
    assert not (tmp_path / "int8").exists()


def test_an_out_that_is_a_symlink_is_replaced_where_it_points_and_stays_a_link(tmp_path):
    (tmp_path / "disk" / "bot").mkdir(parents=True)
    (tmp_path / "disk" / "bot" / export_lib.MANIFEST).write_text('{"step": 1}')
    (tmp_path / "serve").mkdir()
    link = tmp_path / "serve" / "bot"
    link.symlink_to(tmp_path / "disk" / "bot")
    export_lib.publish(link, lambda tmp: (tmp / export_lib.MANIFEST).write_text('{"step": 2}'), force=True)
    assert link.is_symlink()  # before: the link was replaced by a directory, the old export left behind
    assert (tmp_path / "disk" / "bot" / export_lib.MANIFEST).read_text() == '{"step": 2}'
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["bot", "bot", "disk", "ftc_export.json", "serve"]


def test_an_export_killed_midway_leaves_a_partial_copy_that_the_next_export_removes(tmp_path):
    """SIGKILL runs no clean-up: its `.out.partial-*` copy (as big as the model) stayed for good.
    The next export to the same place removes it; one whose writer still runs is kept."""
    import os
    import socket
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    killed = tmp_path / f".out.partial-{host}-{dead.pid}-abc123_x"
    running = tmp_path / f".out.partial-{host}-{os.getpid()}-def456"
    elsewhere = tmp_path / f".out.partial-another-host-{dead.pid}-ghi789"
    for d in (killed, running, elsewhere):
        (d / "model.safetensors").parent.mkdir()
        (d / "model.safetensors").write_bytes(b"half")
    export_lib.publish(tmp_path / "out", lambda tmp: (tmp / export_lib.MANIFEST).write_text("{}"))
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted(["out", running.name, elsewhere.name]), left


def test_verify_fails_on_an_export_that_computes_something_else(runs, tmp_path):
    trained = runs("full")
    result = export_lib.write_export(trained, tmp_path / "out", format="hf", dtype="float32")
    assert export_lib.verify_export(trained, result).ok
    path = tmp_path / "out" / "model.safetensors"
    tensors = load_file(path)
    tensors["model.norm.weight"] = tensors["model.norm.weight"] * 1.01  # a one-percent slip in one tensor
    save_file(tensors, path, metadata={"format": "pt"})
    check = export_lib.verify_export(trained, result)
    assert not check.ok and check.max_abs_diff > check.threshold
    assert "FAILED" in check.summary()


def test_export_of_a_directory_without_checkpoints_is_refused(tmp_path):
    result = cli(tmp_path)
    assert result.exit_code == 1 and "no checkpoints/" in result.output


def test_a_directory_inside_a_run_is_refused_as_not_a_run_naming_the_run_to_export(tmp_path):
    """Given a run's checkpoints/ or one checkpoint, the default --out (inside the run) was refused
    first, in words about an --out the user never passed."""
    run = tmp_path / "run"
    (run / "checkpoints" / "4").mkdir(parents=True)
    (run / "spec.resolved.json").write_text("{}")
    result = cli(run / "checkpoints" / "4")
    assert result.exit_code == 1 and "--out" not in result.output, result.output
    assert f"{run / 'checkpoints' / '4'}: no checkpoints/ directory" in result.output
    assert f"it lies inside the run directory {run}: export that run (ftc export {run} --step 4)" in result.output
    result = cli(run / "checkpoints")
    assert result.exit_code == 1 and f"export that run (ftc export {run})" in result.output, result.output
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "spec.resolved.json"]


def test_a_step_of_a_probe_run_which_keeps_no_checkpoints_is_refused(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "spec.resolved.json").write_text(json.dumps({"method": {"kind": "probe"}}))
    result = cli(run, "--step", 3, "--out", tmp_path / "out")
    assert result.exit_code == 1 and "keeps no checkpoints, only its final export; drop --step" in result.output
    assert not (tmp_path / "out").exists()


def test_an_out_that_cannot_be_made_is_refused_before_the_checkpoint_loads(tmp_path):
    (tmp_path / "run").mkdir()  # no checkpoints/: had it been read first, that would be the message
    (tmp_path / "file").write_text("keep me")
    result = CliRunner().invoke(main, ["export", str(tmp_path / "run"), "--out", str(tmp_path / "file" / "out")])
    assert result.exit_code == 1, result.output
    assert f"--out {tmp_path / 'file' / 'out'}: {tmp_path / 'file'} is not a directory" in result.output
    assert (tmp_path / "file").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "run"]


def test_probe_export_is_copied_verified_and_its_dtype_is_the_runs(tmp_path):
    run = mr.run_spec(mr.write_probe_spec("probe-export"), "probe")
    result = cli(run.run_dir, "--out", tmp_path / "copy", "--verify")
    assert result.exit_code == 0, result.output
    assert "verify: OK" in result.output and "torch_probe.load_probe" in result.output
    source = run.run_dir / "export"
    assert sorted(p.name for p in (tmp_path / "copy").iterdir()) == sorted(p.name for p in source.iterdir())
    assert (tmp_path / "copy" / "probe_head.safetensors").read_bytes() == (
        source / "probe_head.safetensors"
    ).read_bytes()
    result = cli(run.run_dir, "--out", tmp_path / "bf16", "--dtype", "bfloat16")
    assert result.exit_code == 1 and "export.dtype" in result.output
    for fmt in ("gguf", "peft", "adapters"):  # refused as formats a probe has none of, not as a dtype
        result = cli(run.run_dir, "--out", tmp_path / fmt, "--format", fmt)
        assert result.exit_code == 1 and f"export format {fmt!r} does not apply to method.kind 'probe'" in result.output
        assert not (tmp_path / fmt).exists()


def test_probe_with_an_exact_transformers_head_verifies_at_the_end_of_its_run():
    """BERT + cls pooling exports BertForSequenceClassification; export.verify checks it in ftc run."""
    from ftc.backends.jax import pipeline as run_lib
    from ftc.spec import load_spec

    log = []
    spec = load_spec(mr.write_probe_spec("probe-cls", pooling="cls"), ["export.verify=true"])
    run_lib.run(spec, echo=log.append)
    with open(f"{spec.run_dir}/export/config.json") as f:
        config = json.load(f)
    assert config["architectures"] == ["BertForSequenceClassification"]
    assert any(l.startswith("verify: OK: max |class logits ftc - transformers|") for l in log), log
    # The check can fail: a head that is not the trained one reads differently.
    head = load_file(f"{spec.run_dir}/{export_lib.PROBE_HEAD}")
    save_file({k: v * 1.01 for k, v in head.items()}, f"{spec.run_dir}/{export_lib.PROBE_HEAD}")
    assert not export_lib.verify_probe_export(spec.run_dir, f"{spec.run_dir}/export").ok
