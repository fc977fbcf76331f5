"""The kernels of a training step, one at a time: each weight matmul (ftc's `layers.linear`,
XLA:CPU's dots, against `torch.nn.functional.linear`, oneDNN / MKL GEMMs) and the attention core
(ftc's `dot_product_attention`, against `F.scaled_dot_product_attention`), forward + backward, on
the benchmark config's shapes, in one invocation.

    python -m bench.kernels --config cpu
    python -m bench.kernels --config cpu --seq-len 1024 --block 256   # the same tokens as 2 x 1,024; tiles 256 wide

Every projection (q, k, v, o, gate, up, down, the LM head) is timed alone: its forward dot and
the two backward dots (input and weight gradients), tokens = batch x sequence; attention is
causal with the config's heads (GQA). float32, each stack in its own process with all cores.
Summed with each kernel's count (x layers), this is what a step would cost if nothing ran
between the kernels: what is left of a stack's step time is its program around them (layouts,
fusions, loops, the loss, the optimizer) and how well it keeps the cores busy.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
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


def _time_jax(f, args: tuple, cotangent, repeats: int) -> dict:
    """Forward, and forward + backward (vjp) of `f` on `args`, jitted, median seconds."""
    import jax

    def forward_backward(*a):  # the output too: else XLA drops the forward as dead code
        y, vjp = jax.vjp(f, *a[:-1])
        return y, vjp(a[-1])

    fwd, fwd_bwd = jax.jit(f), jax.jit(forward_backward)
    return {
        "forward_s": _median_s(lambda *a: jax.block_until_ready(fwd(*a)), *args, repeats=repeats),
        "forward_backward_s": _median_s(
            lambda *a: jax.block_until_ready(fwd_bwd(*a)), *args, cotangent, repeats=repeats
        ),
    }


def _time_torch(f, args: tuple, cotangent, repeats: int) -> dict:
    """Forward under no_grad, and forward + backward with autograd, median seconds."""
    import torch

    def forward(*a):
        with torch.no_grad():
            f(*a)

    def forward_backward(*a):
        for x in a[:-1]:
            x.grad = None
        f(*a[:-1]).backward(a[-1])

    return {
        "forward_s": _median_s(forward, *args, repeats=repeats),
        "forward_backward_s": _median_s(forward_backward, *args, cotangent, repeats=repeats),
    }


def time_ftc(tokens: int, shapes: list, attention: tuple, block: int | None, repeats: int) -> dict:
    import jax
    import jax.numpy as jnp

    from ftc.backends.jax.models import attention as attention_lib
    from ftc.backends.jax.models import layers

    out = {}
    for name, n_in, n_out, _ in shapes:
        kx, kw, kg = jax.random.split(jax.random.PRNGKey(0), 3)
        x = jax.random.normal(kx, (tokens, n_in), jnp.float32)
        w = jax.random.normal(kw, (n_in, n_out), jnp.float32) * 0.02
        g = jax.random.normal(kg, (tokens, n_out), jnp.float32)
        out[name] = _time_jax(lambda x, w: layers.linear(x, w, 1), (x, w), g, repeats)

    B, T, N, K, H = attention
    kq, kk, kv, kg = jax.random.split(jax.random.PRNGKey(0), 4)
    q, g = jax.random.normal(kq, (B, T, N, H)), jax.random.normal(kg, (B, T, N, H))
    k, v = jax.random.normal(kk, (B, T, K, H)), jax.random.normal(kv, (B, T, K, H))
    mask = layers.make_attention_mask(segment_ids=jnp.ones((B, T), jnp.int32), causal=True, q_len=T, kv_len=T)
    if block is None:  # what a training step runs here
        attend = lambda q, k, v: layers.dot_product_attention(q, k, v, mask)  # noqa: E731
    else:
        attend = lambda q, k, v: attention_lib.blockwise_attention(q, k, v, mask, scale=H**-0.5, block=block)  # noqa: E731
    out["attention"] = _time_jax(attend, (q, k, v), g, repeats)
    return out


def time_torch(tokens: int, shapes: list, attention: tuple, repeats: int, threads: int) -> dict:
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    out = {}
    for name, n_in, n_out, _ in shapes:
        torch.manual_seed(0)
        x = torch.randn(tokens, n_in, requires_grad=True)
        w = (torch.randn(n_out, n_in) * 0.02).requires_grad_(True)  # nn.Linear's [out, in]
        out[name] = _time_torch(F.linear, (x, w), torch.randn(tokens, n_out), repeats)

    B, T, N, K, H = attention
    torch.manual_seed(0)
    q, g = torch.randn(B, N, T, H, requires_grad=True), torch.randn(B, N, T, H)
    k, v = torch.randn(B, K, T, H, requires_grad=True), torch.randn(B, K, T, H, requires_grad=True)
    sdpa = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)  # noqa: E731
    out["attention"] = _time_torch(sdpa, (q, k, v), g, repeats)
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
    p.add_argument("--seq-len", type=int, default=None, help="sequence length, tokens kept (batch = tokens / T)")
    p.add_argument("--block", type=int, default=None, help="ftc's attention tile width (default: what ftc picks)")
    p.add_argument("--json", dest="json_out", default=None)
    p.add_argument("--worker", nargs=2, metavar=("STACK", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    config = common.CONFIGS[args.config]
    if args.seq_len:
        tokens = config.batch * config.seq_len
        if tokens % args.seq_len:
            p.error(f"--seq-len {args.seq_len} does not divide the config's {tokens} tokens a step")
        config = dataclasses.replace(config, seq_len=args.seq_len, batch=tokens // args.seq_len)
    shapes = projections(config)
    tokens = config.batch * config.seq_len
    attention = attention_shape(config)
    threads = len(os.sched_getaffinity(0))

    if args.worker:
        stack, out = args.worker
        if stack == "ftc":
            timed = time_ftc(tokens, shapes, attention, args.block, args.repeats)
        else:
            timed = time_torch(tokens, shapes, attention, args.repeats, threads)
        common.write_json(out, timed)
        return 0

    from bench import train_speed

    results = {}
    with tempfile.TemporaryDirectory(prefix="ftc-kernels-") as tmp:
        for stack in ("pytorch", "ftc"):
            out = Path(tmp) / f"{stack}.json"
            cmd = [sys.executable, "-m", "bench.kernels", "--config", args.config, "--repeats", str(args.repeats)]
            cmd += [f"--{k}={v}" for k, v in (("seq-len", args.seq_len), ("block", args.block)) if v is not None]
            proc = train_speed.worker_process(stack, config, [*cmd, "--worker", stack, str(out)])
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
