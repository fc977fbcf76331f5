"""`ftc plan --compile`: the run's train step compiled ahead for the plan's mesh on CPU devices,
XLA's memory analysis per device beside the plan's estimate; and the estimate's attention term."""

from __future__ import annotations

import json

import pytest
import train_testlib as tl
from click.testing import CliRunner

from ftc.cli import main


def _spec(tmp_path, extra: str = "") -> str:
    (tmp_path / "m").mkdir(exist_ok=True)
    (tmp_path / "m" / "config.json").write_text(json.dumps(tl.tiny_llama_config()))
    (tmp_path / "s.toml").write_text(
        'ftc = 1\nname = "t"\n[model]\nbase = "m"\nmax_seq_len = 64\n[data]\nformat = "text"\ntrain = "x.jsonl"\n'
        "[training]\nsteps = 2\nbatch_size = 8\nmicro_batch_size = 8\n" + extra
    )
    return str(tmp_path / "s.toml")


def test_plan_compile_reports_xla_memory_per_device_of_the_sharded_step_beside_the_estimate(tmp_path):
    spec = _spec(tmp_path)
    r = CliRunner().invoke(main, ["plan", spec, "--devices", "2", "--compile", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    c, est = out["compiled_memory"], out["memory"]
    assert c["platform"] == "cpu" and c["devices"] == 2
    assert min(c["argument"], c["output"], c["temp"]) > 0
    assert c["peak"] == c["argument"] + c["output"] - c["alias"] + c["temp"]
    # The train state is donated: XLA writes the new state over the old one.
    assert c["alias"] >= est["params"] + est["optimizer"] - 4096
    # Arguments are this device's shard of params + optimizer state (fsdp=2 splits the large
    # ones, the norms stay whole), plus the batch: between half the whole state and all of it.
    one_device = json.loads(CliRunner().invoke(main, ["plan", spec, "--devices", "1", "--json"]).output)["memory"]
    whole = one_device["params"] + one_device["optimizer"]
    assert 0.5 * whole < c["argument"] < 0.75 * whole
    assert 0.3 < c["peak"] / est["total"] < 3.0  # the same order as the estimate on a toy model


def test_plan_compile_text_puts_xla_figures_beside_the_estimate():
    from ftc.backends.jax.compiled_memory import CompiledMemory
    from ftc.compiler.report import format_compiled_memory

    c = CompiledMemory("cpu", 2, 3 << 20, 3 << 20, 3 << 20, 5 << 20, 0, 1.5)

    class Plan:  # format_compiled_memory reads only the plan's memory total
        memory = type("M", (), {"total": 4 << 20})()

    text = format_compiled_memory(Plan, c)
    assert "the train step for 2 cpu device(s) in 1.5 s" in text
    assert "arguments 3.0 MiB + outputs 3.0 MiB - aliased 3.0 MiB + temporaries 5.0 MiB = 8.0 MiB" in text
    assert "(estimate above 4.0 MiB, 2.00x the estimate)" in text


def test_plan_compile_on_a_device_count_the_mesh_does_not_divide_says_so_before_compiling(tmp_path):
    spec = _spec(tmp_path, "[mesh]\ntensor = 2\n")
    r = CliRunner().invoke(main, ["plan", spec, "--devices", "3", "--compile"])
    assert r.exit_code == 1
    assert "does not divide the 3 devices" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(main, ["plan", spec, "--devices", "0", "--compile"])
    assert r.exit_code == 2 and "--devices" in r.output


def test_plan_compile_on_more_cpu_devices_than_xla_makes_says_so_before_starting_them(tmp_path):
    # Before: --devices 100000 spawned a process that made 100,000 CPU devices, ignored SIGTERM and
    # aborted inside XLA after 9 minutes; 4,096 ended in an internal error.
    spec = _spec(tmp_path, "[mesh]\nfsdp = 1\ntensor = -1\n")
    r = CliRunner().invoke(main, ["plan", spec, "--devices", "4096", "--compile"])
    assert r.exit_code == 1 and "--compile --devices 4096: XLA:CPU makes at most 2048 devices" in r.output, r.output
    assert CliRunner().invoke(main, ["plan", spec, "--devices", "4096"]).exit_code == 0  # the plan alone is fine


def test_plan_compile_of_an_objective_not_trained_by_a_train_step_says_why(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(tl.tiny_llama_config()))
    (tmp_path / "s.toml").write_text(
        'ftc = 1\nname = "t"\n[model]\nbase = "m"\nmax_seq_len = 16\n[data]\nformat = "classification"\n'
        'train = "x.jsonl"\n[method]\nkind = "probe"\n[training]\nobjective = "classify"\nsteps = 2\n'
    )
    r = CliRunner().invoke(main, ["plan", str(tmp_path / "s.toml"), "--devices", "1", "--compile"])
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert "training.objective='classify'" in r.output and "not by a train step" in r.output


@pytest.mark.slow
def test_plan_compile_on_more_devices_than_this_process_has_compiles_in_a_fresh_process(tmp_path):
    spec = _spec(tmp_path, "[mesh]\nfsdp = 4\ntensor = 4\n")
    r = CliRunner().invoke(main, ["plan", spec, "--devices", "16", "--compile", "--json"])  # pytest has 8
    assert r.exit_code == 0, r.output
    c = json.loads(r.output)["compiled_memory"]
    assert c["devices"] == 16 and c["temp"] > 0


def test_attention_keeps_no_t_by_t_term_in_the_estimate():
    """Every training attention kernel recomputes the probabilities in the backward pass, so the
    estimate is the same for the same tokens however they are cut into sequences."""
    from ftc.backends.jax.pipeline import plan_for

    cfg = dict(tl.tiny_llama_config(), max_position_embeddings=4096)
    short = tl.spec({"model": {"max_seq_len": 64}, "training": {"batch_size": 32, "micro_batch_size": 32}})
    long = tl.spec({"model": {"max_seq_len": 2048}, "training": {"batch_size": 1, "micro_batch_size": 1}})
    a, b = (plan_for(s, cfg, 1)[0].memory.activations for s in (short, long))
    assert a == b > 0


MOE_TYPES = {  # model_type -> its expert keys (routed experts 2 of 8; Qwen2-MoE with a shared expert)
    "mixtral": {"num_local_experts": 8, "num_experts_per_tok": 2, "intermediate_size": 256},
    "qwen2_moe": {
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 192,
        "shared_expert_intermediate_size": 256,
        "intermediate_size": 256,
    },
}


@pytest.mark.parametrize("model_type", sorted(MOE_TYPES))
def test_moe_estimate_follows_what_xla_keeps_for_the_experts(tmp_path, model_type):
    """A token's top-k experts each keep their own rows (and the CPU blocks' padding) for the
    backward pass: the estimate used one dense MLP's width and was 2.8x under XLA's figure."""
    dims = dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )
    configs = {
        "moe": dict(dims, model_type=model_type, **MOE_TYPES[model_type]),
        "dense": dict(dims, model_type="llama", intermediate_size=256),
    }
    figures = {}
    for name, config in configs.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(config))
        spec = tmp_path / f"{name}.toml"
        spec.write_text(
            f'ftc = 1\nname = "t"\n[model]\nbase = "{name}"\nmax_seq_len = 128\ndtype = "float32"\n'
            '[data]\nformat = "text"\ntrain = "x.jsonl"\n[training]\nsteps = 2\nbatch_size = 8\nmicro_batch_size = 8\n'
        )
        r = CliRunner().invoke(main, ["plan", str(spec), "--devices", "1", "--compile", "--json"])
        assert r.exit_code == 0, r.output
        out = json.loads(r.output)
        figures[name] = (out["memory"]["total"], out["compiled_memory"]["peak"])
    (est_moe, xla_moe), (est_dense, xla_dense) = figures["moe"], figures["dense"]
    assert 0.8 < xla_moe / est_moe < 1.25
    # What the experts add over a dense MLP of the same model, estimated against compiled.
    assert 0.75 < (xla_moe - xla_dense) / (est_moe - est_dense) < 1.33
