"""Training speed and memory, ftc against the PyTorch stack, on the same work in one invocation.

    python -m bench.train_speed --config cpu --method all          # the CPU table (a few minutes)
    python -m bench.train_speed --config gpu-1b --method all       # on a GPU machine: adds MFU
    python bench/train_speed.py --config cpu --method full --steps 10 --json out.json

One random Llama is saved once with transformers (safetensors) so both stacks start from the
same weights; one array of random token ids (fixed seed, no padding) feeds both. Each stack
trains in its own process (so peak RSS is its own): transformers (+ PEFT LoRA / bitsandbytes
QLoRA) with torch.optim.AdamW, and ftc's jitted train step on a 1-device mesh with optax AdamW.
Same batch, sequence length, optimizer (AdamW, lr 1e-4 constant, no weight decay, grad clip 1.0)
and precision. The first step's loss must agree between the stacks (same weights, same tokens):
that is the check that they do the same work.

Reported per stack: start-up (imports + model load + compile + first step, each also on its
own), steady-state step time (median of the steps after warm-up), tokens/s, peak RSS, and MFU
against the measured matmul peak of the device; then ftc/PyTorch ratios.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common, plan_memory  # noqa: E402
from bench.speed_table import STACKS, format_table  # noqa: E402, F401 (gpu_check uses format_table)

WORKERS = {"pytorch": "bench.torch_worker", "ftc": "bench.ftc_worker"}
# First-step loss agreement: float32 both sides is tight; bf16 compute rounds differently per stack.
LOSS_TOLERANCE = {"float32": 1e-4, "bfloat16": 5e-2}


# ------------------------------------------------------------------ inputs shared by both stacks


def save_random_model(config: common.BenchConfig, out_dir: Path, seed: int = 0) -> None:
    """A randomly initialised LlamaForCausalLM saved as config.json + model.safetensors."""
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(seed)
    hf_config = transformers.LlamaConfig(**config.hf_config_kwargs())
    # A 1B model's random init takes a minute on a few CPU cores and a second on the GPU.
    on_gpu = config.device == "gpu" and torch.cuda.is_available()
    with torch.device("cuda" if on_gpu else "cpu"):
        model = transformers.LlamaForCausalLM(hf_config).eval()
    model.to("cpu").save_pretrained(out_dir, safe_serialization=True)
    del model
    if on_gpu:
        torch.cuda.empty_cache()


def make_tokens(config: common.BenchConfig, steps: int, path: Path, seed: int = 0) -> None:
    """int32 [steps, batch, seq_len + 1] random ids: step i trains on inputs [..., :-1] and
    targets [..., 1:]. Every position is a real token (no padding), so tokens/s counts them all."""
    import numpy as np

    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, config.vocab, (steps, config.batch, config.seq_len + 1), dtype=np.int32)
    np.save(path, tokens)


# ------------------------------------------------------------------ running the workers


def worker_env(config: common.BenchConfig) -> dict:
    env = dict(os.environ)
    # One real device: drop the fake-device flag tests set, which would split the CPU into 8.
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    env["XLA_FLAGS"] = " ".join(flags)
    if config.device == "cpu":
        env["JAX_PLATFORMS"] = "cpu"
        env["CUDA_VISIBLE_DEVICES"] = ""
    env["PYTHONPATH"] = os.pathsep.join(
        [str(common.REPO_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    )
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def worker_process(stack: str, config: common.BenchConfig, cmd: list[str], timeout: float | None = None):
    """Run a stack's worker command from the repo root in its environment (worker_env, and for ftc
    what the `ftc` command restarts itself with: common.stack_env); output captured."""
    env = common.stack_env(stack, worker_env(config))
    return subprocess.run(cmd, cwd=common.REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def run_worker(stack: str, job: common.Job, work_dir: Path, timeout: float) -> dict:
    """Run one stack's worker process; its result dict, or {"error": ...} when it failed."""
    tag = f"{stack}-{job.method}"
    job_path, result_path = work_dir / f"{tag}.job.json", work_dir / f"{tag}.result.json"
    job_path.write_text(job.to_json())
    result_path.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", WORKERS[stack], str(job_path), str(result_path)]
    try:
        proc = worker_process(stack, job.config, cmd, timeout)
    except subprocess.TimeoutExpired:
        return {"stack": stack, "method": job.method, "error": f"timed out after {timeout:.0f} s"}
    if proc.returncode != 0 or not result_path.exists():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-6:]
        return {"stack": stack, "method": job.method, "error": " | ".join(tail) or f"exit {proc.returncode}"}
    return json.loads(result_path.read_text())


