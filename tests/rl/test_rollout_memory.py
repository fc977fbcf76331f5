"""`ftc plan` of an RL spec counts the rollout: the KV cache the formula gives is the one the
sampler allocates (its arrays' bytes, whole and per device under a mesh), the scoring pass is
within the compiled program's own buffer count, and the plan text shows update and rollout."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import train_testlib as tl

from ftc.backends.jax.generate.sampler import GenerateConfig, lay_out, make_sampler, row_keys
from ftc.backends.jax.generate.sampling import SamplingConfig
from ftc.backends.jax.io import hf_checkpoint
from ftc.backends.jax.rl.batch import completion_rows
from ftc.backends.jax.rl.rollout import logps_function
from ftc.backends.jax.rl.shape import rollout_shape
from ftc.backends.jax.train import mesh as mesh_lib
from ftc.compiler import memory
from ftc.compiler.model_summary import model_summary


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    return hf_checkpoint.load_model(tl.make_model_dir(tmp_path_factory.mktemp("rollout-memory") / "m"))


class _Spec:  # the two spec keys rollout_memory reads
    class model:
        dtype = "float32"


def _allocated_cache(loaded, mesh, completions: int, prompt_len: int, new: int):
    """The sampler's real cache as decoding holds it (after prefill, grown to every slot) for
    `completions` prompts of `prompt_len` tokens."""
    module = loaded.family.build(loaded.arch, jnp.float32)
    sampler = make_sampler(loaded.family, loaded.arch, module, context=64, mesh=mesh)
    batch = lay_out([[7] * prompt_len] * completions, new, 64, 0)
    config = GenerateConfig(batch.new_tokens, SamplingConfig(1.0), eos_ids=(), pad_id=0)
    params = loaded.params
    if mesh is not None:
        params = jax.device_put(params, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    state = sampler.prefill(
        params,
        jnp.asarray(batch.ids),
        jnp.asarray(batch.lengths),
        jnp.asarray(batch.limits),
        row_keys(jax.random.key(0), batch.rows, len(batch.ids)),
        new_tokens=batch.new_tokens,
        config=config,
    )
    return sampler.ready(state)["cache"]


@pytest.mark.parametrize("completions, seq_len, new", [(8, 48, 6), (12, 40, 20), (3, 64, 30)])
def test_the_kv_cache_formula_equals_the_bytes_the_sampler_allocates(loaded, completions, seq_len, new):
    shape = rollout_shape(completions=completions, max_new_tokens=new, max_seq_len=seq_len, reference=False)
    summary = model_summary(loaded.hf_config, loaded.family.name)
    mesh_shape = {"data": 1, "fsdp": 1, "tensor": 1, "expert": 1}
    estimate = memory.rollout_memory(summary, shape, _Spec, mesh_shape)
    longest = seq_len - new + 1  # the longest prompt prompt_data lets through
    cache = _allocated_cache(loaded, None, completions, longest, new)
    assert estimate.kv_cache == cache["k"].nbytes + cache["v"].nbytes


def test_per_device_the_kv_cache_formula_equals_one_shard_of_the_sampler_cache(loaded):
    mesh = mesh_lib.make_mesh(1, 4, 2, jax.devices()[:8])
    shape = rollout_shape(completions=8, max_new_tokens=6, max_seq_len=48, reference=True)
    summary = model_summary(loaded.hf_config, loaded.family.name)
    estimate = memory.rollout_memory(summary, shape, _Spec, dict(mesh.shape))
    cache = _allocated_cache(loaded, mesh, 8, 43, 6)
    per_device = {d: 0 for d in mesh.devices.flat}
    for name in ("k", "v"):
        for shard in cache[name].addressable_shards:
            per_device[shard.device] += shard.data.nbytes
    assert set(per_device.values()) == {estimate.kv_cache}
    whole = memory.rollout_memory(summary, shape, _Spec, {"data": 1, "fsdp": 1, "tensor": 1, "expert": 1})
    assert whole.kv_cache == 8 * estimate.kv_cache  # rows over fsdp=4, kv heads over tensor=2


def test_the_scoring_pass_estimate_covers_what_the_compiled_pass_allocates(loaded):
    module = loaded.family.build(loaded.arch, jnp.float32)
    rows = completion_rows([[5] * 20] * 16, [[9] * 20] * 16, 48)
    compiled = logps_function(module, 1.0).lower(loaded.params, rows).compile()
    analysis = compiled.memory_analysis()
    measured = analysis.temp_size_in_bytes + analysis.output_size_in_bytes
    shape = rollout_shape(completions=16, max_new_tokens=24, max_seq_len=48, reference=False)
    summary = model_summary(loaded.hf_config, loaded.family.name)
    estimate = memory.rollout_memory(summary, shape, _Spec, {"data": 1, "fsdp": 1, "tensor": 1, "expert": 1})
    counted = estimate.scoring_logits + estimate.per_token
    # XLA fuses the log-softmax: the estimate is an upper bound, within 4x of what it allocates.
    assert measured <= counted <= 4 * measured, (measured, counted)


def test_ftc_plan_of_a_grpo_spec_shows_update_and_rollout_memory(tmp_path):
    from click.testing import CliRunner

    from ftc.cli import main

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(tl.tiny_llama_config()))
    (tmp_path / "s.toml").write_text(
        'ftc = 1\nname = "g"\n[model]\nbase = "m"\nmax_seq_len = 48\ndtype = "float32"\n[data]\nformat = "prompt"\n'
        'train = "x.jsonl"\n[training]\nobjective = "grpo"\nsteps = 4\nbatch_size = 16\nmicro_batch_size = 8\n'
        'grpo_group_size = 8\ngrpo_max_new_tokens = 24\ngrpo_beta = 0.04\ngrpo_rewards = [{kind = "length", '
        "max_tokens = 8}]\n"
    )
    r = CliRunner().invoke(main, ["plan", str(tmp_path / "s.toml"), "--devices", "1"])
    assert r.exit_code == 0, r.output
    assert "+ max(update, rollout) =" in r.output and "  rollout      KV cache " in r.output, r.output
    r = CliRunner().invoke(main, ["plan", str(tmp_path / "s.toml"), "--devices", "1", "--json"])
    mem = json.loads(r.output)["memory"]
    ro = mem["rollout"]
    # tiny Llama: 2 layers, 2 kv heads of 8; 16 rows; prompt bucket 32 (25 tokens) + new bucket 24
    assert ro["kv_cache"] == 2 * 2 * 16 * (32 + 24) * 2 * 8 * 4
    assert ro["per_token"] == 16 * 48 * 4 * 2  # old and reference log-probs
    update = mem["grads"] + mem["activations"]
    assert mem["total"] == mem["params"] + mem["optimizer"] + mem["reference"] + max(update, sum(ro.values()))
    assert np.isfinite(mem["total"])
