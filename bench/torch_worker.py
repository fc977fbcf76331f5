"""The PyTorch side of the benchmark, in its own process: transformers' LlamaForCausalLM (+ PEFT
LoRA, + bitsandbytes 4-bit for QLoRA) trained with torch.optim.AdamW, the way a Hugging Face
Trainer user runs it (fused AdamW, its default since torch 2.8; SDPA attention, transformers'
default; bf16 autocast over float32 weights on GPU).

    python -m bench.torch_worker JOB.json RESULT.json
"""

from __future__ import annotations

import time

_T_START = time.perf_counter()

import dataclasses  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common  # noqa: E402


@dataclasses.dataclass
class Program:
    """The PyTorch training step for a job: `step(i)` trains on token batch i and returns the loss."""

    step: Callable[[int], float]
    model: Any
    params: list
    timings: dict  # import_s, load_s
    rss_after_import: int
    versions: dict
    cuda: bool
    memory: dict  # rss_after_load_bytes, peak_rss_after_load_bytes


def build(job: common.Job) -> Program:
    t0 = time.perf_counter()
    import numpy as np
    import torch
    import torch.nn.functional as F
    import transformers

    c = job.config
    cuda = c.device == "gpu"
    if cuda and not torch.cuda.is_available():
        raise RuntimeError("config asks for a GPU but torch.cuda.is_available() is False (a CPU build of torch?)")
    torch.set_num_threads(job.threads)
    torch.manual_seed(0)
    transformers.utils.logging.disable_progress_bar()
    device = torch.device("cuda" if cuda else "cpu")
    versions = {"torch": torch.__version__, "transformers": transformers.__version__}
    if job.method != "full":
        import peft

        versions["peft"] = peft.__version__
    timings = {"import_s": time.perf_counter() - t0}
    rss_after_import = common.rss_bytes()

    t0 = time.perf_counter()
    load_kw: dict = {"dtype": torch.float32}
    if job.method == "qlora":
        if not cuda:
            raise RuntimeError("QLoRA on PyTorch needs bitsandbytes' CUDA kernels; there is no CPU baseline")
        import bitsandbytes  # noqa: F401  (a clear ImportError when missing)

        load_kw["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_use_double_quant=False,
        )
        load_kw["device_map"] = {"": 0}
    model = transformers.AutoModelForCausalLM.from_pretrained(job.model_dir, local_files_only=True, **load_kw)
    if job.method != "qlora":
        model.to(device)
    if job.remat != "none":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if job.method in ("lora", "qlora"):
        if job.method == "qlora":
            model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=job.remat != "none")
        lora = peft.LoraConfig(
            r=c.lora_rank,
            lora_alpha=c.lora_alpha,
            lora_dropout=0.0,
            bias="none",
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        )
        model = peft.get_peft_model(model, lora)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=c.learning_rate, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, fused=True)
    tokens = np.load(job.tokens_path)
    if cuda:
        torch.cuda.synchronize()
    timings["load_s"] = time.perf_counter() - t0
    memory = {"rss_after_load_bytes": common.rss_bytes(), "peak_rss_after_load_bytes": common.peak_rss_bytes()}

    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=c.dtype == "bfloat16")

    def step(i: int) -> float:
        batch = torch.from_numpy(tokens[i % len(tokens)]).to(device=device, dtype=torch.long)
        x, y = batch[:, :-1], batch[:, 1:]
        with autocast:
            logits = model(input_ids=x).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, c.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.item())  # waits for the step (CPU ops are synchronous anyway)

    return Program(step, model, params, timings, rss_after_import, versions, cuda, memory)


def run(job: common.Job) -> dict:
    import torch

    p = build(job)
    losses, times = [], []
    usage: dict[str, list] = {}  # step_cpu_s, step_sys_s, step_minor_faults
    for i in range(job.steps):
        t0, u0 = time.perf_counter(), common.usage()
        losses.append(p.step(i))
        times.append(time.perf_counter() - t0)
        for k, v in common.step_usage(u0, common.usage()).items():
            usage.setdefault(k, []).append(v)

    out = {
        "stack": "pytorch",
        "method": job.method,
        "versions": p.versions,
        "trainable_params": sum(x.numel() for x in p.params),
        **p.timings,
        "compile_s": 0.0,
        "first_step_s": times[0],
        "step_times_s": times,
        **usage,
        "losses": losses,
        "rss_after_import_bytes": p.rss_after_import,
        **p.memory,
        "peak_rss_bytes": common.peak_rss_bytes(),
        "threads": torch.get_num_threads(),
        "optimizer": "torch.optim.AdamW(fused=True)",
        "attention": getattr(p.model.config, "_attn_implementation", None),
    }
    if p.cuda:
        out["device_name"] = torch.cuda.get_device_name(0)
        out["peak_device_bytes"] = int(torch.cuda.max_memory_allocated())
    return out


def main(argv: list[str]) -> int:
    job_path, result_path = argv
    with open(job_path) as f:
        job = common.Job.from_json(f.read())
    result = run(job)
    result.update(common.steady_state(result, job.warmup))
    result["process_s"] = time.perf_counter() - _T_START
    common.write_json(result_path, result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
