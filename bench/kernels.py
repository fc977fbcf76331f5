"""The kernels of a training step, one at a time: each weight matmul (ftc's `layers.linear`,
XLA:CPU's dots, against `torch.nn.functional.linear`, oneDNN / MKL GEMMs) and the attention core
(ftc's `dot_product_attention`, against `F.scaled_dot_product_attention`), forward + backward, on
the benchmark config's shapes, in one invocation.

    python -m bench.kernels --config cpu

Every projection (q, k, v, o, gate, up, down, the LM head) is timed alone: its forward dot and
the two backward dots (input and weight gradients), tokens = batch x sequence; attention is
causal with the config's heads (GQA). float32, each stack in its own process with all cores.
Summed with each kernel's count (x layers), this is what a step would cost if nothing ran
between the kernels: what is left of a stack's step time is its program around them (layouts,
fusions, loops, the loss, the optimizer) and how well it keeps the cores busy.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common  # noqa: E402


def projections(c: common.BenchConfig) -> list[tuple[str, int, int, int]]:
    """(name, in, out, count per step) of every weight matmul of the Llama config."""
    kv = c.kv_heads * (c.hidden // c.heads)
    per_layer = [
        ("q_proj", c.hidden, c.hidden),
        ("k_proj", c.hidden, kv),
        ("v_proj", c.hidden, kv),
        ("o_proj", c.hidden, c.hidden),
        ("gate_proj", c.hidden, c.intermediate),
        ("up_proj", c.hidden, c.intermediate),
        ("down_proj", c.intermediate, c.hidden),
    ]
    return [(n, i, o, c.layers) for n, i, o in per_layer] + [("lm_head", c.hidden, c.vocab, 1)]


def attention_shape(c: common.BenchConfig) -> tuple[int, int, int, int, int]:
    """(batch, sequence, query heads, key/value heads, head dim)."""
    return c.batch, c.seq_len, c.heads, c.kv_heads, c.hidden // c.heads


def _median_s(f, *args, repeats: int) -> float:
    f(*args)
    f(*args)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(*args)
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def time_ftc(tokens: int, shapes: list, repeats: int) -> dict:
    import jax
    import jax.numpy as jnp

    from ftc.backends.jax.models import layers

    fwd_jit = jax.jit(lambda x, w: layers.linear(x, w, 1))

    def forward_backward(x, w, g):  # the output too: else XLA drops the forward dot as dead code
        y, vjp = jax.vjp(lambda x, w: layers.linear(x, w, 1), x, w)
        return y, vjp(g)

    fwd_bwd_jit = jax.jit(forward_backward)
    fwd = lambda x, w: jax.block_until_ready(fwd_jit(x, w))  # noqa: E731
    fwd_bwd = lambda x, w, g: jax.block_until_ready(fwd_bwd_jit(x, w, g))  # noqa: E731
    out = {}
    for name, n_in, n_out, _ in shapes:
        kx, kw, kg = jax.random.split(jax.random.PRNGKey(0), 3)
        x = jax.random.normal(kx, (tokens, n_in), jnp.float32)
        w = jax.random.normal(kw, (n_in, n_out), jnp.float32) * 0.02
        g = jax.random.normal(kg, (tokens, n_out), jnp.float32)
        out[name] = {
            "forward_s": _median_s(fwd, x, w, repeats=repeats),
            "forward_backward_s": _median_s(fwd_bwd, x, w, g, repeats=repeats),
        }
    return out


def time_ftc_attention(shape, repeats: int) -> dict:
    import jax
    import jax.numpy as jnp

    from ftc.backends.jax.models import layers

    B, T, N, K, H = shape
    kq, kk, kv, kg = jax.random.split(jax.random.PRNGKey(0), 4)
    q, g = jax.random.normal(kq, (B, T, N, H)), jax.random.normal(kg, (B, T, N, H))
    k, v = jax.random.normal(kk, (B, T, K, H)), jax.random.normal(kv, (B, T, K, H))
    mask = layers.make_attention_mask(segment_ids=jnp.ones((B, T), jnp.int32), causal=True, q_len=T, kv_len=T)
    attend = lambda q, k, v: layers.dot_product_attention(q, k, v, mask)  # noqa: E731

    def forward_backward(q, k, v, g):
        y, vjp = jax.vjp(attend, q, k, v)
        return y, vjp(g)

    fwd_jit, fwd_bwd_jit = jax.jit(attend), jax.jit(forward_backward)
    return {
        "forward_s": _median_s(lambda *a: jax.block_until_ready(fwd_jit(*a)), q, k, v, repeats=repeats),
        "forward_backward_s": _median_s(lambda *a: jax.block_until_ready(fwd_bwd_jit(*a)), q, k, v, g, repeats=repeats),
    }


def time_torch_attention(shape, repeats: int) -> dict:
    import torch
    import torch.nn.functional as F

    B, T, N, K, H = shape
    torch.manual_seed(0)
    q, g = torch.randn(B, N, T, H, requires_grad=True), torch.randn(B, N, T, H)
    k, v = torch.randn(B, K, T, H, requires_grad=True), torch.randn(B, K, T, H, requires_grad=True)

    def forward(q, k, v):
        with torch.no_grad():
            F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    def forward_backward(q, k, v, g):
        q.grad = k.grad = v.grad = None
        F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).backward(g)

    return {
        "forward_s": _median_s(forward, q, k, v, repeats=repeats),
        "forward_backward_s": _median_s(forward_backward, q, k, v, g, repeats=repeats),
    }


def _torch_forward(x, w):
    import torch

    with torch.no_grad():
        torch.nn.functional.linear(x, w)


def _torch_forward_backward(x, w, g):
    import torch

    x.grad = w.grad = None
    torch.nn.functional.linear(x, w).backward(g)


def time_torch(tokens: int, shapes: list, repeats: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    out = {}
    for name, n_in, n_out, _ in shapes:
        torch.manual_seed(0)
        x = torch.randn(tokens, n_in, requires_grad=True)
        w = (torch.randn(n_out, n_in) * 0.02).requires_grad_(True)  # nn.Linear's [out, in]
        g = torch.randn(tokens, n_out)

        out[name] = {
            "forward_s": _median_s(_torch_forward, x, w, repeats=repeats),
            "forward_backward_s": _median_s(_torch_forward_backward, x, w, g, repeats=repeats),
        }
    return out


def summarise(config: common.BenchConfig, shapes: list, results: dict) -> dict:
    rows, matmuls = [], {s: 0.0 for s in results}
    for name, n_in, n_out, count in shapes:
        row = {"name": name, "shape": f"{n_in}x{n_out}", "count": count}
        for stack, r in results.items():
            row[stack] = r[name]
            matmuls[stack] += count * r[name]["forward_backward_s"]
        rows.append(row)
    B, T, N, K, H = attention_shape(config)
    row = {"name": "attention", "shape": f"{B}x{T}, {N}/{K}x{H}", "count": config.layers}
    row.update({stack: r["attention"] for stack, r in results.items()})
    rows.append(row)
    totals = {s: matmuls[s] + config.layers * results[s]["attention"]["forward_backward_s"] for s in results}
    tokens = config.batch * config.seq_len
    flops = sum(6 * tokens * i * o * n for _, i, o, n in shapes)
    return {"tokens": tokens, "flops": flops, "rows": rows, "matmul_total_s": matmuls, "step_total_s": totals}


def format_table(report: dict) -> str:
    stacks = list(report["step_total_s"])
    head = ["kernel", "shape", "x"] + [f"{s} fwd+bwd ms" for s in stacks]
    if len(stacks) == 2:
        head.append(f"{stacks[1]}/{stacks[0]}")
    lines = ["  ".join(f"{h:>16}" for h in head)]
    for r in report["rows"]:
        cells = [r["name"], r["shape"], str(r["count"])]
        cells += [f"{r[s]['forward_backward_s'] * 1e3:.2f}" for s in stacks]
        if len(stacks) == 2:
            cells.append(f"{r[stacks[1]]['forward_backward_s'] / r[stacks[0]]['forward_backward_s']:.2f}x")
        lines.append("  ".join(f"{c:>16}" for c in cells))
    for label, key in (("matmuls' sum", "matmul_total_s"), ("a step's sum", "step_total_s")):
        totals = report[key]
        cells = [label, "", ""] + [f"{totals[s] * 1e3:.1f}" for s in stacks]
        if len(stacks) == 2:
            cells.append(f"{totals[stacks[1]] / totals[stacks[0]]:.2f}x")
        lines.append("  ".join(f"{c:>16}" for c in cells))
    for s in stacks:
        gflops = report["flops"] / report["matmul_total_s"][s] / 1e9
        lines.append(f"{s}: {gflops:.0f} GFLOP/s over the step's weight matmuls")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", choices=sorted(common.CONFIGS), default="cpu")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--json", dest="json_out", default=None)
    p.add_argument("--worker", nargs=2, metavar=("STACK", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    config = common.CONFIGS[args.config]
    shapes = projections(config)
    tokens = config.batch * config.seq_len
    attention = attention_shape(config)
    threads = len(os.sched_getaffinity(0))

    if args.worker:
        stack, out = args.worker
        if stack == "ftc":
            timed = {**time_ftc(tokens, shapes, args.repeats), "attention": time_ftc_attention(attention, args.repeats)}
        else:
            timed = time_torch(tokens, shapes, args.repeats, threads)
            timed["attention"] = time_torch_attention(attention, args.repeats)
        common.write_json(out, timed)
        return 0

    from bench import train_speed

    results = {}
    with tempfile.TemporaryDirectory(prefix="ftc-kernels-") as tmp:
        for stack in ("pytorch", "ftc"):
            out = Path(tmp) / f"{stack}.json"
            cmd = [sys.executable, "-m", "bench.kernels", "--config", args.config]
            cmd += ["--repeats", str(args.repeats), "--worker", stack, str(out)]
            proc = subprocess.run(
                cmd,
                cwd=common.REPO_ROOT,
                env=common.stack_env(stack, train_speed.worker_env(config)),
                capture_output=True,
                text=True,
            )
            if proc.returncode != 0:
                print(f"{stack} worker failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
                return 1
            results[stack] = json.loads(out.read_text())
    report = summarise(config, shapes, results)
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    report.update(config=config.name, load_average=os.getloadavg()[0], date=date)
    print(f"{config.description}; {tokens} tokens; load average {report['load_average']:.2f}; {report['date']}")
    print(format_table(report))
    if args.json_out:
        common.write_json(args.json_out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
