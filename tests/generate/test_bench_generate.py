"""bench/generate.py keeps working: on a tiny Llama both stacks generate the same greedy tokens and
the table reports first-token time, decode tokens/s and their ratios."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import train_testlib as tl

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # two worker processes, about a minute on 2 cores
def test_bench_generate_runs_both_stacks_on_the_same_prompts(tmp_path):
    model = tl.make_model_dir(tmp_path / "model")
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "bench.generate", "--model", model, "--batch", "1", "3", "--new-tokens", "4",
           "--rounds", "1", "--json", str(out)]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(REPO), XLA_FLAGS="")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ftc/tf" in proc.stdout and "same tokens: 12/12" in proc.stdout
    report = json.loads(out.read_text())
    for stack in ("ftc", "transformers"):
        for b in ("1", "3"):
            entry = report["results"][stack]["batches"][b]
            assert entry["first_token_seconds"] > 0 and entry["decode_tokens_per_second"] > 0
            assert len(entry["tokens"]) == int(b) and all(len(t) == 4 for t in entry["tokens"])
