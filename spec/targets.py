"""`[export] targets`: what each serving target cannot load, found by `ftc lint` before any training.

Each rule names the key path it is about and the target's own rule, with where that rule comes from:

transformers  bottleneck adapters (method.kind "adapter") export as the base plus ftc_adapters/, which
              transformers loads without the adapters, silently (they need ftc.backends.torch_adapters)
peft          ftc writes PEFT adapters for lora and qlora only (methods/lora_export.py)
vllm          served as a merged HF checkpoint (export.format "hf") or, for lora/qlora with format "peft",
              as a LoRA adapter through vLLM's loader: vllm/config/lora.py `max_lora_rank` is one of
              1, 8, 16, 32, 64, 128, 256, 320, 512 (default 16: a larger rank needs --max-lora-rank);
              vllm/lora/peft_helper.py refuses DoRA, modules_to_save and biases (ftc writes none of these).
              Bottleneck adapters and probes have no vLLM form. A QLoRA adapter served on the original
              base computes the original base plus the adapter, not what QLoRA trained (warning).
gguf, ollama  llama.cpp's model layouts ftc writes (io/gguf_export.py LAYOUTS): llama, mistral, qwen2, qwen3,
              gemma; its graphs attend over the whole context (no sliding window) and use the family's
              own activation; adapters merge into the weights except bottleneck adapters; a probe is
              no decoder; the tokenizer must be byte-level BPE (SentencePiece-style ones are not written yet).
              Ollama reads the same GGUF plus a Modelfile.

The base's config.json is read (JSON only) when model.base is a local directory or an HF id in the
local cache; a GGUF or package: base is one of the architectures ftc's GGUF import reads, all of
which have a layout.
"""

from __future__ import annotations

import json
import os

from ftc.spec.local_files import _snapshot, hf_hub_cache, value_at

TARGETS = ("transformers", "peft", "vllm", "gguf", "ollama")
GGUF_MODEL_TYPES = ("gemma", "llama", "mistral", "qwen2", "qwen3")  # == io/gguf_export.LAYOUTS (tested)
GGUF_ACTIVATIONS = {"gemma": "gelu_pytorch_tanh"}  # others: silu
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
VLLM_DEFAULT_RANK = 16
QUANTIZED_DTYPES = ("q8_0", "q4_0")


def _base_dir(base) -> str | None:
    """The base's directory, when it is on this machine as a directory (or in the HF cache)."""
    if not isinstance(base, str) or base.lower().endswith(".gguf") or base.startswith("package:"):
        return None
    path = os.path.expanduser(base)
    if not os.path.isdir(path) and base.count("/") == 1 and "@" not in base:
        path = _snapshot(os.path.join(hf_hub_cache(), "models--" + base.replace("/", "--")), "main") or ""
    return path if os.path.isdir(path) else None


