"""Fake CPU devices' collectives against XLA:CPU's thread pool (backends/jax/host_devices.py):
DPO runs (LoRA and full) on an (fsdp 4, tensor 2) mesh of 8 fake devices, repeated in each of
several processes side by side, as pytest's workers ran tests/objectives/test_dpo.py in CI.

    python -m bench.fake_devices_hang                     # ftc's pool: 4 threads per device (32)
    python -m bench.fake_devices_hang --pool 8            # XLA's own size on 2 cores: hangs
    python -m bench.fake_devices_hang --pool 8 --no-ahead # the same without the compile-ahead thread

A hung process is one XLA aborted ("Termination timeout for all reduce ...", after 40 s). Prints
per process the runs completed and whether it hung, then one JSON line. On 2 cores, 2026-12-01:
with a pool of 8, each of 3 pairs hung (4 of 6 processes, after 2-17 runs); with 32, 140 runs and
no hang. Uses the tests' tiny model and preference pairs (tests/support, tests/objectives).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FLAGS = "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"


def worker(runs: int, ahead: bool) -> None:
    sys.path[:0] = [str(REPO / "tests" / "support"), str(REPO / "tests" / "objectives")]
    import test_dpo
    import train_testlib
    from data_testlib import write_jsonl

    from ftc.backends.jax import pipeline
    from ftc.spec import load_spec

    if not ahead:
        pipeline._compile_ahead = lambda *a: None
    root = Path(tempfile.mkdtemp(prefix="ftc-fake-devices-"))
    train_testlib.make_model_dir(root / "base")
    write_jsonl(root / "train_pairs.jsonl", test_dpo._pairs(8, seed=2))
    write_jsonl(root / "valid_pairs.jsonl", test_dpo._pairs(4, seed=3))
    lora = '[method]\nkind = "lora"\nrank = 4\nalpha = 8\ntargets = "all-linear"\n[training]'
    pick = random.Random(0)
    for i in range(runs):
        text = test_dpo.DPO_SPEC.format(root=root, seq=test_dpo.SEQ, beta=test_dpo.BETA)
        text = text.replace('name = "dpo"', f'name = "dpo-{i}"')
        if pick.random() < 0.7:
            text = text.replace("[training]", lora)
        (root / f"{i}.toml").write_text(text)
        pipeline.run(load_spec(str(root / f"{i}.toml")), echo=lambda line: None)
        print("run", i, flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--runs", type=int, default=30, help="DPO runs per process")
    p.add_argument("--pool", type=int, default=None, help="PJRT_NPROC (default: ftc's, 4 per device)")
    p.add_argument("--no-ahead", action="store_true", help="compile the step at its first call")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args.runs, not args.no_ahead)
        return 0
    env = {k: v for k, v in os.environ.items() if k not in ("PJRT_NPROC", "NPROC")}
    env.update(XLA_FLAGS=FLAGS, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    if args.pool is not None:
        env["PJRT_NPROC"] = str(args.pool)
    cmd = [sys.executable, "-m", "bench.fake_devices_hang", "--worker", "--runs", str(args.runs)]
    cmd += ["--no-ahead"] if args.no_ahead else []
    procs = [
        subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(args.processes)
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate()
        runs = out.count("run ")
        hung = "Termination timeout" in err
        results.append({"runs": runs, "hung": hung, "returncode": proc.returncode})
        print(f"process: {runs} runs, {'hung' if hung else 'no hang'} (exit {proc.returncode})")
    print(json.dumps({"pool": args.pool or "ftc", "ahead": not args.no_ahead, "processes": results}))
    return 0 if all(r["returncode"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
