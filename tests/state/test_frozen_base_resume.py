"""Resume of LoRA / QLoRA / adapter / DPO runs whose checkpoints hold what trains, not the frozen
base (backends/jax/state/frozen_base.py): the resumed run equals the uninterrupted one bitwise,
also from format 1 checkpoints, after SIGKILL and on another mesh."""

from __future__ import annotations

import shutil
from pathlib import Path

import method_runs_testlib as mr
import numpy as np
import pytest
import train_testlib as tl
from frozen_state_testlib import (
    assert_bitwise,
    saved_params,
    whole_state,
    write_format_1,
)

from ftc.backends.jax import methods as method_registry
from ftc.backends.jax import pipeline as run_lib
from ftc.backends.jax.io import export as export_lib
from ftc.backends.jax.methods import qlora as qlora_lib
from ftc.backends.jax.state import checkpoint as ckpt_lib
from ftc.backends.jax.train import step as ts
from ftc.spec import load_spec


def resumed_equals_uninterrupted(kind: str, name: str, *, method: str | None = None, second: tuple = ()) -> Path:
    """Train `kind` for 2 steps, resume to mr.STEPS (with overrides `second`), and check the final
    train state (params, optimizer state, step, rng) and losses equal the uninterrupted run's."""
    whole = (
        mr.trained(kind) if method is None else mr.run_spec(mr.write_spec(kind, f"{name}-whole", method=method), kind)
    )
    path = mr.write_spec(kind, name, steps=2, method=method)
    first = mr.run_spec(path, kind)
    assert first.summary["step"] == 2 and len(saved_params(first.run_dir)) < len(
        tl.flat(whole_state(first.run_dir)[0]["params"])
    )
    assert (
        run_lib.run(load_spec(path, [f"training.steps={mr.STEPS}", *second]), echo=lambda s: None)["step"] == mr.STEPS
    )
    if not second:
        got, want = whole_state(first.run_dir)[0], whole_state(whole.run_dir)[0]
        assert_bitwise(got, want, kind)
        # (the 2-step run also evaluated at its end, step 2)
        losses = lambda run_dir: [(r["step"], r["loss"]) for r in mr.metrics(run_dir) if r["split"] == "train"]
        assert losses(first.run_dir) == losses(whole.run_dir)
    return first.run_dir


@pytest.mark.slow  # ~25 s: two more LoRA runs and a resume from a format 1 copy
def test_lora_resume_rebuilds_the_frozen_base_and_equals_the_uninterrupted_run_also_from_format_1(tmp_path):
    resumed_equals_uninterrupted("lora", "lora-split")
    # The same halfway point written as format 1 (the whole state) resumes to the same state.
    path = mr.write_spec("lora", "lora-from-v1", steps=2)
    first = mr.run_spec(path, "lora")
    state, data_state, meta = whole_state(first.run_dir)
    shutil.rmtree(first.run_dir / "checkpoints")
    write_format_1(first.run_dir, 2, state, data_state, meta)
    run_lib.run(load_spec(path, [f"training.steps={mr.STEPS}"]), echo=lambda s: None)
    reader = ckpt_lib.Checkpointer(ckpt_lib.checkpoint_dir(str(first.run_dir)), read_only=True)
    assert reader.metadata()["format_version"] == 2 and "frozen" in reader.metadata()
    assert_bitwise(whole_state(first.run_dir)[0], whole_state(mr.trained("lora").run_dir)[0], "lora from format 1")


KILL_DRIVER = """
import os, signal, sys
from ftc.spec import load_spec
from ftc.backends.jax.pipeline import run
kill_at = int(sys.argv[2])
run(load_spec(sys.argv[1]), echo=lambda s: None,
    after_step=lambda step: os.kill(os.getpid(), signal.SIGKILL) if step == kill_at else None)
"""


@pytest.mark.slow  # ~25 s
def test_lora_run_killed_with_sigkill_resumes_to_the_uninterrupted_state():
    """Killed after step 3 with a checkpoint every step: step 1's save has surely committed (Orbax
    starts the step-2 save only after it), step 2's may be cut off mid-write."""
    import signal
    import subprocess
    import sys

    path = mr.write_spec("lora", "lora-killed")
    path.write_text(path.read_text() + "[checkpoint]\nevery = 1\n")
    driver = mr.root() / "kill_driver.py"
    driver.write_text(KILL_DRIVER)
    out = subprocess.run([sys.executable, str(driver), str(path), "3"], capture_output=True, text=True, timeout=300)
    assert out.returncode == -signal.SIGKILL, out.stderr[-3000:]
    run_dir = Path(load_spec(path).run_dir)
    assert ckpt_lib.latest_step(str(run_dir)) in (1, 2)
    assert run_lib.run(load_spec(path), echo=lambda s: None)["step"] == mr.STEPS
    assert_bitwise(whole_state(run_dir)[0], whole_state(mr.trained("lora").run_dir)[0], "lora killed at step 3")


@pytest.mark.slow  # ~30 s
def test_qlora_resume_rebuilds_the_nf4_base_and_equals_the_uninterrupted_run():
    run_dir = resumed_equals_uninterrupted("qlora", "qlora-split")
    assert any("/ftc_nf4/" in p for p in tl.flat(whole_state(run_dir)[0]["params"]))
    assert not any("/ftc_nf4/" in p for p in saved_params(run_dir))


