"""Predicted memory of a benchmark job, from `ftc plan --compile` run on a spec that asks for the
same work (model directory, batch, sequence, method, optimizer, dtype): the plan's estimate and
XLA's memory analysis of the compiled train step, to print beside the worker's measured peak.

    python -m bench.plan_memory --config cpu --method full     # one job's figures, as JSON

The spec goes through the user's path (`ftc plan SPEC --compile --devices 1 --json` in its own
process), so the figure the bench checks is the one the command prints.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common  # noqa: E402


def spec_text(job: common.Job) -> str:
    """A TOML spec training what `job` trains (the data file is never read by `ftc plan`)."""
    c = job.config
    method = 'kind = "full"'
    if job.method in ("lora", "qlora"):
        method = (
            f'kind = "{job.method}"\nrank = {c.lora_rank}\nalpha = {c.lora_alpha}\ndropout = 0.0\n'
            'targets = "all-linear"'
        )
    if job.method == "qlora":
        method += f"\nquant_block_size = {c.quant_block_size}\ndouble_quant = false"
    return "\n".join(
        [
            "ftc = 1",
            f'name = "bench-{c.name}-{job.method}"',
            "[model]",
            f'base = "{job.model_dir}"',
            f'dtype = "{c.dtype}"',
            f"max_seq_len = {c.seq_len}",
            "[data]",
            'format = "text"',
            'train = "unused.jsonl"',
            "[method]",
            method,
            "[training]",
            f"steps = {job.steps}",
            f"batch_size = {c.batch}",
            f"micro_batch_size = {c.batch}",
            f"learning_rate = {c.learning_rate}",
            f'remat = "{job.remat}"',
            'schedule = { kind = "constant" }',
            f'optimizer = {{ kind = "adamw", weight_decay = 0.0, grad_clip = {c.grad_clip} }}',
            "",
        ]
    )


def predict(job: common.Job, work_dir: Path, env: dict, timeout: float = 600.0) -> dict:
    """{"estimate": the plan's per-device total and parts, "compiled": XLA's figures} in bytes,
    or {"error": ...}."""
    spec = work_dir / f"plan-{job.method}.toml"
    spec.write_text(spec_text(job))
    cmd = [sys.executable, "-m", "ftc.cli", "plan", str(spec), "--compile", "--devices", "1", "--json"]
    try:
        proc = subprocess.run(cmd, cwd=common.REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"ftc plan --compile timed out after {timeout:.0f} s"}
    if proc.returncode != 0:
        return {"error": " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-4:])}
    plan = json.loads(proc.stdout)
    return {"estimate": plan["memory"], "compiled": plan["compiled_memory"]}


def compare(predicted: dict, measured: dict) -> dict:
    """The worker's measured memory beside the prediction. `buffers_bytes` is what XLA's figure
    predicts, measured: the train state's bytes (exact, from its arrays) plus what the steps
    added to the resident process (peak RSS while stepping minus RSS just before the first step,
    after the C heap was trimmed). `runtime_bytes`: the rest of the peak RSS (Python, jax, XLA's
    compiled code and its compiler's leftovers), which no per-device figure counts."""
    out: dict = {}
    if "error" in predicted or "peak_rss_steps_bytes" not in measured:
        return out
    transient = measured["peak_rss_steps_bytes"] - measured["rss_before_steps_bytes"]
    out["buffers_bytes"] = measured["state_bytes"] + transient
    out["runtime_bytes"] = measured["peak_rss_bytes"] - out["buffers_bytes"]
    for name, figure in (("estimate", predicted["estimate"]["total"]), ("compiled", predicted["compiled"]["peak"])):
        out[f"{name}_bytes"] = figure
        out[f"{name}_over_buffers"] = figure / out["buffers_bytes"] if out["buffers_bytes"] > 0 else None
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse
    import tempfile

    from bench import train_speed

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", choices=sorted(common.CONFIGS), default="cpu")
    p.add_argument("--method", choices=common.METHODS, default="full")
    args = p.parse_args(argv)
    config = common.CONFIGS[args.config]
    with tempfile.TemporaryDirectory(prefix="ftc-bench-plan-") as tmp:
        work = Path(tmp)
        train_speed.save_random_model(config, work / "model")
        job = common.Job(config, args.method, str(work / "model"), "", config.steps, config.warmup, 1)
        print(json.dumps(predict(job, work, train_speed.worker_env(config)), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
