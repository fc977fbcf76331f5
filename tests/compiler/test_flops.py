"""compiler/flops.py and the MFU a run reports: model FLOPs per trained token (PaLM convention)
for every method, counted by the plan from the method's own weights, and checked against the
benchmark's independent count from the shape alone."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import train_testlib as tl
import transformers as tf

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # bench/ is not installed: run from the repo
from bench import common as bench_common  # noqa: E402
from ftc.backends.jax import pipeline as run_lib
from ftc.backends.jax.train import device_peak
from ftc.compiler import flops as flops_lib


@pytest.fixture(scope="module")
def bench_model_dir(tmp_path_factory):
    """bench's CPU shape (Llama 7.1M, untied) and a tied variant, as config-only directories."""
    root = tmp_path_factory.mktemp("flops")
    dirs = {}
    for tied in (False, True):
        c = bench_common.CONFIGS["cpu"]
        kw = dict(c.hf_config_kwargs(), tie_word_embeddings=tied)
        path = root / f"tied{int(tied)}"
        tf.LlamaConfig(**kw).save_pretrained(path)
        dirs[tied] = path
    return dirs


def _plan(model_dir, method: dict, objective: str = "sft"):
    c = bench_common.CONFIGS["cpu"]
    spec = tl.spec(
        {
            "model": {"base": str(model_dir), "max_seq_len": c.seq_len},
            "training": {"objective": objective, "batch_size": c.batch, "micro_batch_size": c.batch},
            "data": {"format": "preference" if objective == "dpo" else "chat"},
            "method": method,
        }
    )
    return run_lib.plan_spec(spec, device_count=1)


@pytest.mark.parametrize(
    "method,bench_method",
    [
        ({"kind": "full"}, "full"),
        ({"kind": "lora", "rank": 16, "alpha": 32, "targets": "all-linear"}, "lora"),
        ({"kind": "qlora", "rank": 16, "alpha": 32, "targets": "all-linear"}, "qlora"),
    ],
)
def test_plan_flops_equal_the_benchmarks_count_from_the_shape(bench_model_dir, method, bench_method):
    plan = _plan(bench_model_dir[False], method)
    want = bench_common.train_flops_per_token(bench_common.CONFIGS["cpu"], bench_method)
    assert plan.flops_per_token == pytest.approx(want, rel=1e-12)


def test_full_fine_tune_is_6n_plus_attention_with_the_tied_head_counted(bench_model_dir):
    c = bench_common.CONFIGS["cpu"]
    d, hd = c.hidden, c.head_dim
    per_layer = d * c.heads * hd * 2 + d * c.kv_heads * hd * 2 + 3 * d * c.intermediate
    n = c.layers * per_layer + d * c.vocab  # the head's matmul costs the same tied or not
    attention = 12 * c.layers * c.seq_len * c.heads * hd
    assert _plan(bench_model_dir[True], {"kind": "full"}).flops_per_token == 6 * n + attention
    assert (
        _plan(bench_model_dir[True], {"kind": "lora", "rank": 16, "alpha": 32, "targets": "all-linear"}).flops_per_token
        < 6 * n
    )  # frozen weights: no weight gradient
    dpo = _plan(bench_model_dir[True], {"kind": "full"}, objective="dpo").flops_per_token
    assert dpo == 6 * n + attention + 2 * n + attention / 3  # plus the reference model's forward


def test_adapters_count_their_bottleneck_weights_as_trained_matmuls(bench_model_dir):
    full = _plan(bench_model_dir[False], {"kind": "full"}).flops_per_token
    adapter = _plan(bench_model_dir[False], {"kind": "adapter", "reduction_factor": 16}).flops_per_token
    c = bench_common.CONFIGS["cpu"]
    n = bench_common.matmul_params(c)
    attention = 12 * c.layers * c.seq_len * c.heads * c.head_dim
    added = (adapter - 4 * n - attention) / 6
    assert 0 < added < n / 10 and full > adapter


def test_plan_prints_the_flop_count():
    from ftc.compiler.report import format_plan

    spec = tl.spec()
    plan = run_lib.plan_for(spec, tl.tiny_llama_config(), 1)[0]
    assert f"{plan.flops_per_token / 1e9:,.3f} GFLOP per trained token" in format_plan(plan)


