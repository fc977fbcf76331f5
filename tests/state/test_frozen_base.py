"""backends/jax/state/frozen_base.py: checkpoints of LoRA / QLoRA / adapter (and DPO) runs hold what
trains, not the frozen base; resume and export rebuild it bitwise, refuse a base that changed, and
still read format 1 checkpoints (the whole train state)."""

from __future__ import annotations

import shutil

import jax
import jax.numpy as jnp
import method_runs_testlib as mr
import numpy as np
import pytest
import train_testlib as tl
from frozen_state_testlib import (
    du,
    exported_bytes,
    saved_params,
    spec_on,
    whole_state,
    write_format_1,
)

from ftc.backends.jax import methods as method_registry
from ftc.backends.jax import pipeline as run_lib
from ftc.backends.jax.io import export as export_lib
from ftc.backends.jax.state import checkpoint as ckpt_lib
from ftc.backends.jax.state import fingerprint, frozen_base
from ftc.spec import load_spec

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
