"""The GPU check: everything bench/ wants to know from a lent GPU, in one call of a few minutes.

    bash bench/gpu_check.sh                      # on the GPU machine, from the repo root
    bash bench/gpu_check.sh --dry-run            # the same code path on CPU with tiny shapes
    python -m bench.gpu_check --only env,attention --budget 120

Items, in order; each runs in its own process under its own time limit, cut to what the total
budget has left, and a failed or skipped item is one row saying why, never the end of the check:

  env        python, jax / torch / transformers / peft / bitsandbytes versions, devices, nvidia-smi
  attention  bench.gpu_attention: cuDNN against the blockwise and XLA kernels (values, gradients,
             time) on Llama-3.2-1B's heads at sequence 2048, bf16
  train      bench.train_speed's side-by-side on `--config gpu-1b` (1.24B Llama, batch 4 x 2048,
             bf16 compute): full, LoRA and QLoRA, ftc then PyTorch (+ PEFT; QLoRA's PyTorch row
             needs bitsandbytes), with the measured bf16 matmul peak for MFU
  xla-attn   ftc's full fine-tune again with FTC_ATTENTION=xla, if time is left: what cuDNN buys

Writes $OUT/gpu_check.json after every item (a check cut short keeps what finished) and, at the
end, prints one table and writes it to $OUT/gpu_check.txt. Exit status 0 when every item ran
(skips for want of a GPU library excepted), else 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common, train_speed  # noqa: E402

ITEMS = ("env", "attention", "train", "xla-attn")
DEFAULT_BUDGET_S = 420.0  # the device call is ~8 minutes; leave room for start-up and copying back
STEPS, WARMUP = 12, 4  # gpu-1b: 8 timed steps after 4 (the first with its compile)
WORKER_TIMEOUT_S = 180.0

ENV_PROBE = r"""
import importlib.metadata as md, json, os, platform, subprocess, sys
out = {"python": platform.python_version(), "executable": sys.executable, "packages": {}}
for name in ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "flax", "optax", "orbax-checkpoint",
             "transformers", "torch", "peft", "bitsandbytes", "safetensors", "numpy", "nvidia-cudnn-cu13",
             "nvidia-cudnn-cu12"):
    try:
        out["packages"][name] = md.version(name)
    except md.PackageNotFoundError:
        pass
