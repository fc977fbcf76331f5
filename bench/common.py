"""What both benchmark workers share: the configurations, the job they are given, process
memory readings and the FLOP count behind MFU. Imports neither jax nor torch, so each worker
process carries only its own framework.
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import statistics
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """One model shape and batch, trained the same way by both stacks."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    batch: int
    seq_len: int
    dtype: str  # compute dtype; parameters and optimizer state stay float32
    device: str  # "cpu" | "gpu"
    steps: int  # default step count (each stack)
    warmup: int  # steps left out of the steady-state figures (the first included)
    tie_embeddings: bool = False
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 2048
    learning_rate: float = 1e-4
    grad_clip: float = 1.0
    lora_rank: int = 16
    lora_alpha: int = 32
    quant_block_size: int = 64  # QLoRA NF4 block (bitsandbytes' fixed 64); must divide every input dim
    description: str = ""

    def hf_config_kwargs(self) -> dict:
        """transformers.LlamaConfig keyword arguments for this shape."""
        kw = dict(
            vocab_size=self.vocab,
            hidden_size=self.hidden,
            intermediate_size=self.intermediate,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_embeddings,
            rope_theta=self.rope_theta,
            rms_norm_eps=1e-5,
            attention_dropout=0.0,
        )
        if self.rope_scaling:
            kw["rope_scaling"] = dict(self.rope_scaling, rope_theta=self.rope_theta)
        return kw

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def tokens_per_step(self) -> int:
        return self.batch * self.seq_len


# NOTES.md's reference figure (Llama ~7.1M params: hidden 256, 4 layers, vocab 8192; batch 8 x seq
# 256, AdamW, float32, 2 threads). Intermediate 704 = 64 * 11, so QLoRA's 64-blocks divide it.
_CPU = BenchConfig(
    name="cpu",
    hidden=256,
    layers=4,
    heads=8,
    kv_heads=4,
    intermediate=704,
    vocab=8192,
    batch=8,
    seq_len=256,
    dtype="float32",
    device="cpu",
    steps=20,
    warmup=3,
    description="Llama 7.1M (hidden 256, 4 layers, vocab 8192), batch 8 x seq 256, float32",
)

CONFIGS = {
    "cpu": _CPU,
    # The same model at sequence 2048, batch 1 (as many tokens a step as "cpu"): what attention's
    # memory costs once T x T is large (16 MiB of float32 scores per head and layer).
    "cpu-2048": dataclasses.replace(
        _CPU,
        name="cpu-2048",
        batch=1,
        seq_len=2048,
        steps=10,
        description="Llama 7.1M (hidden 256, 4 layers, vocab 8192), batch 1 x seq 2048, float32",
    ),
    # Llama-3.2-1B's shape (1.24B params, tied embeddings, GQA 32/8, llama3 RoPE), bf16 compute.
    "gpu-1b": BenchConfig(
        name="gpu-1b",
        hidden=2048,
        layers=16,
        heads=32,
        kv_heads=8,
        intermediate=8192,
        vocab=128256,
        batch=4,
        seq_len=2048,
        dtype="bfloat16",
        device="gpu",
        steps=30,
        warmup=5,
        tie_embeddings=True,
        rope_theta=500000.0,
        max_position_embeddings=131072,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        description="Llama-3.2-1B shape (1.24B), batch 4 x seq 2048, bf16 compute, fp32 params",
    ),
    # The smoke test's: seconds, not minutes; only checks the harness and that both stacks agree.
    "smoke": BenchConfig(
        name="smoke",
        hidden=32,
        layers=2,
        heads=4,
        kv_heads=2,
        intermediate=64,
        vocab=256,
        batch=2,
        seq_len=32,
        dtype="float32",
        device="cpu",
        steps=2,
        warmup=1,
        lora_rank=4,
        lora_alpha=8,
        quant_block_size=32,
        description="Llama 2-layer hidden 32 (harness smoke test)",
    ),
}

METHODS = ("full", "lora", "qlora")


@dataclasses.dataclass(frozen=True)
class Job:
    """What the orchestrator hands a worker process (as JSON)."""

    config: BenchConfig
    method: str
    model_dir: str
    tokens_path: str  # int32 [steps, batch, seq_len + 1]: inputs are [:, :, :-1], targets [:, :, 1:]
    steps: int
    warmup: int
    threads: int
    remat: str = "none"
    # ftc: the cache root `ftc run` would use ($FTC_CACHE), whose jax/ keeps compiled programs;
    # "" = no persistent compilation cache. The PyTorch worker compiles nothing and ignores it.
    compile_cache: str = ""

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method {self.method!r}; expected one of {METHODS}")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Job:
        raw = json.loads(text)
        return cls(**{**raw, "config": BenchConfig(**raw["config"])})


# ------------------------------------------------------------------ process memory


