"""`ftc lint` stays light: no jax, flax, torch or transformers, and 100 specs in about a second."""

import json
import os
import subprocess
import sys
import time

HEAVY = ("jax", "flax", "torch", "transformers", "tensorflow", "optax", "orbax")

# Runs the CLI in a fresh interpreter, then reports which heavy modules got imported.
WRAPPER = """
import json, sys
from ftc.cli import main
try:
    main(sys.argv[1:])
except SystemExit as e:
    code = e.code
heavy = sorted({m.split('.')[0] for m in sys.modules} & set(HEAVY))
print(json.dumps({"code": code, "heavy": heavy}), file=sys.stderr)
"""


def _run_cli(args, cwd):
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", f"HEAVY = {HEAVY!r}\n" + WRAPPER, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    elapsed = time.perf_counter() - start
    return json.loads(proc.stderr.strip().splitlines()[-1]), proc.stdout, elapsed


def _write_specs(tmp_path, n):
    (tmp_path / "base.toml").write_text(
        '[model]\nbase = "HuggingFaceTB/SmolLM2-135M-Instruct"\n[data]\nformat = "chat"\n'
        'train = "tfds:chat/default:train"\nvalidation_split = 0.05\n'
    )
    names = []
    for i in range(n):
        kind = ("full", "lora", "qlora", "adapter")[i % 4]
        name = f"spec{i:03d}.{'json' if i % 5 == 0 else 'toml'}"
        if name.endswith(".json"):
            text = json.dumps(
                {
                    "extends": "base.toml",
                    "name": f"run-{i}",
                    "method": {"kind": kind},
                    "training": {"learning_rate": 1e-4 * (i + 1), "batch_size": 16, "micro_batch_size": 4},
                }
            )
        else:
            text = (
                f'extends = "base.toml"\nname = "run-{i}"\n[method]\nkind = "{kind}"\n'
                f"[training]\nlearning_rate = {1e-4 * (i + 1)}\nbatch_size = 16\nmicro_batch_size = 4\n"
                'schedule = { kind = "cosine", warmup_ratio = 0.03 }\n[mesh]\nfsdp = -1\n'
            )
        (tmp_path / name).write_text(text)
        names.append(name)
    return names


def test_linting_100_specs_imports_no_ml_framework_and_takes_about_a_second(tmp_path):
    names = _write_specs(tmp_path, 100)
    result, stdout, elapsed = _run_cli(["lint", *names], tmp_path)
    assert result == {"code": 0, "heavy": []}, stdout
    assert "100 specs checked: all valid" in stdout
    # About a second on a quiet machine (interpreter start included); the bound leaves room for
    # a loaded CI box while still failing if a framework import (several seconds) creeps in.
    assert elapsed < 4.0, f"linting 100 specs took {elapsed:.2f} s"


def test_schema_command_imports_no_ml_framework(tmp_path):
    result, stdout, _ = _run_cli(["schema"], tmp_path)
    assert result == {"code": 0, "heavy": []} and json.loads(stdout)["title"] == "ftc spec"