try:
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm",
                          "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
    out["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
except (OSError, subprocess.TimeoutExpired) as e:
    out["nvidia_smi"] = f"unavailable: {e}"
import jax
out["jax_devices"] = [f"{d.platform}:{getattr(d, 'device_kind', d)}" for d in jax.devices()]
out["jax_backend"] = jax.default_backend()
try:
    from jax._src.cudnn.fused_attention_stablehlo import check_cudnn_version
    out["cudnn_version"] = check_cudnn_version()
except Exception as e:
    out["cudnn_version"] = f"unavailable: {type(e).__name__}: {e}"
try:
    import torch
    out["torch_cuda"] = torch.version.cuda
    out["torch_device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA"
except Exception as e:
    out["torch_device"] = f"unavailable: {e}"
print(json.dumps(out))
"""


@dataclasses.dataclass
class Check:
    out_dir: Path
    deadline: float
    dry_run: bool
    report: dict = dataclasses.field(default_factory=dict)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def save(self) -> None:
        common.write_json(self.out_dir / "gpu_check.json", self.report)

    def item(self, name: str, result: dict, started: float) -> None:
        result["wall_s"] = round(time.monotonic() - started, 1)
        self.report["items"][name] = result
        self.save()


def _env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(common.REPO_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    )
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # The probes share the GPU with nothing, but must not keep it from the next process.
    env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    return {**env, **(extra or {})}


def _run(cmd: list[str], timeout: float, extra_env: dict | None = None) -> tuple[int | None, str, str]:
    try:
        proc = subprocess.run(cmd, cwd=common.REPO_ROOT, env=_env(extra_env), capture_output=True, text=True,
                              timeout=timeout)  # fmt: skip
        return proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as e:
        text = lambda b: b.decode(errors="replace") if isinstance(b, bytes) else (b or "")
        return None, text(e.stdout), text(e.stderr) + f"\ntimed out after {timeout:.0f} s"


def _tail(text: str, n: int = 3) -> str:
    return " | ".join(line for line in text.strip().splitlines()[-n:] if line.strip())[:400]


def run_env(check: Check) -> None:
    started = time.monotonic()
    code, out, err = _run([sys.executable, "-c", ENV_PROBE], min(60.0, check.left()))
    if code == 0:
        result = json.loads(out.strip().splitlines()[-1])
    else:
        result = {"error": _tail(err or out)}
    check.item("env", result, started)


def run_attention(check: Check) -> None:
    started = time.monotonic()
    path = check.out_dir / "attention.json"
    cmd = [sys.executable, "-m", "bench.gpu_attention", "--json", str(path)] + (["--dry-run"] if check.dry_run else [])
    code, out, err = _run(cmd, min(150.0, check.left()))
    result = json.loads(path.read_text()) if path.exists() else {}
    result["table"] = out.strip()
    if code not in (0, 1) or not path.exists():
        result["error"] = _tail(err or out)
    elif code == 1:
        result["error"] = "a kernel disagreed with the reference (see the table)"
    check.item("attention", result, started)


def run_train(check: Check, methods: list[str]) -> None:
    started = time.monotonic()
    config = common.CONFIGS["smoke" if check.dry_run else "gpu-1b"]
    steps, warmup = (3, 1) if check.dry_run else (STEPS, WARMUP)
    # Keep time for the table and the later items' reason rows.
    deadline = check.deadline - 10.0
    check.report["items"]["train"] = {"running": True}

    def progress(report: dict) -> None:
        check.report["items"]["train"] = report
        check.save()

    try:
        report = train_speed.run(
            config, methods, steps, warmup, timeout=WORKER_TIMEOUT_S, deadline=deadline, progress=progress,
            peak=True, plan=False,
        )  # fmt: skip
    except Exception as e:  # e.g. building the random model failed: the row says so, the check goes on
        report = {"error": f"{type(e).__name__}: {e}"[:400]}
    check.item("train", report, started)


def run_xla_attention(check: Check) -> None:
    """ftc's full fine-tune with the XLA attention path: the same work, cuDNN's kernel swapped out."""
    started = time.monotonic()
    config = common.CONFIGS["smoke" if check.dry_run else "gpu-1b"]
    steps, warmup = (3, 1) if check.dry_run else (STEPS, WARMUP)
    if check.left() < 90 and not check.dry_run:
        check.item("xla-attn", {"skipped": "skipped: out of time budget"}, started)
        return
    os.environ["FTC_ATTENTION"] = "xla"
    try:
        report = train_speed.run(
            config, ["full"], steps, warmup, stacks=("ftc",), timeout=WORKER_TIMEOUT_S,
            deadline=check.deadline - 10.0, peak=False, plan=False,
        )  # fmt: skip
    except Exception as e:
        report = {"error": f"{type(e).__name__}: {e}"[:400]}
    finally:
        os.environ.pop("FTC_ATTENTION", None)
    check.item("xla-attn", report, started)


# ------------------------------------------------------------------ the table


def _mfu_line(train: dict) -> list[str]:
    from ftc.compiler import flops as flops_lib

    lines = []
    device = (train.get("peak") or {}).get("device", "")
    sheet = flops_lib.datasheet_peak_flops(device, "bfloat16")
    full = train.get("methods", {}).get("full", {}).get("ftc", {})
    if "model_flops_per_s" in full:
        parts = [f"full fine-tune: ftc {full['model_flops_per_s'] / 1e12:.0f} model TFLOP/s"]
        if "mfu" in full:
            parts.append(f"MFU {100 * full['mfu']:.1f}% of the measured {train['peak'].get('dtype')} matmul peak")
        if sheet:
            parts.append(
                f"{100 * full['model_flops_per_s'] / sheet:.1f}% of the {device} data sheet ({sheet / 1e12:.0f})"
            )
        lines.append("; ".join(parts) + " (goal: 50%)")
    lora = train.get("methods", {}).get("lora", {}).get("ratio", {})
    if "tokens_per_s" in lora:
        lines.append(f"LoRA tokens/s ftc/PEFT: {lora['tokens_per_s']:.2f}x (goal: 1.5x)")
    return lines


def format_report(report: dict) -> str:
    items = report["items"]
    lines = [f"ftc GPU check, {report['date']}{' (dry run, CPU)' if report['dry_run'] else ''}"]
    env = items.get("env", {})
    if "error" in env:
        lines.append(f"env: failed: {env['error']}")
    elif env:
        pk = env.get("packages", {})
        lines.append(
            f"env: {', '.join(env.get('jax_devices', []))}; nvidia-smi: {env.get('nvidia_smi', '-')}; cuDNN "
            f"{env.get('cudnn_version')}; python {env.get('python')}; "
            + ", ".join(f"{k} {v}" for k, v in sorted(pk.items()))
        )
    att = items.get("attention")
    if att:
        lines += ["", att.get("table") or "attention: no table"]
        if att.get("error"):
            lines.append(f"attention: {att['error']}")
    for name in ("train", "xla-attn"):
        tr = items.get(name)
        if not tr:
            continue
        lines.append("")
        if name == "xla-attn":
            lines.append("ftc full fine-tune with FTC_ATTENTION=xla (the XLA attention path instead of cuDNN):")
        if "error" in tr or "skipped" in tr:
            lines.append(f"{name}: {tr.get('skipped') or 'failed: ' + tr['error']}")
        elif "methods" in tr:
            lines.append(train_speed.format_table(tr))
            if name == "train":
                lines += _mfu_line(tr)
    lines.append("")
    lines.append(f"total {report.get('wall_s', 0):.0f} s; results: {report.get('out_dir')}/gpu_check.json")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes: the same code path, in seconds")
    p.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S, help="seconds for the whole check")
    p.add_argument("--only", default=",".join(ITEMS), help=f"comma-separated items of {', '.join(ITEMS)}")
    p.add_argument("--methods", default=",".join(common.METHODS), help="training methods (train item)")
    p.add_argument("--out", default=os.environ.get("OUT") or "gpu_check_out", help="results folder (default $OUT)")
    args = p.parse_args(argv)
    only = [x for x in args.only.split(",") if x]
    unknown = sorted(set(only) - set(ITEMS))
    if unknown:
        p.error(f"unknown items {unknown}; choose from {', '.join(ITEMS)}")
    out_dir = Path(args.out).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    check = Check(out_dir, t0 + args.budget, args.dry_run)
    check.report = {
        "date": train_speed.machine_info()["date"],
        "dry_run": args.dry_run,
        "budget_s": args.budget,
        "out_dir": str(out_dir),
        "items": {},
    }
    check.save()
    steps = {
        "env": lambda: run_env(check),
        "attention": lambda: run_attention(check),
        "train": lambda: run_train(check, [m for m in args.methods.split(",") if m]),
        "xla-attn": lambda: run_xla_attention(check),
    }
    for name in ITEMS:
        if name not in only:
            continue
        if check.left() < 15:
            check.item(name, {"skipped": "skipped: out of time budget"}, time.monotonic())
            continue
        print(f"[gpu_check] {name} ({check.left():.0f} s of the budget left)", flush=True)
        try:
            steps[name]()
        except Exception as e:  # the check itself must survive any one item
            check.item(name, {"error": f"{type(e).__name__}: {e}"[:400]}, time.monotonic())
    check.report["wall_s"] = time.monotonic() - t0
    check.save()
    table = format_report(check.report)
    (out_dir / "gpu_check.txt").write_text(table + "\n")
    print(table, flush=True)
    failed = [n for n, r in check.report["items"].items() if "error" in r or _train_failed(r)]
    return 1 if failed else 0


def _train_failed(result: dict) -> bool:
    return any(
        "error" in r
        for entry in result.get("methods", {}).values()
        for r in entry.values()
        if isinstance(r, dict) and "bitsandbytes" not in str(r.get("error", ""))
    )


if __name__ == "__main__":
    sys.exit(main())
