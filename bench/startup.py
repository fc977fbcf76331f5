"""Start-up, ftc against the PyTorch stack: imports + model load (LoRA setup, optimizer state) +
compile + first step, with ftc's persistent compilation cache cold (an empty cache directory,
as on a machine's first run), warm (the same directory again, as on a resumed or repeated run)
and off (FTC_COMPILATION_CACHE=0).

    python -m bench.startup --config cpu --method full lora --rounds 1

Each start is its own process (bench/train_speed.py's workers, 2 steps); in a round the order
is PyTorch, ftc off, ftc cold, ftc warm (warm must follow cold); rounds alternate PyTorch's
place; the fastest start per row is reported, with every round's beside it.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common, train_speed  # noqa: E402

PARTS = ("import_s", "load_s", "compile_s", "first_step_s")
ROWS = ("pytorch", "ftc-off", "ftc-cold", "ftc-warm")


def startup(result: dict) -> float | None:
    return sum(result[k] for k in PARTS) if all(k in result for k in PARTS) else None


def run(config: common.BenchConfig, methods: list[str], rounds: int, timeout: float = 1200.0) -> dict:
    report: dict = {"config": dataclasses.asdict(config), "machine": train_speed.machine_info(), "methods": {}}
    with tempfile.TemporaryDirectory(prefix="ftc-bench-startup-") as tmp:
        work = Path(tmp)
        model_dir, tokens_path = work / "model", work / "tokens.npy"
        train_speed.save_random_model(config, model_dir)
        train_speed.make_tokens(config, 2, tokens_path)
        for method in methods:
            runs: dict = {row: [] for row in ROWS}
            for r in range(rounds):
                cache = work / f"cache-{method}-{r}"  # cold: nothing compiled yet in it
                order = list(ROWS) if r % 2 == 0 else [*ROWS[1:], ROWS[0]]
                for row in order:
                    stack = "pytorch" if row == "pytorch" else "ftc"
                    job = common.Job(
                        config,
                        method,
                        str(model_dir),
                        str(tokens_path),
                        2,
                        1,
                        len(os.sched_getaffinity(0)),
                        compile_cache="" if row in ("pytorch", "ftc-off") else str(cache),
                    )
                    result = train_speed.run_worker(stack, job, work, timeout)
                    result["startup_s"] = startup(result)
                    runs[row].append(result)
            report["methods"][method] = {row: _best(results) for row, results in runs.items()}
    report["machine"]["load_avg_end"] = list(os.getloadavg())
    return report


def _best(results: list[dict]) -> dict:
    ok = [r for r in results if r.get("startup_s") is not None]
    if not ok:
        return results[0]
    best = dict(min(ok, key=lambda r: r["startup_s"]))
    best["rounds_startup_s"] = [r["startup_s"] for r in ok]
    return best


def format_report(report: dict) -> str:
    config, m = common.BenchConfig(**report["config"]), report["machine"]
    lines = [
        f"start-up (import + load + compile + first step): {config.description}",
        f"{m['date']}; {m['cpu']}, {m['cores']} cores; load avg (1 min) {m['load_avg_start'][0]:.2f} at start, "
        f"{m.get('load_avg_end', [float('nan')])[0]:.2f} at end",
        "",
        f"{'method':8} {'stack':9} {'start-up s':>10} {'import':>7} {'load':>6} {'compile':>8} {'1st step':>8}"
        f" {'vs PyTorch':>10}  rounds",
    ]
    for method, rows in report["methods"].items():
        torch_s = rows["pytorch"].get("startup_s")
        for row in ROWS:
            r = rows[row]
            if r.get("startup_s") is None:
                lines.append(f"{method:8} {row:9} FAILED: {str(r.get('error'))[:150]}")
                continue
            ratio = f"{r['startup_s'] / torch_s:.2f}x" if torch_s else "-"
            parts = " ".join(f"{r[k]:{w}.2f}" for k, w in zip(PARTS, (7, 6, 8, 8)))
            rounds = ", ".join(f"{x:.1f}" for x in r["rounds_startup_s"])
            lines.append(f"{method:8} {row:9} {r['startup_s']:10.2f} {parts} {ratio:>10}  {rounds}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", choices=sorted(common.CONFIGS), default="cpu")
    p.add_argument("--method", nargs="+", choices=["full", "lora"], default=["full", "lora"])
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--json", dest="json_out", default=None)
    args = p.parse_args(argv)
    report = run(common.CONFIGS[args.config], args.method, args.rounds)
    print(format_report(report))
    if args.json_out:
        common.write_json(args.json_out, report)
    failed = [(m, row) for m, rows in report["methods"].items() for row, r in rows.items() if "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
