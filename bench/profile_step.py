"""Where a training step's time goes, in ftc and in the PyTorch stack, on the benchmark's work.

    python -m bench.profile_step --config cpu --method full            # both stacks
    python -m bench.profile_step --config cpu --stack ftc --top 25

ftc: the AOT-compiled train step runs under `jax.profiler` (a Perfetto trace); every leaf op in
the trace is an XLA instruction of the compiled program, whose `op_name` metadata says which
part of the model it came from (self_attn, mlp, lm_head, the loss, the optimizer). Time is
summed by that scope and by the kind of op (matmul, copy/transpose, broadcast, reduction, ...).
PyTorch: `torch.profiler` over the same steps, self time per aten op, grouped into the same kinds.
Also reported for both: CPU seconds per wall second in the steady state (how many cores the
step keeps busy).
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common  # noqa: E402

# ------------------------------------------------------------------ classification

# First match wins; tested against XLA op_name metadata (jax name stacks).
FTC_SCOPES = (
    ("attention: q/k/v/o projections", r"self_attn/[qkvo]_proj/"),
    ("attention: scores, mask, softmax, values", r"self_attn|dot_product_attention|attention_mask"),
    ("mlp: gate/up/down projections", r"mlp/(gate|up|down)_proj/"),
    ("mlp: activation", r"mlp"),
    ("norms", r"layernorm|/norm/"),
    ("rope", r"rope|rotary|/sin|/cos"),
    ("lm head", r"lm_head"),
    ("embedding (gather, scatter-add grad)", r"embed_tokens|Embedding|/take|gather|scatter"),
    ("loss, accuracy (outside the model)", r"jvp\(\)|softmax_cross_entropy|argmax|log_softmax|transpose\(jvp\(\)\)"),
    ("layer scan bookkeeping (slices, stacking)", r"Decoder.*/while/|dynamic_slice|dynamic_update_slice"),
    # The micro-batch scan's own body: buffers it fills (saved activations), gradient sums.
    ("micro-batch scan: buffer fills, grad accumulation", r"^jit\(train_step\)/while/"),
    ("optimizer, clipping", r"^jit\(train_step\)"),
)

KINDS = (
    ("matmul", r"^(ynn_fusion|dot|convolution|custom-call|__onednn|onednn|cublas|gemm|.*gemm.*|.*cutlass.*)"),
    ("copy / transpose", r"copy|transpose"),
    ("reduction", r"reduce"),
    ("fill / broadcast", r"broadcast|iota"),
    ("scatter / gather", r"scatter|gather"),
    ("dynamic slice / update", r"dynamic"),
    ("loop control", r"^(while|conditional|call)"),
    ("elementwise fusion", r"fusion"),
)

TORCH_KINDS = (
    ("matmul", r"aten::(mm|addmm|bmm|matmul|linear|_mm|baddbmm)$"),
    ("attention kernel (SDPA)", r"scaled_dot_product|flash|efficient_attention"),
    ("loss (log-softmax, nll)", r"log_softmax|nll_loss|cross_entropy"),
    ("optimizer", r"adam|_foreach|fused"),
    ("embedding", r"embedding"),
    ("copy / transpose", r"copy|clone|contiguous|transpose|permute|reshape|view|_to_copy|\bt\b|aten::t$"),
    ("fill / zeros", r"zero|fill|empty|ones"),
    ("reduction", r"sum|mean|norm|max|min"),
    ("elementwise", r"aten::"),
)


def classify(name: str, rules) -> str:
    for label, pattern in rules:
        if re.search(pattern, name):
            return label
    return "other"


def hlo_op_names(hlo_text: str) -> dict[str, str]:
    """XLA instruction name -> its op_name metadata (the jax name stack)."""
    out = {}
    for m in re.finditer(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*?op_name=\"([^\"]*)\"", hlo_text, re.M):
        out[m.group(1)] = m.group(2)
    return out


# ------------------------------------------------------------------ workers


def profile_ftc(job: common.Job, trace_steps: int) -> dict:
    import jax

    from bench import ftc_worker

    p = ftc_worker.build(job)
    state = p.state
    p.state = None
    for i in range(2):
        state, m = p.compiled(state, p.put_batch(i))
        float(m["loss"])
    cpu0, t0 = common.cpu_seconds(), time.perf_counter()
    for i in range(trace_steps):
        state, m = p.compiled(state, p.put_batch(i))
        float(m["loss"])
    wall = (time.perf_counter() - t0) / trace_steps
    cpu_util = (common.cpu_seconds() - cpu0) / (wall * trace_steps)

    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
        for i in range(trace_steps):
            state, m = p.compiled(state, p.put_batch(i))
            float(m["loss"])
        jax.profiler.stop_trace()
        path = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)[0]
        with gzip.open(path) as f:
            trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    op_names = hlo_op_names(p.compiled.as_text())
    by_scope, by_kind, by_op = collections.Counter(), collections.Counter(), collections.Counter()
    for e in events:
        name = e.get("name", "")
        if e.get("ph") != "X" or name not in op_names:
            continue
        ms = e["dur"] / 1e3 / trace_steps
        scope = classify(op_names[name], FTC_SCOPES)
        by_scope[scope] += ms
        by_kind[classify(name, KINDS)] += ms
        by_op[f"{name}  [{op_names[name].split('/', 1)[-1][-70:]}]"] += ms
    return {
        "stack": "ftc",
        "step_ms": wall * 1e3,
        "cpu_util": cpu_util,
        "by_scope": dict(by_scope),
        "by_kind": dict(by_kind),
        "top_ops": by_op.most_common(60),
    }


def profile_torch(job: common.Job, trace_steps: int) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from bench import torch_worker

    p = torch_worker.build(job)
    for i in range(2):
        p.step(i)
    cpu0, t0 = common.cpu_seconds(), time.perf_counter()
    for i in range(trace_steps):
        p.step(i)
    wall = (time.perf_counter() - t0) / trace_steps
    cpu_util = (common.cpu_seconds() - cpu0) / (wall * trace_steps)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if p.cuda else [])
    with profile(activities=activities) as prof:
        for i in range(trace_steps):
            p.step(i)
    by_kind, by_op = collections.Counter(), collections.Counter()
    for avg in prof.key_averages():
        ms = avg.self_cpu_time_total / 1e3 / trace_steps
        if p.cuda:
            ms = getattr(avg, "self_device_time_total", 0) / 1e3 / trace_steps
        if ms <= 0:
            continue
        by_kind[classify(avg.key, TORCH_KINDS)] += ms
        by_op[avg.key] += ms
    del torch
    return {
        "stack": "pytorch",
        "step_ms": wall * 1e3,
        "cpu_util": cpu_util,
        "by_kind": dict(by_kind),
        "top_ops": by_op.most_common(60),
    }


# ------------------------------------------------------------------ report


def _table(title: str, counts: dict, total_ms: float, limit: int | None = None) -> list[str]:
    items = sorted(counts.items(), key=lambda kv: -kv[1])[:limit]
    summed = sum(counts.values())
    lines = [f"{title} (sum of op times {summed:.0f} ms/step; step wall time {total_ms:.0f} ms)"]
    for name, ms in items:
        lines.append(f"  {ms:9.1f} ms  {100 * ms / max(summed, 1e-9):5.1f}%  {name}")
    return lines


def format_report(results: list[dict], top: int) -> str:
    lines = []
    for r in results:
        lines.append(f"== {r['stack']}: step {r['step_ms']:.0f} ms, {r['cpu_util']:.2f} CPU-seconds per second")
        if "by_scope" in r:
            lines += _table("by model part", r["by_scope"], r["step_ms"])
        lines += _table("by kind of op", r["by_kind"], r["step_ms"])
        lines += _table(f"top {top} ops", dict(r["top_ops"]), r["step_ms"], top)
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", choices=sorted(common.CONFIGS), default="cpu")
    p.add_argument("--method", choices=common.METHODS, default="full")
    p.add_argument("--stack", choices=["ftc", "pytorch", "both"], default="both")
    p.add_argument("--steps", type=int, default=3, help="steps traced (after 2 warm-up steps)")
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--json", dest="json_out", default=None)
    p.add_argument("--worker", nargs=3, metavar=("STACK", "JOB", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        stack, job_path, out_path = args.worker
        job = common.Job.from_json(Path(job_path).read_text())
        result = (profile_ftc if stack == "ftc" else profile_torch)(job, args.steps)
        common.write_json(out_path, result)
        return 0

    from bench import train_speed

    config = common.CONFIGS[args.config]
    stacks = ["pytorch", "ftc"] if args.stack == "both" else [args.stack]
    results = []
    with tempfile.TemporaryDirectory(prefix="ftc-profile-") as tmp:
        work = Path(tmp)
        train_speed.save_random_model(config, work / "model")
        train_speed.make_tokens(config, args.steps + 2, work / "tokens.npy")
        threads = len(os.sched_getaffinity(0))
        for stack in stacks:
            job = common.Job(
                config, args.method, str(work / "model"), str(work / "tokens.npy"), args.steps + 2, 2, threads
            )
            (work / "job.json").write_text(job.to_json())
            out = work / f"{stack}.json"
            cmd = [
                sys.executable,
                "-m",
                "bench.profile_step",
                "--steps",
                str(args.steps),
                "--worker",
                stack,
                str(work / "job.json"),
                str(out),
            ]
            proc = train_speed.worker_process(stack, config, cmd)
            if proc.returncode != 0:
                print(f"{stack} profile failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
                return 1
            results.append(json.loads(out.read_text()))
    print(f"load average {os.getloadavg()[0]:.2f}; {config.description}, method {args.method}")
    print(format_report(results, args.top))
    if args.json_out:
        common.write_json(args.json_out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
