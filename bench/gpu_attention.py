"""ftc's attention kernels against each other on one device: the cuDNN fused kernel (GPU), the
blockwise (flash) kernel and the XLA reference, values and gradients, and each one's time for a
forward + backward pass.

    python -m bench.gpu_attention --json OUT.json            # GPU shapes (Llama-3.2-1B's heads, T 2048)
    python -m bench.gpu_attention --dry-run --json OUT.json  # tiny shapes, any device (the CPU test)

The reference is the XLA path in float32 over the same (bf16-rounded) inputs. A kernel passes
when its relative error (||x - ref|| / ||ref|| over the rows that see a key) on the output and on
each gradient is at most twice the XLA path's own in the compute dtype, plus 2e-3, and nothing is
NaN. A kernel that cannot run here (cuDNN off an NVIDIA GPU) is reported with the reason.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# name: (batch, seq, heads, kv heads, head dim, mask kind)
CASES = {
    "causal, GQA 32/8, dim 64": (4, 2048, 32, 8, 64, "causal"),
    "packed segments + padding": (4, 2048, 32, 8, 64, "packed"),
    "packed, dim 128": (2, 2048, 16, 8, 128, "packed"),
    "sliding window 512": (2, 2048, 16, 8, 64, "window"),
}
DRY_CASES = {
    "causal, GQA 4/2, dim 16": (2, 64, 4, 2, 16, "causal"),
    "packed segments + padding": (2, 64, 4, 2, 16, "packed"),
    "sliding window 16": (1, 64, 4, 4, 16, "window"),
}
IMPLEMENTATIONS = ("cudnn", "blockwise", "xla")


def _segments(rng, B: int, T: int):
    """Random segment lengths per row (packed conversations), the last eighth padding."""
    import numpy as np

    ids = np.zeros((B, T), np.int32)
    for b in range(B):
        pos, seg = 0, 1
        while pos < T - T // 8:
            n = int(rng.integers(T // 16, T // 3))
            ids[b, pos : min(pos + n, T - T // 8)] = seg
            pos, seg = pos + n, seg + 1
    return ids


def run_case(name: str, shape: tuple, dtype: str, repeats: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from ftc.backends.jax.models import attention

    B, T, N, K, H, kind = shape
    rng = np.random.default_rng(0)
    cast = lambda a: jnp.asarray(a, jnp.float32).astype(dtype)
    q, k, v = (cast(rng.normal(size=s)) for s in ((B, T, N, H), (B, T, K, H), (B, T, K, H)))
    seg = jnp.asarray(_segments(rng, B, T)) if kind == "packed" else None
    window = T // 4 if kind == "window" else None
    mask = attention.make_attention_mask(segment_ids=seg, causal=True, sliding_window=window, q_len=T, kv_len=T)
    seen = np.asarray(mask.dense()).any(-1)[:, 0][..., None, None]  # [B, T, 1, 1]
    cotangent = jnp.asarray(rng.normal(size=(B, T, N, H)), jnp.float32) * seen

    def step(implementation, compute_dtype):
        def loss(q, k, v):
            out = attention.dot_product_attention(
                q.astype(compute_dtype), k.astype(compute_dtype), v.astype(compute_dtype), mask,
                implementation=implementation,
            )  # fmt: skip
            return jnp.sum(out.astype(jnp.float32) * cotangent), out

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))

    def outputs(fn):
        (_, out), grads = fn(q, k, v)
        return [np.asarray(x, np.float32) for x in (out, *grads)]

    ref = outputs(step("xla", jnp.float32))
    q_rows = seen  # output and dq: rows that see a key; dk, dv: every key
    masks = [q_rows, q_rows, 1.0, 1.0]

    def rel_errors(got):
        return [
            float(np.linalg.norm((g - r) * m) / max(np.linalg.norm(r * m), 1e-30)) for g, r, m in zip(got, ref, masks)
        ]

    result = {"case": name, "shape": dict(B=B, T=T, N=N, K=K, H=H, mask=kind), "dtype": dtype, "kernels": {}}
    for impl in IMPLEMENTATIONS:
        entry: dict = {}
        if impl == "cudnn":
            reason = attention.cudnn_unsupported(q, k, mask)
            if reason:
                result["kernels"][impl] = {"unsupported": reason}
                continue
        try:
            fn = step(impl, dtype)
            got = outputs(fn)
            entry["rel_err"] = dict(zip(("out", "dq", "dk", "dv"), rel_errors(got)))
            entry["nan"] = bool(any(np.isnan(g).any() for g in got))
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                jax.block_until_ready(fn(q, k, v))
                times.append(time.perf_counter() - t0)
            entry["fwd_bwd_ms"] = 1e3 * statistics.median(times)
            entry["temp_bytes"] = int(fn.lower(q, k, v).compile().memory_analysis().temp_size_in_bytes)
        except Exception as e:  # one kernel failing must not hide the others' figures
            entry = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
        result["kernels"][impl] = entry
    xla = result["kernels"].get("xla", {}).get("rel_err")
    for entry in result["kernels"].values():
        if "rel_err" in entry and xla:
            entry["pass"] = not entry["nan"] and all(entry["rel_err"][x] <= 2 * xla[x] + 2e-3 for x in xla)
    return result


def format_rows(results: list[dict]) -> str:
    lines = [f"{'case':30s} {'kernel':9s} {'fwd+bwd ms':>10s} {'temp MiB':>9s}  rel err out/dq/dk/dv      result"]
    for r in results:
        for impl, e in r["kernels"].items():
            if "rel_err" in e:
                errs = "/".join(f"{e['rel_err'][x]:.1e}" for x in ("out", "dq", "dk", "dv"))
                verdict = "ok" if e.get("pass") else ("NaN" if e["nan"] else "FAIL")
                lines.append(
                    f"{r['case'][:30]:30s} {impl:9s} {e['fwd_bwd_ms']:10.2f} {e['temp_bytes'] / 2**20:9.1f}  "
                    f"{errs:26s} {verdict}"
                )
            else:
                lines.append(f"{r['case'][:30]:30s} {impl:9s} {e.get('unsupported') or 'failed: ' + e['error']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="tiny shapes (CPU)")
    p.add_argument("--json", dest="json_out", default=None)
    args = p.parse_args(argv)
    import jax

    cases = DRY_CASES if args.dry_run else CASES
    dtype = "bfloat16"
    results = [run_case(name, shape, dtype, repeats=3 if args.dry_run else 10) for name, shape in cases.items()]
    device = jax.devices()[0]
    report = {"device": getattr(device, "device_kind", str(device)), "platform": device.platform, "cases": results}
    print(f"attention kernels on {report['device']} ({report['platform']}), {dtype}")
    print(format_rows(results))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(report, f, indent=2)
    failed = [r["case"] for r in results for e in r["kernels"].values() if "rel_err" in e and not e.get("pass")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