@pytest.mark.slow  # ~25 s
def test_adapter_resume_rebuilds_the_frozen_base_and_equals_the_uninterrupted_run():
    resumed_equals_uninterrupted("adapter", "adapter-split")


@pytest.mark.slow  # ~25 s
def test_qlora_with_double_quantisation_resumes_on_another_mesh_with_its_nf4_storage_bitwise():
    """The second-level NF4 statistics are a float32 mean whose summation order follows the mesh;
    the checkpoint holds them, so the rebuilt base on a (2,2,2) mesh is the one the (1,8,1) run had."""
    method = mr.METHODS["qlora"] + "\ndouble_quant = true"
    path = mr.write_spec("qlora", "qlora-dq", steps=2, method=method)
    first = mr.run_spec(path, "qlora")
    before = tl.flat(whole_state(first.run_dir)[0]["params"])
    saved = saved_params(first.run_dir)
    assert {p.rsplit("/", 1)[1] for p in saved if "/ftc_nf4/" in p} == set(qlora_lib.SECOND_LEVEL)
    run_lib.run(
        load_spec(path, [f"training.steps={mr.STEPS}", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]),
        echo=lambda s: None,
    )
    after = tl.flat(whole_state(first.run_dir)[0]["params"])
    frozen = [p for p in before if not method_registry.get("lora").trainable(p) or "/ftc_nf4/" in p]
    assert frozen and all(after[p].tobytes() == before[p].tobytes() for p in frozen)


DPO_SPEC = """ftc = 1
name = "{name}"
output_dir = "{root}/runs"
[model]
base = "{root}/model"
max_seq_len = 32
dtype = "float32"
[data]
format = "preference"
train = "{root}/pairs.jsonl"
[training]
objective = "dpo"
steps = {steps}
batch_size = 8
micro_batch_size = 8
learning_rate = 3e-3
log_every = 1
schedule = {{ kind = "constant" }}
[logging]
progress = false
tensorboard = false
"""


@pytest.mark.slow  # ~35 s: three DPO runs
def test_dpo_of_a_full_fine_tune_saves_no_reference_copy_and_resumes_bitwise():
    from data_testlib import write_jsonl

    root = mr.root()
    rng = np.random.default_rng(0)
    words = "the quick brown fox jumps over lazy dog hello there".split()
    say = lambda: " ".join(rng.choice(words, size=int(rng.integers(1, 5))))
    write_jsonl(
        root / "pairs.jsonl",
        [
            {
                "prompt": [{"role": "user", "content": f"{i} {say()}?"}],
                "chosen": [{"role": "assistant", "content": say()}],
                "rejected": [{"role": "assistant", "content": say() + " no"}],
            }
            for i in range(16)
        ],
    )
    paths = {}
    for name, steps in (("dpo-whole", 4), ("dpo-split", 2)):
        paths[name] = root / f"{name}.toml"
        paths[name].write_text(DPO_SPEC.format(name=name, root=root, steps=steps))
        run_lib.run(load_spec(paths[name]), echo=lambda s: None)
    split = Path(load_spec(paths["dpo-split"]).run_dir)
    state, _, meta = whole_state(split)
    assert meta["frozen"]["rebuilt"] == "reference" and ts.REFERENCE in state
    assert "embed_tokens/embedding" in saved_params(split)  # everything trains: all params, no reference
    run_lib.run(load_spec(paths["dpo-split"], ["training.steps=4"]), echo=lambda s: None)
    whole = Path(load_spec(paths["dpo-whole"]).run_dir)
    assert_bitwise(whole_state(split)[0], whole_state(whole)[0], "dpo")
    losses = lambda run_dir: [(r["step"], r["split"], r["loss"]) for r in mr.metrics(run_dir)]
    assert losses(split) == losses(whole)


@pytest.mark.slow  # ~35 s: three LoRA runs on a full fine-tune's checkpoint
def test_lora_started_from_a_full_run_resumes_bitwise_with_its_base_rebuilt_from_that_runs_checkpoint():
    full = mr.trained("full")
    whole = mr.run_spec(mr.write_spec("lora", "lora-on-full-whole", init_from=str(full.run_dir)), "lora")
    path = mr.write_spec("lora", "lora-on-full-split", steps=2, init_from=str(full.run_dir))
    first = mr.run_spec(path, "lora")
    meta = ckpt_lib.Checkpointer(ckpt_lib.checkpoint_dir(str(first.run_dir)), read_only=True).metadata()
    source = meta["frozen"]["source"]
    assert meta["frozen"]["init_from_step"] == mr.STEPS and source["dir"].endswith(f"checkpoints/{mr.STEPS}")
    assert any(name.startswith("state/") for name in source["files"])
    # model.init_from may change on resume; the base still comes from where the run started.
    assert (
        run_lib.run(load_spec(path, [f"training.steps={mr.STEPS}", "model.init_from=/nowhere"]), echo=lambda s: None)[
            "step"
        ]
        == mr.STEPS
    )
    assert_bitwise(whole_state(first.run_dir)[0], whole_state(whole.run_dir)[0], "lora on a full run")
    full_params = tl.flat(export_lib.load_run(full.run_dir).params)
    rebuilt = tl.flat(export_lib.load_run(first.run_dir).params)
    assert all(rebuilt[p].tobytes() == full_params[p].tobytes() for p in full_params)  # the base: the full run's