def measure_peak(config: common.BenchConfig, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "bench.peak", config.dtype]
    proc = subprocess.run(
        cmd, cwd=common.REPO_ROOT, env=worker_env(config), capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0:
        return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def skip_reason(stack: str, method: str, config: common.BenchConfig) -> str | None:
    if stack == "pytorch" and method == "qlora" and config.device == "cpu":
        return "no PyTorch CPU baseline: bitsandbytes' 4-bit kernels need CUDA"
    return None


# ------------------------------------------------------------------ figures


def derive(result: dict, config: common.BenchConfig, method: str, peak: dict | None) -> dict:
    """Add start-up, tokens/s and MFU to a worker's result."""
    if "error" in result or "skipped" in result:
        return result
    out = dict(result)
    out["startup_s"] = result["import_s"] + result["load_s"] + result["compile_s"] + result["first_step_s"]
    out["tokens_per_s"] = config.tokens_per_step / result["step_median_s"]
    flops = common.train_flops_per_token(config, method) * out["tokens_per_s"]
    out["model_flops_per_s"] = flops
    if peak and "flops_per_s" in peak:
        out["mfu"] = flops / peak["flops_per_s"]
    return out


def best_round(results: list[dict]) -> dict:
    """The round with the fastest steady-state step (the least disturbed by other load on the
    machine), with every round's median step time kept beside it."""
    ok = [r for r in results if "step_median_s" in r]
    if not ok:
        return results[0]
    best = dict(min(ok, key=lambda r: r["step_median_s"]))
    best["rounds_step_median_s"] = [r["step_median_s"] for r in ok]
    return best


def ratios(torch_r: dict, ftc_r: dict) -> dict:
    keys = ("startup_s", "compile_s", "step_median_s", "tokens_per_s", "peak_rss_bytes", "peak_device_bytes")
    out = {}
    for k in keys:
        a, b = torch_r.get(k), ftc_r.get(k)
        if a and b is not None:
            out[k] = b / a
    return out


def loss_check(torch_r: dict, ftc_r: dict, dtype: str) -> dict:
    a, b = torch_r["losses"][0], ftc_r["losses"][0]
    tol = LOSS_TOLERANCE[dtype]
    return {"pytorch": a, "ftc": b, "abs_diff": abs(a - b), "tolerance": tol, "agree": abs(a - b) <= tol}


def machine_info() -> dict:
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu or platform.processor(),
        "cores": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "load_avg_start": list(os.getloadavg()),
    }


# ------------------------------------------------------------------ main


def run(
    config: common.BenchConfig,
    methods: list[str],
    steps: int,
    warmup: int,
    *,
    stacks=STACKS,
    threads: int | None = None,
    remat: str = "none",
    peak: bool = True,
    rounds: int = 1,
    plan: bool = True,
    timeout: float = 1800.0,
    deadline: float | None = None,
    progress=None,
) -> dict:
    """The side-by-side report. `deadline` (time.monotonic()): workers that would start after it
    are skipped, and each one's timeout is cut to what is left; `progress(report)` is called after
    every worker (e.g. to save a partial report); `plan`: also run `ftc plan --compile` on a spec
    of each ftc job and put its predicted memory beside the measured (bench/plan_memory.py)."""
    threads = threads or len(os.sched_getaffinity(0))
    report: dict = {
        "config": dataclasses.asdict(config),
        "steps": steps,
        "warmup": warmup,
        "rounds": rounds,
        "threads": threads,
        "remat": remat,
        "machine": machine_info(),
        "methods": {},
        "versions": {},
    }
    with tempfile.TemporaryDirectory(prefix="ftc-bench-") as tmp:
        work = Path(tmp)
        model_dir, tokens_path = work / "model", work / "tokens.npy"
        save_random_model(config, model_dir)
        make_tokens(config, steps, tokens_path)
        report["params"] = common.total_params(config)
        report["peak"] = measure_peak(config, timeout) if peak else {}
        if "device" in report["peak"] and config.device == "gpu":
            report["machine"]["device"] = report["peak"]["device"]
        runs: dict = {(m, s): [] for m in methods for s in stacks}
        predicted: dict = {}
        for r in range(rounds):
            # Alternate which stack goes first, so a drift in machine load favours neither.
            order = list(stacks) if r % 2 == 0 else list(reversed(stacks))
            for method in methods:
                for stack in order:
                    reason = skip_reason(stack, method, config)
                    if reason:
                        runs[method, stack] = [{"stack": stack, "method": method, "skipped": reason}]
                        continue
                    left = timeout if deadline is None else min(timeout, deadline - time.monotonic())
                    if left < MIN_WORKER_S:
                        result = {"stack": stack, "method": method, "skipped": "skipped: out of time budget"}
                    else:
                        try:
                            job = common.Job(
                                config, method, str(model_dir), str(tokens_path), steps, warmup, threads, remat
                            )
                            result = derive(run_worker(stack, job, work, left), config, method, report["peak"])
                            if plan and stack == "ftc" and "error" not in result:
                                if method not in predicted:
                                    predicted[method] = plan_memory.predict(job, work, worker_env(config), left)
                                result["predicted_memory"] = predicted[method]
                                result["memory_check"] = plan_memory.compare(predicted[method], result)
                        except Exception as e:  # one bad row, not the end of the report
                            result = {"stack": stack, "method": method, "error": f"{type(e).__name__}: {e}"}
                    report["versions"].update(result.get("versions", {}))
                    runs[method, stack].append(result)
                    _summarise(report, runs, methods, stacks, config)
                    if progress:
                        progress(report)
    report["machine"]["load_avg_end"] = list(os.getloadavg())
    return report


