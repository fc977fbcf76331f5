"""The GPU check (bench/gpu_check.sh) runs as one command and fails soft: its dry run takes the same
code path on CPU with tiny shapes, in an environment that lacks what the GPU machine lacks
(grain, tensorflow-datasets, gguf, tensorboardX, jsonschema), and writes its JSON and table."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MISSING_ON_GPU_MACHINE = ("grain", "tensorflow_datasets", "gguf", "tensorboardX", "jsonschema")

BLOCKER = f"""
import importlib.abc, sys
class _Missing(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {MISSING_ON_GPU_MACHINE!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (not on the GPU machine)")
sys.meta_path.insert(0, _Missing())
"""


def _dry_run(tmp_path, *args) -> tuple[subprocess.CompletedProcess, dict]:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER)
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable, PYTHONPATH=str(site))
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run(
        ["bash", "bench/gpu_check.sh", "--dry-run", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    report = json.loads((out / "gpu_check.json").read_text())
    assert (out / "gpu_check.txt").read_text().strip() in proc.stdout
    assert (out / "gpu_check.log").exists()
    return proc, report


def test_gpu_check_dry_run_trains_both_stacks_and_compares_attention_kernels(tmp_path):
    proc, report = _dry_run(tmp_path, "--only", "env,attention,train", "--methods", "full")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    items = report["items"]
    assert items["env"]["jax_backend"] == "cpu"
    kernels = {k for case in items["attention"]["cases"] for k, e in case["kernels"].items() if e.get("pass")}
    assert kernels == {"blockwise", "xla"}
    full = items["train"]["methods"]["full"]
    assert full["loss_check"]["agree"] and full["ratio"]["tokens_per_s"] > 0
    assert "ftc/pt" in proc.stdout


def test_gpu_check_reports_a_failed_item_and_goes_on(tmp_path):
    """An item that cannot run is one row saying why; later items still run."""
    proc, report = _dry_run(tmp_path, "--only", "train,env", "--methods", "full,nonsense")
    assert proc.returncode == 1
    methods = report["items"]["train"]["methods"]
    assert "error" in methods["nonsense"]["ftc"] and "losses" in methods["full"]["ftc"]
    assert "FAILED" in proc.stdout and report["items"]["env"]["jax_backend"] == "cpu"


@pytest.mark.slow
def test_gpu_check_full_dry_run(tmp_path):
    proc, report = _dry_run(tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert set(report["items"]) == {"env", "attention", "train", "xla-attn"}
