"""The benchmark harness keeps working: a 2-step run of bench.train_speed on a tiny Llama trains the
same work in both stacks (first-step losses agree) and reports every figure the table prints."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _run_bench(tmp_path, method: str) -> dict:
    out = tmp_path / "bench.json"
    cmd = [
        sys.executable,
        "-m",
        "bench.train_speed",
        "--config",
        "smoke",
        "--method",
        method,
        "--steps",
        "2",
        "--no-peak",
        "--json",
        str(out),
    ]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ftc/pt" in proc.stdout  # the ratio row of the printed table
    return json.loads(out.read_text())


def test_bench_smoke_both_stacks_train_the_same_work_and_report_ratios(tmp_path):
    report = _run_bench(tmp_path, "full")
    entry = report["methods"]["full"]
    torch_r, ftc_r = entry["pytorch"], entry["ftc"]
    assert abs(torch_r["losses"][0] - ftc_r["losses"][0]) <= 1e-4
    assert entry["loss_check"]["agree"]
    # full fine-tuning with the same optimizer: the second step's loss agrees too
    assert abs(torch_r["losses"][1] - ftc_r["losses"][1]) <= 1e-4
    assert torch_r["trainable_params"] == ftc_r["trainable_params"] == report["params"]
    for r in (torch_r, ftc_r):
        assert r["tokens_per_s"] > 0 and r["step_median_s"] > 0 and r["startup_s"] > 0
        assert r["peak_rss_bytes"] > r["rss_after_import_bytes"] > 0
        assert r["minor_faults_per_step"] >= 0 and 0 <= r["sys_s_per_step"] <= max(r["step_cpu_s"])
    assert ftc_r["compile_s"] > 0
    assert set(entry["ratio"]) >= {"startup_s", "step_median_s", "tokens_per_s", "peak_rss_bytes"}
    assert entry["ratio"]["tokens_per_s"] == pytest.approx(ftc_r["tokens_per_s"] / torch_r["tokens_per_s"])
    # `ftc plan --compile`'s prediction beside the measured buffers (bench/plan_memory.py)
    predicted, check = ftc_r["predicted_memory"], ftc_r["memory_check"]
    assert predicted["compiled"]["peak"] == ftc_r["xla_memory"]["peak"] > 0  # the same step as the worker's
    assert check["buffers_bytes"] >= ftc_r["state_bytes"] > 0 and check["estimate_bytes"] > 0


def test_kernels_bench_times_every_projection_and_attention_in_both_stacks(tmp_path):
    out = tmp_path / "kernels.json"
    cmd = [sys.executable, "-m", "bench.kernels", "--config", "smoke", "--repeats", "2", "--json", str(out)]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    names = [r["name"] for r in report["rows"]]
    assert names == [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
        "lm_head",
        "attention",
    ]
    for stack in ("pytorch", "ftc"):
        per_step = sum(r["count"] * r[stack]["forward_backward_s"] for r in report["rows"])
        assert report["step_total_s"][stack] == pytest.approx(per_step)
        assert report["matmul_total_s"][stack] < report["step_total_s"][stack]
        assert all(r[stack]["forward_s"] > 0 for r in report["rows"])
