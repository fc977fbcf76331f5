"""backends/jax/state/frozen_base.py: checkpoints of LoRA / QLoRA / adapter (and DPO) runs hold what
trains, not the frozen base; resume and export rebuild it bitwise, refuse a base that changed, and
still read format 1 checkpoints (the whole train state)."""

from __future__ import annotations

import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import method_runs_testlib as mr
import numpy as np
import orbax.checkpoint as ocp
import pytest
import train_testlib as tl

from ftc.backends.jax import methods as method_registry
from ftc.backends.jax import pipeline as run_lib
from ftc.backends.jax.io import export as export_lib
from ftc.backends.jax.methods import qlora as qlora_lib
from ftc.backends.jax.state import checkpoint as ckpt_lib
from ftc.backends.jax.state import fingerprint, frozen_base
from ftc.backends.jax.train import optimizer as opt_lib
from ftc.backends.jax.train import step as ts
from ftc.spec import load_spec, spec_from_dict

ONE = jax.sharding.SingleDeviceSharding(jax.devices()[0])


def du(path: Path) -> int:
    """Bytes of every file under `path`."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def spec_on(model_dir: Path, kind: str, name: str, **kw) -> Path:
    """mr.write_spec, with `model_dir` as model.base."""
    path = mr.write_spec(kind, name, **kw)
    path.write_text(path.read_text().replace(f'base = "{mr.root() / "model"}"', f'base = "{model_dir}"'))
    return path


def whole_state(run_dir: Path, step: int | None = None) -> tuple[dict, object, dict]:
    """(whole train state on one device, data state, metadata) of a run's checkpoint, through
    frozen_base.restore_state as `ftc run` resumes it."""
    reader = ckpt_lib.Checkpointer(ckpt_lib.checkpoint_dir(str(run_dir)), read_only=True)
    step = reader.latest_step() if step is None else step
    meta = reader.metadata(step)
    spec = spec_from_dict(meta["spec"])
    model_dir, hf_config = run_lib.read_model_config(spec.model.base)
    model = run_lib.build_model(hf_config, spec)
    plan, abstract = run_lib.plan_for(spec, hf_config, jax.device_count(), model=model)
    mask = opt_lib.trainable_mask(abstract, model.trainable)
    tx = opt_lib.make_optimizer(
        plan.optimizer,
        opt_lib.make_schedule(plan.schedule, plan.steps.total_steps),
        {p.path: p.axes for p in plan.params},
    )
    _, with_reference = run_lib.build_objective(spec, model)
    state_abs = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=ONE),
        ts.abstract_state(abstract, tx, mask, reference=with_reference),
    )
    reader = ckpt_lib.Checkpointer(
        reader.directory, read_only=True, saved_params=frozen_base.saved_mask(abstract, model.method)
    )
    state, data_state = frozen_base.restore_state(reader, step, meta, model_dir, model, state_abs)
    return state, data_state, meta


def write_format_1(run_dir: Path, step: int, state: dict, data_state, meta: dict) -> None:
    """A checkpoint as ftc wrote them before format 2: the whole train state in "state"."""
    options = ocp.CheckpointManagerOptions(enable_async_checkpointing=False, create=True)
    manager = ocp.CheckpointManager(
        ckpt_lib.checkpoint_dir(str(run_dir)), options=options, item_names=("state", "data", "meta")
    )
    old_meta = {k: v for k, v in meta.items() if k != "frozen"} | {"step": step, "format_version": 1}
    manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(ckpt_lib.encode_data_state(data_state)),
            meta=ocp.args.JsonSave(old_meta),
        ),
    )
    manager.wait_until_finished()
    manager.close()


def assert_bitwise(got: dict, want: dict, what: str) -> None:
    got, want = tl.flat(got), tl.flat(want)
    assert set(got) == set(want), (what, sorted(set(got) ^ set(want))[:5])
    for name in want:
        assert np.asarray(got[name]).tobytes() == np.asarray(want[name]).tobytes(), f"{what}: {name} differs"


def saved_params(run_dir: Path) -> set[str]:
    reader = ckpt_lib.Checkpointer(ckpt_lib.checkpoint_dir(str(run_dir)), read_only=True)
    arrays = reader.saved_arrays()
    assert not any(p.startswith(ts.REFERENCE + "/") for p in arrays)
    return {p.removeprefix("params/") for p in arrays if p.startswith("params/")}


WEIGHT_FILES = (".safetensors", ".gguf")


def exported_bytes(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.suffix in WEIGHT_FILES}


# ---------------------------------------------------------------- pieces


def test_checksums_are_the_same_on_any_mesh_and_change_with_any_one_element():
    x = jax.random.normal(jax.random.key(0), (4, 16, 8))
    tree = {
        "w": x,
        "codes": (jnp.arange(4 * 16 * 8) % 251).astype(jnp.uint8).reshape(4, 16, 8),
        "h": x.astype(jnp.bfloat16),
    }
    want = fingerprint.checksums(tree)
    mesh = jax.make_mesh((2, 4), ("a", "b"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    sharded = jax.device_put(tree, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "a", "b")))
    assert fingerprint.checksums(sharded) == want
    for name, changed in (
        ("w", x.at[3, 15, 7].add(1e-7)),
        ("w", x.at[0, 0, 0].set(x[0, 0, 1])),
        ("w", x.at[0, 0, 0].set(x[0, 0, 1]).at[0, 0, 1].set(x[0, 0, 0])),  # two swapped
        ("codes", tree["codes"].at[1, 2, 3].add(1)),
    ):
        got = fingerprint.checksums(dict(tree, **{name: changed}))
        assert got[name] != want[name] and all(got[k] == want[k] for k in want if k != name), name


def test_file_fingerprint_hashes_a_small_file_whole_and_samples_a_large_one(tmp_path, monkeypatch):
    path = tmp_path / "w.safetensors"
    header = b'{"__metadata__":{"format":"pt"}}'
    data = bytearray(len(header).to_bytes(8, "little") + header + np.random.default_rng(0).bytes(200_000))
    path.write_bytes(bytes(data))
    whole = fingerprint.file_fingerprint(path)
    data[100_001] ^= 1
    path.write_bytes(bytes(data))
    assert fingerprint.file_fingerprint(path)["sha256"] != whole["sha256"]  # under 1 MiB: any byte counts

    monkeypatch.setattr(fingerprint, "WHOLE_FILE_BYTES", 0)
    sampled = fingerprint.file_fingerprint(path)
    starts = fingerprint.sample_offsets(len(data))
    inside, outside = starts[5] + 10, starts[5] + fingerprint.SAMPLE_BYTES + 10
    assert not any(s <= outside < s + fingerprint.SAMPLE_BYTES for s in starts)
    for offset, caught in ((inside, True), (outside, False)):  # the documented blind spot
        data[offset] ^= 1
        path.write_bytes(bytes(data))
        assert (fingerprint.file_fingerprint(path)["sha256"] != sampled["sha256"]) == caught, offset
        data[offset] ^= 1
    path.write_bytes(bytes(data) + b"\0")
    assert fingerprint.file_fingerprint(path)["size"] == len(data) + 1


def test_saved_mask_keeps_what_trains_and_nf4_double_quantisation_statistics():
    qlora = method_registry.get("qlora")
    tree = {
        "q": {"kernel": 0, "ftc_lora": {"a": 0, "b": 0}},
        "o": {"ftc_nf4": {"codes": 0, "absmax_q": 0, "absmax_scale": 0, "absmax_offset": 0}},
        "k": {"ftc_nf4": {"codes": 0, "absmax": 0}},
    }
    mask = frozen_base.saved_mask(tree, qlora)
    assert ckpt_lib.prune(tree, mask) == {
        "q": {"ftc_lora": {"a": 0, "b": 0}},
        "o": {"ftc_nf4": {"absmax_q": 0, "absmax_scale": 0, "absmax_offset": 0}},
    }
    assert ckpt_lib.overlay(tree, {"q": {"ftc_lora": {"a": 1}}})["q"] == {"kernel": 0, "ftc_lora": {"a": 1, "b": 0}}


# ---------------------------------------------------------------- runs


@pytest.fixture(scope="module")
def wide_model():
    """The tiny Llama with a 4096-token vocabulary: embeddings dominate, as in real models."""
    import transformers as tf
    from data_testlib import make_tokenizer

    path = mr.root() / "wide"
    if not path.exists():
        import torch

        torch.manual_seed(0)
        tf.LlamaForCausalLM(tf.LlamaConfig(**{**tl.TINY, "vocab_size": 4096})).eval().save_pretrained(path)
        make_tokenizer().save_pretrained(path)
    return path


def test_a_lora_checkpoint_is_a_small_fraction_of_a_full_fine_tunes_and_holds_no_frozen_leaf(wide_model):
    runs = {kind: mr.run_spec(spec_on(wide_model, kind, f"wide-{kind}", steps=1), kind) for kind in ("full", "lora")}
    size = {kind: du(run.run_dir / "checkpoints" / "1") for kind, run in runs.items()}
    ratio = size["lora"] / size["full"]
    print(f"checkpoint bytes on disk: full {size['full']:,}, lora {size['lora']:,} (ratio {ratio:.3f})")
    # Saved leaves are checked exactly below; on this tiny model about 100 KB of the LoRA
    # checkpoint is Orbax's per-leaf metadata (shardings over the 4-axis mesh, array metadata).
    assert ratio < 0.15, size
    lora_saved = saved_params(runs["lora"].run_dir)
    assert lora_saved and all("/ftc_lora/" in p for p in lora_saved), sorted(lora_saved)[:5]
    assert "embed_tokens/embedding" in saved_params(runs["full"].run_dir)  # a full fine-tune holds everything


@pytest.mark.parametrize("kind", ["lora", "adapter"])
def test_export_from_the_new_checkpoint_equals_export_from_a_format_1_checkpoint(kind, tmp_path):
    """A format 1 checkpoint of the same state (the whole state, written as ftc wrote it before)
    exports the same bytes as the run's own checkpoint, which holds only what trained."""
    run = mr.trained(kind)
    assert all(
        frozen_base.saved_leaf(p, method_registry.get(load_spec(run.spec_path).method.kind))
        for p in saved_params(run.run_dir)
    )
    state, data_state, meta = whole_state(run.run_dir)
    assert meta["format_version"] == 2 and meta["frozen"]["rebuilt"] == "frozen params"
    old = tmp_path / "old-run"
    write_format_1(old, mr.STEPS, state, data_state, meta)
    for fmt in method_registry.get(kind).formats:
        new_out, old_out = tmp_path / f"new-{fmt}", tmp_path / f"old-{fmt}"
        export_lib.export_run(run.run_dir, out=new_out, format=fmt, dtype="float32", verify=False, echo=print)
        export_lib.export_run(old, out=old_out, format=fmt, dtype="float32", verify=False, echo=print)
        new, before = exported_bytes(new_out), exported_bytes(old_out)
        assert new and new.keys() == before.keys() and new == before, fmt