@pytest.mark.parametrize(
    "kind,dtype,tflops",
    [
        ("NVIDIA H100 80GB HBM3", "bfloat16", 989.4),
        ("NVIDIA H100 PCIe", "bfloat16", 756.0),
        ("NVIDIA H200", "float16", 989.4),
        ("NVIDIA A100-SXM4-40GB", "bfloat16", 312.0),
        ("TPU v5 lite", "bfloat16", 197.0),
        ("TPU v5p", "bfloat16", 459.0),
        ("TPU v4", "bfloat16", 275.0),
        ("NVIDIA H100 80GB HBM3", "float32", None),
        ("cpu", "bfloat16", None),
    ],
)
def test_datasheet_peaks_only_for_known_devices_in_16_bit(kind, dtype, tflops):
    got = flops_lib.datasheet_peak_flops(kind, dtype)
    assert got == (None if tflops is None else tflops * 1e12)


def test_peak_comes_from_the_spec_else_a_matmul_measured_once_per_machine_and_cached(tmp_path, monkeypatch):
    assert device_peak.peak_flops("float32", 12.5, cache_dir=tmp_path) == (12.5e12, "logging.peak_tflops")
    measured, source = device_peak.peak_flops("float32", cache_dir=tmp_path)
    assert source.startswith("float32 matmul measured on this machine") and 1e9 < measured < 1e14
    cached = json.loads((tmp_path / device_peak.CACHE_FILE).read_text())
    assert cached[device_peak.machine_key("float32")]["flops"] == measured
    # Later runs read the figure instead of measuring under whatever load there is then.
    monkeypatch.setattr(device_peak, "measure_matmul_flops", lambda *a, **k: pytest.fail("measured again"))
    assert device_peak.peak_flops("float32", cache_dir=tmp_path) == (measured, source)
    monkeypatch.setattr(device_peak, "measure_matmul_flops", lambda *a, **k: 7e9)
    assert device_peak.peak_flops("bfloat16", cache_dir=tmp_path)[0] == 7e9  # another dtype: its own entry
    (tmp_path / device_peak.CACHE_FILE).write_text("{not json")
    assert device_peak.peak_flops("float32", cache_dir=tmp_path)[0] == 7e9  # a damaged file is measured anew


def test_mfu_is_model_flops_over_the_peak_of_every_device():
    assert flops_lib.mfu(1e9, 2000.0, 1e12, 4) == pytest.approx(0.5)


def test_run_logs_mfu_and_host_memory_on_train_rows(tmp_path):
    """A real run: every train row has MFU = the plan's model FLOPs per step over the elapsed time
    and the spec's peak (per host on CPU: its devices share the host's cores), read here back
    through tokens/s, and the process's resident memory."""
    tl.make_model_dir(tmp_path / "model")
    tl.write_chat_data(tmp_path / "train.jsonl", 16)
    spec = tl.spec(
        {
            "name": "mfu",
            "output_dir": str(tmp_path / "runs"),
            "model": {"base": str(tmp_path / "model"), "max_seq_len": 48},
            "data": {"train": str(tmp_path / "train.jsonl")},
            "training": {"steps": 2, "log_every": 1},
            "logging": {"progress": False, "peak_tflops": 2.0},
        }
    )
    run_lib.run(spec, echo=lambda s: None)
    rows = [json.loads(line) for line in open(tmp_path / "runs" / "mfu" / "metrics.jsonl")]
    train = [r for r in rows if r["split"] == "train"]
    assert len(train) == 2
    plan = run_lib.plan_spec(spec)
    for r in train:  # log_every = 1: each row's window is its own step
        assert 0 < r["mfu"] < 1
        steps_per_second = r["tokens_per_second"] / r["tokens"]
        assert r["mfu"] == pytest.approx(
            plan.flops_per_token * plan.batch.tokens_per_step * steps_per_second / 2e12, rel=1e-6
        )
        assert r["host_memory_peak_bytes"] >= r["host_memory_bytes"] > 50e6
        assert r["peak_tflops"] == 2.0  # the denominator used, written with the figure
