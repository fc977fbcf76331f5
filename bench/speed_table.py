"""The side-by-side table bench/train_speed.py prints (and bench/gpu_check.py reuses).

"CPU s/step" is the median CPU time a timed step took (all threads): on a machine shared with other
work it moves far less than the wall-clock step time, so it is the column to compare under load.
"""

from __future__ import annotations

import statistics

from bench import common

STACKS = ("pytorch", "ftc")


def _cpu_s(r: dict, warmup: int) -> float | None:
    timed = (r.get("step_cpu_s") or [])[warmup:]
    return statistics.median(timed) if timed else None


def _ratio(entry: dict, fn) -> float | None:
    a, b = (entry.get(s) or {} for s in ("ftc", "pytorch"))
    x, y = (fn(r) if "error" not in r and "skipped" not in r and r else None for r in (a, b))
    return x / y if x and y else None


def _gb(n) -> str:
    return "-" if n is None else f"{n / 2**30:.2f} GB"


def _mb(n) -> str:
    return "-" if n is None else f"{n / 2**20:,.0f} MiB"


def _s(x, digits=2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _x(r) -> str:
    return "-" if r is None else f"{r:.2f}x"


def format_table(report: dict) -> str:
    config = common.BenchConfig(**report["config"])
    m = report["machine"]
    gpu = config.device == "gpu"
    lines = [
        f"ftc vs PyTorch: {config.description}; AdamW lr {config.learning_rate:g}, grad clip {config.grad_clip:g}; "
        f"{report['steps']} steps, median of the last {report['steps'] - report['warmup']}",
        f"{m['date']}; {m.get('device') or m['cpu']}, {m['cores']} cores; load avg (1 min) "
        f"{m['load_avg_start'][0]:.2f} at start, {m.get('load_avg_end', [float('nan')])[0]:.2f} at end; "
        + ", ".join(f"{k} {v}" for k, v in sorted(report.get("versions", {}).items())),
    ]
    peak = report.get("peak") or {}
    if "flops_per_s" in peak:
        lines.append(
            f"measured {peak['dtype']} matmul peak: {peak['flops_per_s'] / 1e12:.3f} TFLOP/s "
            f"({peak['n']}x{peak['n']} matmul on {peak['device']})"
        )
    head = [
        "method",
        "stack",
        "loss@1",
        f"loss@{report['steps']}",
        "start-up s",
        "(import",
        "load",
        "compile",
        "1st step)",
        "step s",
        "CPU s/step",
        "tokens/s",
        "MFU",
        "cores busy",
        "peak RSS",
    ]
    if gpu:
        head.append("peak GPU mem")
    rows = [head]
    for method, entry in report["methods"].items():
        for stack in STACKS:
            r = entry.get(stack)
            if r is None:
                continue
            if "error" in r or "skipped" in r:
                rows.append([method, stack, (r.get("skipped") or "FAILED: " + r["error"])[:100]])
                continue
            row = [
                method,
                stack,
                f"{r['losses'][0]:.5f}",
                f"{r['losses'][-1]:.5f}",
                _s(r["startup_s"]),
                _s(r["import_s"]),
                _s(r["load_s"]),
                _s(r["compile_s"]),
                _s(r["first_step_s"]),
                _s(r["step_median_s"], 3),
                _s(_cpu_s(r, report["warmup"]), 3),
                f"{r['tokens_per_s']:,.0f}",
                f"{100 * r['mfu']:.1f}%" if "mfu" in r else "-",
                _s(r.get("cpu_util")),
                _gb(r["peak_rss_bytes"]),
            ]
            if gpu:
                row.append(_gb(r.get("peak_device_bytes")))
            rows.append(row)
        q = entry.get("ratio")
        if q:
            chk = entry["loss_check"]
            row = [
                method,
                "ftc/pt",
                f"d={chk['abs_diff']:.1e}" + ("" if chk["agree"] else " !"),
                "",
                _x(q.get("startup_s")),
                "",
                "",
                "",
                "",
                _x(q.get("step_median_s")),
                _x(_ratio(entry, lambda r: _cpu_s(r, report["warmup"]))),
                _x(q.get("tokens_per_s")),
                "",
                "",
                _x(q.get("peak_rss_bytes")),
            ]
            if gpu:
                row.append(_x(q.get("peak_device_bytes")))
            rows.append(row)
    widths = [max(len(r[i]) for r in rows if i < len(r) and len(r) > 3) for i in range(len(head))]
    out = []
    for r in rows:
        if len(r) <= 3:
            out.append("  ".join(r))
        else:
            out.append("  ".join(c.rjust(w) if i > 1 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
    return "\n".join(lines + [""] + out + _memory_lines(report))


def _memory_lines(report: dict) -> list[str]:
    """ftc's predicted memory (`ftc plan --compile`: the plan's estimate, XLA's figure for the
    compiled step) against what the worker measured (bench/plan_memory.py says what each is)."""
    out = []
    for method, entry in report["methods"].items():
        r = entry.get("ftc") or {}
        pred, chk = r.get("predicted_memory") or {}, r.get("memory_check") or {}
        if "error" in pred:
            out.append(f"{method}: ftc plan --compile failed: {pred['error'][:200]}")
        if not chk:
            continue
        out.append(
            f"{method}: ftc plan's estimate {_mb(chk['estimate_bytes'])}, "
            f"XLA's compiled step {_mb(chk['compiled_bytes'])}"
            f"; measured buffers {_mb(chk['buffers_bytes'])} (state + what the steps added to RSS): "
            f"{_x(chk['estimate_over_buffers'])} / {_x(chk['compiled_over_buffers'])} of it; peak RSS "
            f"{_mb(r['peak_rss_bytes'])} = buffers + {_mb(chk['runtime_bytes'])} runtime (Python, jax, compiled code)"
        )
    return ["", "memory, ftc predicted against measured:"] + out if out else []
