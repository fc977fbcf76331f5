"""compiler/: Spec + config.json + device count -> Plan (pure data)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import train_testlib as tl

from ftc.compiler import plan as plan_lib
from ftc.compiler import sharding_rules
from ftc.compiler.sharding_rules import PlanError

LLAMA3_70B = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009],
    "hidden_act": "silu",
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "max_position_embeddings": 131072,
    "mlp_bias": False,
    "model_type": "llama",
    "num_attention_heads": 64,
    "num_hidden_layers": 80,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "factor": 8.0,
        "high_freq_factor": 4.0,
        "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "vocab_size": 128256,
}


def _llama3_70b_param_count() -> int:
    d, f, v, layers, kv = 8192, 28672, 128256, 80, 8 * 128
    per_layer = d * d * 2 + d * kv * 2 + 3 * d * f + 2 * d  # q, o, k, v, mlp, two norms
    return layers * per_layer + 2 * v * d + d  # + embeddings, lm_head, final norm


def test_plan_llama3_70b_from_config_json_alone_counts_params_and_allocates_nothing(tmp_path):
    (tmp_path / "l70").mkdir()
    (tmp_path / "l70" / "config.json").write_text(json.dumps(LLAMA3_70B))
    (tmp_path / "s.toml").write_text(
        'ftc = 1\nname = "big"\n[model]\nbase = "l70"\nmax_seq_len = 4096\n'
        '[data]\nformat = "chat"\ntrain = "x.jsonl"\n'
        '[training]\nsteps = 100\nbatch_size = 64\nmicro_batch_size = 16\nremat = "full"\n[mesh]\ntensor = 8\n'
    )
    # A fresh process, so its peak RSS measures planning alone (the 70B float32 weights are 282 GB).
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so the child would report the peak
    # of the (large, forked) pytest process that started it.
    code = (
        "import json, re, sys; from click.testing import CliRunner; from ftc.cli import main; "
        "r = CliRunner().invoke(main, ['plan', sys.argv[1], '--devices', '64', '--json']); "
        "assert r.exit_code == 0, r.output; "
        "hwm = re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read()).group(1); "
        "print(json.dumps({'plan': json.loads(r.output), 'rss_mb': int(hwm) / 1024}))"
    )
    t0 = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "s.toml")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    elapsed = time.perf_counter() - t0
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    plan = result["plan"]
    assert plan["param_count"] == _llama3_70b_param_count() == 70_553_706_496
    assert plan["trainable_count"] == plan["param_count"]
    assert plan["mesh"] == {"data": 1, "fsdp": 8, "tensor": 8, "expert": 1, "device_count": 64}
    assert plan["batch"]["accum_steps"] == 4 and plan["batch"]["micro_batch_per_device"] == 2
    parts = {p["path"]: p["partition"] for p in plan["params"]}
    assert parts["layers/self_attn/q_proj/kernel"] == [None, "fsdp", "tensor", None]
    assert parts["layers/mlp/down_proj/kernel"] == [None, "tensor", "fsdp"]
    assert parts["lm_head/kernel"] == ["fsdp", "tensor"]
    # float32: matrices split 64 ways, the norm weights (80 * 2 + 1 of 8192) replicated.
    norms = (80 * 2 + 1) * 8192
    assert plan["memory"]["params"] == (70_553_706_496 - norms) * 4 // 64 + norms * 4
    assert plan["memory"]["optimizer"] == pytest.approx(2 * plan["memory"]["params"], rel=1e-3)
    assert result["rss_mb"] < 1500, result["rss_mb"]
    assert elapsed < 60, elapsed


def test_plan_text_output_lists_model_counts_memory_and_partitions(tmp_path):
    from click.testing import CliRunner

    from ftc.cli import main

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(tl.tiny_llama_config()))
    (tmp_path / "s.toml").write_text(
        'ftc = 1\nname = "t"\n[model]\nbase = "m"\nmax_seq_len = 16\n[data]\nformat = "text"\ntrain = "x.jsonl"\n'
    )
    r = CliRunner().invoke(main, ["plan", str(tmp_path / "s.toml"), "--devices", "4", "--set", "mesh.tensor=2"])
    assert r.exit_code == 0, r.output
    assert "mesh      data=1 fsdp=2 tensor=2 on 4 device(s)" in r.output
    assert "steps     unknown" in r.output  # epochs, and no data read
    assert (
        "layers/self_attn/q_proj/kernel  [2, 32, 4, 8]  (layers, embed, heads, head_dim) -> (-, fsdp, tensor, -)"
        in r.output
    )
    bad = CliRunner().invoke(main, ["plan", str(tmp_path / "s.toml"), "--devices", "4", "--set", "mesh.tensor=3"])
    assert bad.exit_code == 1 and "does not divide the 4 devices" in bad.output


def test_mesh_minus_one_takes_the_rest_and_bad_meshes_name_the_keys():
    assert sharding_rules.resolve_mesh(2, -1, 2, 8) == {"data": 2, "fsdp": 2, "tensor": 2, "expert": 1}
    assert sharding_rules.resolve_mesh(1, 4, 2, 8) == {"data": 1, "fsdp": 4, "tensor": 2, "expert": 1}
    assert sharding_rules.resolve_mesh(2, 1, 2, 8, expert=-1) == {"data": 2, "fsdp": 1, "tensor": 2, "expert": 2}
    with pytest.raises(PlanError, match="fixed axes multiply to 3"):
        sharding_rules.resolve_mesh(1, -1, 3, 8)
    with pytest.raises(PlanError, match="has 4 devices but 8 are available"):
        sharding_rules.resolve_mesh(2, 2, 1, 8)
    with pytest.raises(PlanError, match="mesh.data, mesh.fsdp"):
        sharding_rules.resolve_mesh(-1, -1, 1, 8)


def test_indivisible_dims_stay_replicated_and_the_plan_says_so():
    mesh = {"data": 1, "fsdp": 4, "tensor": 3}
    part, notes = sharding_rules.param_partition(("vocab", "embed"), (320, 32), mesh)
    assert part == (None, "fsdp") and "vocab (320) replicated: not divisible by mesh tensor=3" in notes[0]
    # One mesh axis never shards two dims of the same array.
    part, notes = sharding_rules.param_partition(("heads", "mlp"), (6, 9), mesh)
    assert part == ("tensor", None) and "already shards" in notes[0]
    part, _ = sharding_rules.param_partition(
        ("layers", "embed", "mlp"), (2, 32, 64), {"data": 8, "fsdp": 1, "tensor": 1}
    )
    assert part == (None, None, None)  # pure data parallelism replicates parameters


def _tiny_plan(overrides=None, devices=8, **kw):
    from ftc.backends.jax.models import family_for, shapes

    cfg = tl.tiny_llama_config()
    family = family_for(cfg)
    infos = shapes.param_infos(shapes.abstract_boxed_params(family.build(family.config_from_hf(cfg))))
    return plan_lib.compile_plan(tl.spec(overrides), cfg, devices, family=family.name, param_infos=infos, **kw)


def test_micro_batch_that_does_not_split_over_data_and_fsdp_is_an_error_naming_the_keys():
    with pytest.raises(
        PlanError, match=r"training.micro_batch_size=4 must be a multiple of mesh data\*fsdp = 1\*8 = 8"
    ):
        _tiny_plan({"training": {"batch_size": 8, "micro_batch_size": 4}})


def test_a_sequence_longer_than_a_learned_position_table_is_an_error_rotary_a_note():
    # Before: GPT-2 with n_positions=16 and max_seq_len=32 planned, then trained to a nan loss at
    # step 1 (positions past the table read nothing) with advice to lower the learning rate.
    from ftc.backends.jax.models import family_for, shapes

    cfg = {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 8, "vocab_size": 320}
    family = family_for(cfg)
    infos = shapes.param_infos(shapes.abstract_boxed_params(family.build(family.config_from_hf(cfg))))
    with pytest.raises(PlanError, match=r"model.max_seq_len=16 exceeds the 8 positions .* <= 8"):
        plan_lib.compile_plan(tl.spec(), cfg, 1, family=family.name, param_infos=infos)
    fits = tl.spec({"model": {"max_seq_len": 8}})
    assert plan_lib.compile_plan(fits, cfg, 1, family=family.name, param_infos=infos).batch.seq_len == 8
    rotary = _tiny_plan({"model": {"max_seq_len": 128}}, devices=1)  # tiny Llama: 64 positions, RoPE
    assert "model.max_seq_len=128 exceeds the model's max_position_embeddings=64" in rotary.notes


def test_trainable_mask_sets_trainable_count_and_memory_for_grads_and_optimizer():
    full = _tiny_plan(devices=1)
    mlp_only = _tiny_plan(devices=1, trainable=lambda path: "/mlp/" in path)
    mlp = sum(p.shape[0] * p.shape[1] * p.shape[2] for p in full.params if "/mlp/" in p.path)
    assert mlp_only.param_count == full.param_count == 39_072
    assert mlp_only.trainable_count == mlp == 3 * 2 * 32 * 64
    assert mlp_only.memory.params == full.memory.params
    assert mlp_only.memory.optimizer == 2 * 4 * mlp  # adamw: two float32 moments per trained value
    assert mlp_only.memory.grads == 4 * mlp
    assert [p.path for p in mlp_only.params if p.trainable] == [p.path for p in full.params if "/mlp/" in p.path]


def test_steps_from_epochs_when_data_size_known_and_warmup_ratio_resolved():
    plan = _tiny_plan(
        {"training": {"steps": None, "epochs": 3, "schedule": {"warmup_ratio": 0.1}}}, devices=1, steps_per_epoch=7
    )
    assert plan.steps.total_steps == 21 and plan.schedule.warmup_steps == 2
    unknown = _tiny_plan({"training": {"steps": None, "epochs": 3}}, devices=1)
    assert unknown.steps.total_steps is None and "unknown until the data is read" in unknown.steps.note


def test_fingerprint_ignores_mesh_and_step_count_but_not_learning_rate_or_batch():
    a = _tiny_plan({"mesh": {"data": 2, "fsdp": 2, "tensor": 2}})
    assert _tiny_plan({"mesh": {"data": 8, "fsdp": 1, "tensor": 1}}).fingerprint() == a.fingerprint()
    assert (
        _tiny_plan({"training": {"steps": 30}, "mesh": {"data": 2, "fsdp": 2, "tensor": 2}}).fingerprint()
        == a.fingerprint()
    )
    assert _tiny_plan({"training": {"batch_size": 16, "micro_batch_size": 16}}).fingerprint() != a.fingerprint()
    assert _tiny_plan({"training": {"optimizer": {"weight_decay": 0.1}}}).fingerprint() != a.fingerprint()
    json.dumps(a.to_dict())  # plain JSON data


def test_fingerprint_holds_nothing_that_a_resume_may_change():
    """One rule for resume: every RESUMABLE_CHANGES key may change and the plan's fingerprint,
    which resume also checks, stays the same; keys outside it do change the fingerprint."""
    one = {"mesh": {"data": 1, "fsdp": 1, "tensor": 1}, "training": {"batch_size": 8, "micro_batch_size": 8}}
    base = _tiny_plan(one, devices=1)
    resumable = {
        "training.micro_batch_size": {"training": {"micro_batch_size": 2}},
        "training.remat": {"training": {"remat": "full"}},
        "training.steps": {"training": {"steps": 300}},
        "training.epochs": {"training": {"steps": None, "epochs": 2}},
        "training.eval_every": {"training": {"eval_every": 0}},
        "training.log_every": {"training": {"log_every": 1}},
        "mesh": {"mesh": {"data": 1, "fsdp": 2, "tensor": 2}},
        "name": {"name": "other"},
        "description": {"description": "x"},
        "output_dir": {"output_dir": "/elsewhere"},
        "checkpoint": {"checkpoint": {"every": 3}},
        "logging": {"logging": {"progress": False}},
        "export": {"export": {"format": "hf", "dtype": "float32"}},
        "model.init_from": {"model": {"init_from": "/x"}},
        "data.validation": {"data": {"validation": "/v.jsonl"}},
        "eval": {"eval": {"samples": 4, "max_new_tokens": 16}, "data": {"validation": "/v.jsonl"}},  # its prompts
    }
    assert set(resumable) == set(plan_lib.RESUMABLE_CHANGES)
    for key, change in resumable.items():
        changed = _tiny_plan(_merged(one, change), devices=4 if key == "mesh" else 1, steps_per_epoch=5)
        assert changed.fingerprint() == base.fingerprint(), key
    for change in (
        {"model": {"param_dtype": "bfloat16"}},
        {"model": {"max_seq_len": 8}},
        {"training": {"optimizer": {"grad_clip": 0.5}}},
        {"method": {"kind": "lora"}},
    ):
        assert _tiny_plan(_merged(one, change), devices=1).fingerprint() != base.fingerprint(), change


def _merged(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def test_the_compiler_imports_no_backend_and_takes_the_models_facts_as_given():
    code = (
        "import sys; import ftc.compiler.plan, ftc.compiler.report; "
        "print(sorted(m for m in sys.modules if m.startswith(('ftc.backends', 'jax', 'flax', 'torch'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr
    infos = [plan_lib.ParamInfo("w/kernel", (4, 8), "float32", ("embed", "mlp"))]
    cfg = {"model_type": "toy", "hidden_size": 4, "num_hidden_layers": 1, "vocab_size": 8}
    plan = plan_lib.compile_plan(
        tl.spec({"mesh": {"fsdp": 1}}),
        cfg,
        1,
        family="toyfamily",
        param_infos=infos,
        counts=plan_lib.Counts(total=40, trainable=7, notes=("method toy: 7 of 40",)),
    )
    assert (plan.model.family, plan.param_count, plan.trainable_count) == ("toyfamily", 40, 7)
    assert plan.notes[0] == "method toy: 7 of 40"