# A worker given less than this would spend it importing and loading: skip it instead.
MIN_WORKER_S = 20.0


def _summarise(report: dict, runs: dict, methods: list[str], stacks, config: common.BenchConfig) -> None:
    for method in methods:
        entry: dict = {}
        for stack in stacks:
            if runs[method, stack]:
                entry[stack] = best_round(runs[method, stack])
        both = [entry.get(s, {}) for s in STACKS]
        if all("losses" in r for r in both):
            entry["loss_check"] = loss_check(both[0], both[1], config.dtype)
            entry["ratio"] = ratios(both[0], both[1])
        report["methods"][method] = entry


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", choices=sorted(common.CONFIGS), default="cpu")
    p.add_argument("--method", choices=[*common.METHODS, "all"], default="all")
    p.add_argument("--steps", type=int, default=None, help="steps per stack (default: the config's)")
    p.add_argument("--warmup", type=int, default=None, help="steps left out of the median (default: the config's)")
    p.add_argument("--stack", choices=[*STACKS, "both"], default="both")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: all cores)")
    p.add_argument(
        "--remat",
        choices=["none", "full"],
        default="none",
        help="activation checkpointing on both sides (ftc remat=full, HF gradient checkpointing)",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run each stack this many times, alternating which goes first; report the round with "
        "the fastest median step (for a machine shared with other work)",
    )
    p.add_argument("--no-peak", action="store_true", help="skip measuring the matmul peak (no MFU column)")
    p.add_argument(
        "--no-plan", action="store_true", help="skip `ftc plan --compile`'s predicted memory beside the measured"
    )
    p.add_argument("--json", dest="json_out", default=None, help="also write the full report here")
    args = p.parse_args(argv)

    config = common.CONFIGS[args.config]
    methods = list(common.METHODS) if args.method == "all" else [args.method]
    steps = args.steps or config.steps
    warmup = min(args.warmup if args.warmup is not None else config.warmup, steps - 1)
    if steps < 2:
        p.error("--steps must be at least 2 (one warm-up step, one timed)")
    stacks = STACKS if args.stack == "both" else (args.stack,)
    report = run(
        config,
        methods,
        steps,
        warmup,
        stacks=stacks,
        threads=args.threads,
        remat=args.remat,
        peak=not args.no_peak,
        plan=not args.no_plan,
        rounds=args.rounds,
    )
    print(format_table(report))
    if args.json_out:
        common.write_json(args.json_out, report)
    failed = [
        f"{m}/{s}" for m, e in report["methods"].items() for s, r in e.items() if isinstance(r, dict) and "error" in r
    ]
    disagree = [m for m, e in report["methods"].items() if "loss_check" in e and not e["loss_check"]["agree"]]
    for m in disagree:
        print(f"first-step losses disagree for {m}: {report['methods'][m]['loss_check']}", file=sys.stderr)
    return 1 if failed or disagree else 0


if __name__ == "__main__":
    sys.exit(main())
