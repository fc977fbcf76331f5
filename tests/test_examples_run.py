"""Every example spec runs as written (slow: real SmolLM2-135M / MiniLM from PyPI packages): `ftc
run examples/X` with only its length cut to two steps, then its export is on disk. The quickstart
itself is the README's main job and is measured there, not re-run here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SHORT = ["--set", "training.steps=2", "--set", "training.schedule.warmup_steps=0", "--set", "training.eval_every=2"]


@pytest.mark.slow
@pytest.mark.parametrize("example", ["lora.toml", "dpo.toml", "adapter.json", "probe.toml"])
def test_example_runs_as_written_for_two_steps_and_exports(example, tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from ftc.cli import main; sys.exit(main())",
            "run",
            str(EXAMPLES / example),
            *SHORT,
            "--set",
            f"output_dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        timeout=1200,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    export = run_dir / "export"
    assert export.is_dir() and any(export.iterdir())
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    assert rows and all(isinstance(r.get("loss", 0.0), float) for r in rows)


@pytest.mark.slow
def test_grpo_example_runs_two_steps_logs_rewards_and_exports(tmp_path):
    """examples/grpo.toml cut to one rollout (two updates); the README's reward curve is the full run."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from ftc.cli import main; sys.exit(main())",
            "run",
            str(EXAMPLES / "grpo.toml"),
            "--set",
            "training.steps=2",
            "--set",
            f"output_dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        timeout=1200,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert (run_dir / "export" / "adapter_model.safetensors").is_file()
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    train = [r for r in rows if r.get("split") == "train"]
    assert [r["step"] for r in train] == [1, 2]
    for r in train:
        assert 0.0 <= r["rewards/numeric/mean"] <= 1.0 and 0.0 <= r["rewards/brevity/mean"] <= 1.0
        assert r["reward"] == pytest.approx(r["rewards/numeric/mean"] + 0.5 * r["rewards/brevity/mean"], abs=1e-6)