def stack_env(stack: str, env: dict) -> dict:
    """A worker's environment: ftc's workers get what the `ftc` command restarts itself with
    (ftc/host_allocator.py: large host allocations on huge pages); other stacks their defaults.
    A benchmark decides its own compilation cache (bench/startup.py's cold, warm and off rows): one
    set in the caller's environment (JAX_COMPILATION_CACHE_DIR, as the test session sets) is dropped."""
    env = {
        k: v
        for k, v in env.items()
        if k not in ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS")
    }
    if stack != "ftc":
        return env
    from ftc import host_allocator

    return host_allocator.tuned_environ(env) or env


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_bytes() -> int:
    """Resident memory now."""
    kb = _status_kb("VmRSS")
    return kb * 1024 if kb is not None else peak_rss_bytes()


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far. VmHWM, not ru_maxrss: Linux carries
    ru_maxrss across exec, so a worker would report at least its parent's peak."""
    kb = _status_kb("VmHWM")
    if kb is not None:
        return kb * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) * (1 if sys.platform == "darwin" else 1024)


def trim_heap() -> None:
    """Hand the C heap's free pages back to the OS (glibc malloc_trim), so RSS stops counting
    memory a finished phase (loading, compiling) freed but malloc kept."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_peak_rss() -> bool:
    """Start VmHWM again from the current RSS (Linux >= 4.0: "5" to /proc/self/clear_refs), so a
    later peak_rss_bytes() is the peak of what ran since. False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def cpu_seconds() -> float:
    """User + system CPU time of this process, all threads."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def usage() -> tuple[float, float, int]:
    """(user + system CPU seconds, system CPU seconds, minor page faults) of this process so far."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime, r.ru_stime, r.ru_minflt


def step_usage(before: tuple, after: tuple) -> dict:
    """What one step used, from two usage() readings (worker result lists, one entry a step)."""
    keys = ("step_cpu_s", "step_sys_s", "step_minor_faults")
    return {k: a - b for k, a, b in zip(keys, after, before)}


def steady_state(result: dict, warmup: int) -> dict:
    """Median step time after the warm-up steps, and the CPU seconds those steps used per wall
    second (about the core count when the step keeps every core busy)."""
    times = result["step_times_s"][warmup:] or result["step_times_s"][-1:]
    cpu = result["step_cpu_s"][warmup:] or result["step_cpu_s"][-1:]
    out = {"step_median_s": statistics.median(times), "cpu_util": sum(cpu) / max(sum(times), 1e-9)}
    for key, name in (("step_sys_s", "sys_s_per_step"), ("step_minor_faults", "minor_faults_per_step")):
        if result.get(key):  # system CPU and page faults a step (what ftc/host_allocator.py is about)
            out[name] = statistics.median(result[key][warmup:] or result[key][-1:])
    return out


# ------------------------------------------------------------------ FLOPs and MFU


def matmul_params(c: BenchConfig) -> int:
    """Weights that take part in a matmul per token: every projection plus the LM head (also when
    tied: the head's matmul costs the same). The embedding lookup is a gather, not counted."""
    d, f, hd = c.hidden, c.intermediate, c.head_dim
    attn = d * c.heads * hd * 2 + d * c.kv_heads * hd * 2
    mlp = 3 * d * f
    return c.layers * (attn + mlp) + d * c.vocab


def lora_params(c: BenchConfig) -> int:
    """LoRA A and B over every linear layer of the blocks (PEFT's "all-linear": not the head)."""
    d, f, hd, r = c.hidden, c.intermediate, c.head_dim, c.lora_rank
    shapes = [(d, c.heads * hd), (d, c.kv_heads * hd), (d, c.kv_heads * hd), (c.heads * hd, d), (d, f), (d, f), (f, d)]
    return c.layers * sum(r * (i + o) for i, o in shapes)


def total_params(c: BenchConfig) -> int:
    d = c.hidden
    embed = c.vocab * d
    head = 0 if c.tie_embeddings else c.vocab * d
    norms = c.layers * 2 * d + d
    return matmul_params(c) - c.vocab * d + embed + head + norms


def train_flops_per_token(c: BenchConfig, method: str) -> float:
    """Model FLOPs per trained token (the PaLM appendix-B convention, attention not halved for
    causality). Full: 6N (forward 2N, backward 2N for activations + 2N for weights). LoRA/QLoRA:
    the frozen weights need no weight gradient, so 4N, plus 6 per adapter weight. Attention's
    score and value matmuls: 12 * layers * seq * (heads * head_dim) in both cases."""
    n = matmul_params(c)
    attn = 12 * c.layers * c.seq_len * c.heads * c.head_dim
    if method == "full":
        return 6.0 * n + attn
    return 4.0 * n + 6.0 * lora_params(c) + attn


def write_json(path: str | os.PathLike, data: Any) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)