def test_a_changed_base_is_refused_on_resume_and_export_naming_the_file_or_the_parameter(tmp_path, monkeypatch):
    monkeypatch.setattr(fingerprint, "WHOLE_FILE_BYTES", 0)  # sample even this small file, as a large one
    base = tmp_path / "base"
    shutil.copytree(mr.root() / "model", base)
    path = spec_on(base, "lora", "changed-base", steps=2)
    mr.run_spec(path, "lora")
    weights = base / "model.safetensors"
    original = weights.read_bytes()

    from safetensors.numpy import load_file, save_file

    tensors = load_file(weights)
    tensors["model.embed_tokens.weight"] = tensors["model.embed_tokens.weight"][::-1].copy()  # same shape, dtype
    save_file(tensors, weights, metadata={"format": "pt"})
    assert len(weights.read_bytes()) == len(original) and weights.read_bytes()[:200] == original[:200]
    resume = load_spec(path, ["training.steps=4"])
    with pytest.raises(ckpt_lib.ResumeRefusedError) as e:
        run_lib.run(resume, echo=lambda s: None)
    message = str(e.value)
    print(message)
    assert "refusing to resume" in message and f"{weights}: content changed" in message
    with pytest.raises(export_lib.ExportError, match=f"(?s)cannot export .*{weights}: content changed"):
        export_lib.load_run(load_spec(path).run_dir)

    # One flipped bit between the sampled ranges: the files read the same, the rebuilt leaf does not.
    data = bytearray(original)
    header = 8 + int.from_bytes(data[:8], "little")
    sampled = [(s, s + fingerprint.SAMPLE_BYTES) for s in fingerprint.sample_offsets(len(data))]
    offset = next(o for o in range(header, len(data) - 4, 4) if not any(a <= o < b for a, b in sampled))
    data[offset] ^= 1  # the lowest bit of a float32's mantissa: a value 1 ulp away
    weights.write_bytes(bytes(data))
    with pytest.raises(ckpt_lib.ResumeRefusedError) as e:
        run_lib.run(resume, echo=lambda s: None)
    message = str(e.value)
    print(message)
    assert "content changed" not in message and "the rebuilt values differ from the run's" in message
    assert message.count("differ from the run's") == 1  # names the one parameter

    weights.write_bytes(original)  # the original base back: it resumes
    assert run_lib.run(resume, echo=lambda s: None)["step"] == 4


# ---------------------------------------------------------------- resume equals an uninterrupted run


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
