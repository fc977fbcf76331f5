"""backends/jax/state/checkpoint.py: Orbax save/restore across meshes, data position, resume checks."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import train_testlib as tl

from ftc.backends.jax.data import loader as data_loader
from ftc.backends.jax.state import checkpoint as ckpt_lib

CFG = tl.tiny_llama_config()


@pytest.fixture(scope="module")
def params():
    from ftc.backends.jax.models import family_for

    family = family_for(CFG)
    module = family.build(family.config_from_hf(CFG))
    init = jax.jit(lambda: nn.unbox(module.init(jax.random.key(1), jnp.zeros((1, tl.SEQ), jnp.int32))["params"]))
    return jax.device_get(init())


def _abstract(program):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), program.state)


def test_state_saved_on_one_mesh_restores_bitwise_onto_another(tmp_path, params):
    saved = tl.program(tl.spec({"mesh": {"data": 8, "fsdp": 1, "tensor": 1}}), CFG, 8, params=params)
    # Make every part of the state non-trivial: optimizer moments, step, rng.
    state = dict(
        saved.state,
        step=jnp.asarray(5, jnp.int32),
        opt_state=jax.tree.map(lambda x: x + 0.25 if x.dtype == jnp.float32 else x, saved.state["opt_state"]),
    )
    ck = ckpt_lib.Checkpointer(str(tmp_path / "ck"), keep=2)
    ck.save(5, state, {"pos": 7}, {"spec": {"a": 1}, "tokenizer_hash": "abc"})
    ck.wait()

    target = tl.program(tl.spec({"mesh": {"data": 2, "fsdp": 2, "tensor": 2}}), CFG, 8, params=params)
    reader = ckpt_lib.Checkpointer(str(tmp_path / "ck"), read_only=True)
    assert reader.latest_step() == 5 and ckpt_lib.latest_step(str(tmp_path)) is None
    restored, data_state, meta = reader.restore(_abstract(target))
    assert data_state == {"pos": 7}
    assert meta["spec"] == {"a": 1} and meta["tokenizer_hash"] == "abc" and meta["step"] == 5
    want, got = tl.flat(state), tl.flat(restored)
    assert set(want) == set(got)
    for name in want:
        assert got[name].tobytes() == want[name].tobytes(), name
    kernel = restored["params"]["layers"]["mlp"]["up_proj"]["kernel"]
    assert tuple(kernel.sharding.spec) == (None, "fsdp", "tensor")  # placed for the new mesh


def test_keep_n_deletes_older_checkpoints_and_restore_params_reads_params_only(tmp_path, params):
    p = tl.program(tl.spec({"mesh": {"data": 1, "fsdp": 2, "tensor": 1}}), CFG, 2, params=params)
    ck = ckpt_lib.Checkpointer(str(tmp_path / "checkpoints"), keep=2, async_save=False)
    for step in (1, 2, 3):
        ck.save(step, p.state, None, {})
    ck.close()
    assert ckpt_lib.latest_step(str(tmp_path)) == 3
    assert ckpt_lib.Checkpointer(str(tmp_path / "checkpoints"), read_only=True).all_steps() == [2, 3]
    abstract_params = _abstract(p)["params"]
    got = ckpt_lib.Checkpointer(str(tmp_path / "checkpoints"), read_only=True).restore_params(abstract_params)
    for name, want in tl.flat(params).items():
        assert tl.flat(got)[name].tobytes() == want.tobytes(), name


def test_data_iterator_position_round_trips_through_a_checkpoint(tmp_path):
    rows = tl.random_batch(np.random.default_rng(0), 20)
    ds = data_loader.train_dataset(rows, batch_size=4, seed=3, shuffle=True)
    it = data_loader.iterate(ds)
    for _ in range(7):  # past the end of the first epoch (5 batches)
        next(it)
    encoded = ckpt_lib.encode_data_state(it.get_state())
    expected = [next(it) for _ in range(4)]
    resumed = data_loader.iterate(ds, ckpt_lib.decode_data_state(encoded))
    for want in expected:
        got = next(resumed)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
    assert ckpt_lib.decode_data_state(ckpt_lib.encode_data_state(b"\x00raw")) == b"\x00raw"


def test_resume_with_changed_learning_rate_is_refused_naming_key_and_values():
    old = tl.spec({"training": {"learning_rate": 1e-2}}).to_dict()
    new = tl.spec({"training": {"learning_rate": 1e-3}}).to_dict()
    meta = {"spec": old, "tokenizer_hash": "t1"}
    with pytest.raises(ckpt_lib.ResumeRefusedError) as e:
        ckpt_lib.check_resumable(meta, new, "t1", "runs/t/checkpoints/3")
    message = str(e.value)
    assert "runs/t/checkpoints/3" in message
    assert "training.learning_rate: 0.01 -> 0.001" in message
    assert message.count("->") == 1  # nothing else reported as changed


def test_resume_allows_longer_runs_other_meshes_and_logging_but_not_data_or_tokenizer_changes():
    old = tl.spec().to_dict()
    allowed = tl.spec(
        {
            "training": {"steps": 30, "eval_every": 5, "log_every": 1, "micro_batch_size": 4},
            "data": {"validation": "/nonexistent/valid.jsonl"},
            "mesh": {"data": 2, "fsdp": 2, "tensor": 2},
            "checkpoint": {"every": 10, "keep": 1},
            "logging": {"tensorboard": False},
            "description": "longer",
        }
    ).to_dict()
    ckpt_lib.check_resumable({"spec": old, "tokenizer_hash": "t"}, allowed, "t", "here")
    switched = tl.spec({"training": {"steps": None, "epochs": 2}}).to_dict()
    ckpt_lib.check_resumable({"spec": old}, switched, None, "here")  # steps <-> epochs both may change
    changed = tl.spec({"data": {"packing": False}, "training": {"seed": 4}}).to_dict()
    with pytest.raises(ckpt_lib.ResumeRefusedError, match=r"(?s)data.packing: True -> False.*training.seed: 0 -> 4"):
        ckpt_lib.check_resumable({"spec": old}, changed, None, "here")
    with pytest.raises(ckpt_lib.ResumeRefusedError, match="tokenizer: hash t -> u"):
        ckpt_lib.check_resumable({"spec": old, "tokenizer_hash": "t"}, old, "u", "here")


def test_resume_with_the_same_spec_but_another_plan_fingerprint_is_refused():
    spec = tl.spec().to_dict()
    meta = {"spec": spec, **ckpt_lib.fingerprint_metadata("aaaa")}
    ckpt_lib.check_resumable(meta, spec, None, "here", plan_fingerprint="aaaa")
    with pytest.raises(ckpt_lib.ResumeRefusedError, match=r"plan fingerprint: aaaa -> bbbb \(the same spec compiles"):
        ckpt_lib.check_resumable(meta, spec, None, "here", plan_fingerprint="bbbb")
    # A changed key explains a changed program: it alone is reported.
    lr = tl.spec({"training": {"learning_rate": 0.5}}).to_dict()
    with pytest.raises(ckpt_lib.ResumeRefusedError) as e:
        ckpt_lib.check_resumable(meta, lr, None, "here", plan_fingerprint="bbbb")
    assert "training.learning_rate" in str(e.value) and "fingerprint" not in str(e.value)
    # Checkpoints from before resume checked fingerprints (no version) resume on their spec.
    old = {"spec": spec, "plan_fingerprint": "aaaa"}
    ckpt_lib.check_resumable(old, spec, None, "here", plan_fingerprint="bbbb")


def test_resume_on_other_training_rows_is_refused_and_older_checkpoints_resume():
    from ftc.backends.jax.data.digest import rows_digest

    rows = {"input_ids": np.arange(12, dtype=np.int32).reshape(3, 4), "nested": {"w": np.ones((3, 4), np.float32)}}
    edited = {**rows, "input_ids": rows["input_ids"].copy()}
    edited["input_ids"][1, 2] += 1
    assert rows_digest(rows) == rows_digest({k: (v.copy() if k == "input_ids" else v) for k, v in rows.items()})
    assert rows_digest(rows) != rows_digest(edited)
    assert rows_digest(rows) != rows_digest({**rows, "input_ids": rows["input_ids"][:2]})
    spec = tl.spec().to_dict()
    ckpt_lib.check_resumable({"spec": spec, "data_digest": "aaaa"}, spec, None, "here", None, "aaaa")
    ckpt_lib.check_resumable({"spec": spec}, spec, None, "here", None, "bbbb")  # saved before the digest was
    with pytest.raises(ckpt_lib.ResumeRefusedError, match=r"training rows: digest aaaa -> bbbb \(data.train's files"):
        ckpt_lib.check_resumable({"spec": spec, "data_digest": "aaaa"}, spec, None, "here", None, "bbbb")


def test_rows_past_the_whole_digest_size_are_sampled_and_still_see_an_edit(monkeypatch):
    from ftc.backends.jax.data import digest as loader

    monkeypatch.setattr(loader, "_WHOLE_DIGEST_BYTES", 64)
    rows = {"input_ids": np.arange(10_000, dtype=np.int32).reshape(2_500, 4)}
    edited = {"input_ids": rows["input_ids"].copy()}
    edited["input_ids"][1_234, 0] = -1  # a row the sample skips: the sum still changes
    assert loader.rows_digest(rows) != loader.rows_digest(edited)