def _base_config(path: str | None) -> dict | None:
    if path is None:
        return None
    config = os.path.join(path, "config.json")
    try:
        with open(config, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None  # a missing or unreadable base is reported elsewhere, with its own message
    return data if isinstance(data, dict) else None


def _tokenizer_problem(directory: str) -> str | None:
    """Why the tokenizer in `directory` cannot be written as a GGUF tokenizer (io/gguf_export_vocab.py
    writes byte-level BPE, llama.cpp's `gpt2` model), or None (also when there is none to read)."""
    try:
        with open(os.path.join(directory, "tokenizer.json"), encoding="utf-8") as f:
            data = json.load(f)
        model = data.get("model") or {}
    except (OSError, ValueError, AttributeError):
        return None
    if model.get("type") == "BPE" and "ByteLevel" in json.dumps(data.get("pre_tokenizer")):
        return None
    kind = f"{model.get('type')}{' (byte fallback: SentencePiece style)' if model.get('byte_fallback') else ''}"
    return f"its tokenizer is {kind}; ftc writes GGUF tokenizers for byte-level BPE (GPT-2 style) only"


def _gguf_problem(config: dict) -> str | None:
    model_type = config.get("model_type")
    if model_type not in GGUF_MODEL_TYPES:
        return f"model_type {model_type!r} has no GGUF layout ftc writes (llama.cpp: {', '.join(GGUF_MODEL_TYPES)})"
    act = config.get("hidden_act") or config.get("hidden_activation")
    want = GGUF_ACTIVATIONS.get(model_type, "silu")
    if act not in (None, want):
        return f"hidden_act {act!r}: llama.cpp's {model_type} graph computes {want!r}"
    window = config.get("sliding_window")
    sliding = config.get("use_sliding_window", model_type == "mistral")
    positions = config.get("max_position_embeddings") or 0
    if sliding and isinstance(window, int) and window < positions:
        return (
            f"sliding_window={window} (< {positions} positions): llama.cpp attends over the whole context, "
            f"so served outputs would differ past {window} tokens"
        )
    return None


def issues(s: dict) -> list[tuple[tuple, str, str]]:
    """(key path, message, "error" | "warning") for every setting a listed target cannot load."""
    targets = value_at(s, ("export", "targets"))
    fmt, dtype = value_at(s, ("export", "format")), value_at(s, ("export", "dtype"))
    out: list[tuple[tuple, str, str]] = []
    if dtype in QUANTIZED_DTYPES and fmt != "gguf":
        out.append(
            (("export", "dtype"), f"{dtype!r} is a llama.cpp quantisation: it needs export.format = 'gguf'", "error")
        )
    if not isinstance(targets, list):
        return out
    kind = value_at(s, ("method", "kind"))

    def add(target: str, path: tuple, message: str, severity: str = "error") -> None:
        out.append((path, f"target {target!r}: {message}", severity))

    for target in dict.fromkeys(t for t in targets if t in TARGETS):
        if target == "transformers" and kind == "adapter":
            add(
                target,
                ("method", "kind"),
                "bottleneck adapters load only through ftc.backends.torch_adapters; "
                "transformers loads the base without them, silently",
            )
        if target == "peft" and kind not in ("lora", "qlora"):
            add(target, ("method", "kind"), f"ftc writes PEFT adapters for method.kind 'lora' or 'qlora', not {kind!r}")
        if target == "vllm":
            out.extend(_vllm(s, kind, fmt))
        if target in ("gguf", "ollama"):
            if kind in ("adapter", "probe"):
                what = "bottleneck adapters cannot be merged into" if kind == "adapter" else "a probe is not"
                add(target, ("method", "kind"), f"{what} a llama.cpp decoder (GGUF holds one merged decoder)")
            base = _base_dir(value_at(s, ("model", "base")))
            config = _base_config(base)
            problem = _gguf_problem(config) if config is not None else None
            if problem:
                add(target, ("model", "base"), problem)
            tokenizer = value_at(s, ("model", "tokenizer"))
            tok_dir = os.path.expanduser(tokenizer) if isinstance(tokenizer, str) else base
            problem = _tokenizer_problem(tok_dir) if tok_dir else None
            if problem:
                add(target, ("model", "tokenizer") if isinstance(tokenizer, str) else ("model", "base"), problem)
    return out


def _vllm(s: dict, kind, fmt) -> list[tuple[tuple, str, str]]:
    out = []

    def add(path, message, severity="error"):
        out.append((path, f"target 'vllm': {message}", severity))

    if kind in ("adapter", "probe"):
        add(
            ("method", "kind"), f"vLLM serves full checkpoints and LoRA adapters; method.kind {kind!r} has no vLLM form"
        )
    if kind not in ("lora", "qlora") or fmt != "peft":
        return out  # merged ("hf"): vLLM loads the checkpoint like any other
    rank = value_at(s, ("method", "rank"))
    if isinstance(rank, int) and rank > max(VLLM_LORA_RANKS):
        add(
            ("method", "rank"),
            f"rank {rank} is above vLLM's largest max_lora_rank ({max(VLLM_LORA_RANKS)}; vllm/config/lora.py): "
            "its LoRA loader refuses the adapter; lower the rank or export.format = 'hf' (merged)",
        )
    elif isinstance(rank, int) and rank > VLLM_DEFAULT_RANK:
        need = min(r for r in VLLM_LORA_RANKS if r >= rank)
        add(
            ("method", "rank"),
            f"rank {rank} is above vLLM's default max_lora_rank {VLLM_DEFAULT_RANK}: start vLLM with "
            f"--max-lora-rank {need} (allowed: {', '.join(map(str, VLLM_LORA_RANKS))})",
            "warning",
        )
    if kind == "qlora":
        add(
            ("method", "kind"),
            "vLLM serves the adapter on the original base, not the NF4 base QLoRA trained against: outputs "
            "differ by the quantisation error; export.format = 'hf' serves what was trained (merged)",
            "warning",
        )
    return out
