"""The commented starter spec that `ftc init` writes. It lints clean (its data files may not
exist yet: that is a warning)."""

from __future__ import annotations

import re

NAME_PATTERN = r"[a-z0-9][a-z0-9._-]*"  # the schema's `name` pattern
DEFAULT_BASES = {"classify": "sentence-transformers/all-MiniLM-L6-v2"}
DEFAULT_BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"
_FORMATS = {"sft": "chat", "dpo": "preference", "classify": "classification"}
_LEARNING_RATES = {"full": "2e-5", "lora": "2e-4", "qlora": "2e-4", "adapter": "1e-4", "probe": "1e-3"}

_METHOD_BLOCKS = {
    "full": """kind = "full"                         # full | lora | qlora | adapter | probe: every weight trains""",
    "lora": """kind = "lora"                         # full | lora | qlora | adapter | probe
rank = 16                             # low-rank update size r
alpha = 32                            # updates scaled by alpha / rank
dropout = 0.0
targets = "all-linear"                # or a list of module names / regexes: ["q_proj", "v_proj"]""",
    "qlora": """kind = "qlora"                        # LoRA over a 4-bit quantized, frozen base
rank = 16
alpha = 32
targets = "all-linear"
quant_block_size = 64                 # weights per quantization block""",
    "adapter": """kind = "adapter"                      # bottleneck adapters
placement = "pfeiffer"                # pfeiffer (after the MLP) | houlsby (after attention and MLP)
reduction_factor = 16                 # hidden size / bottleneck size
non_linearity = "relu\"""",
    "probe": """kind = "probe"                        # a classification head on frozen features
pooling = "mean"                      # mean | cls | last
head = "linear"                       # linear | mlp""",
}

_TEMPLATE = """\
# ftc spec: `ftc lint {file}` checks it, `ftc run {file}` trains it.
# Every key and its default: `ftc schema`. Relative paths are relative to this file.
ftc = 1
name = "{name}"                       # the run goes to <output_dir>/<name>
description = "{description}"

[model]
base = "{base}"   # HF id (local cache), local directory, or .gguf file
dtype = "bfloat16"                    # compute dtype; parameters stay float32
max_seq_len = {max_seq_len}

[data]
format = "{format}"{format_comment}
train = "data/train.jsonl"            # JSONL file, glob, or "tfds:name/config:split"
validation = "data/valid.jsonl"       # or: validation_split = 0.05
{data_extra}
[method]
{method}

[training]
objective = "{objective}"{objective_extra}
epochs = 1                            # or: steps = 1000
batch_size = 16                       # global, in sequences
micro_batch_size = {micro}                   # per forward/backward pass; accumulates to batch_size
learning_rate = {learning_rate}
schedule = {{ kind = "cosine", warmup_ratio = 0.03 }}
optimizer = {{ kind = "adamw", weight_decay = 0.0, grad_clip = 1.0 }}
eval_every = 100                      # steps; 0 = only at the end
log_every = 10

[mesh]                                # product = device count; -1 takes the rest
data = 1
fsdp = -1
tensor = 1

[checkpoint]
every = 500                           # steps; 0 = only at the end and on interrupt
keep = 3

[export]
format = "{export_format}"{export_comment}
dtype = "bfloat16"
"""

_FORMAT_COMMENTS = {
    "chat": '                     # rows: {"messages": [{"role": ..., "content": ...}]}',
    "preference": '               # rows: {"prompt": ..., "chosen": ..., "rejected": ...}',
    "classification": '           # rows: {"text": ..., "label": ...}',
}


def starter_spec(file: str, name: str, method: str = "full", objective: str | None = None,
                 base: str | None = None) -> str:
    objective = objective or ("classify" if method == "probe" else "sft")
    fmt = _FORMATS[objective]
    data_extra = {
        "chat": 'packing = true                        # several conversations per sequence\n'
                'train_on = "assistant"               # loss on assistant turns only (or "all")\n',
        "preference": "",
        "classification": '# labels = ["negative", "positive"]  # class order; default: sorted labels in train\n',
    }[fmt]
    peft = method in ("lora", "qlora")
    return _align_comments(_TEMPLATE.format(
        file=file, name=name, description=f"{method} fine-tune ({objective})",
        base=base or DEFAULT_BASES.get(objective, DEFAULT_BASE),
        max_seq_len=256 if fmt == "classification" else 2048,
        format=fmt, format_comment=_FORMAT_COMMENTS[fmt], data_extra=data_extra,
        method=_METHOD_BLOCKS[method], objective=objective,
        objective_extra='\ndpo_beta = 0.1                        # DPO temperature' if objective == "dpo" else "",
        micro=4, learning_rate=_LEARNING_RATES[method],
        export_format="peft" if peft else "hf",
        export_comment="                       # PEFT adapter directory (hf = merged model)" if peft else
                       "                         # a transformers checkpoint",
    ))


def _align_comments(text: str, column: int = 40) -> str:
    # The template's strings hold no "  #", so the first one starts a trailing comment.
    lines = []
    for line in text.splitlines():
        code, sep, comment = line.partition("  #")
        if sep and code.strip() and not code.lstrip().startswith("#"):
            code = code.rstrip()
            line = f"{code.ljust(column - 1)} #{comment}" if len(code) < column - 1 else f"{code}  #{comment}"
        lines.append(line)
    return "\n".join(lines) + "\n"


def name_from_file(file: str) -> str:
    """A valid spec name from a file name: `My Bot.toml` -> `my-bot`."""
    stem = re.sub(r"\.(toml|json)$", "", file.rsplit("/", 1)[-1], flags=re.I)
    name = re.sub(r"[^a-z0-9._-]+", "-", stem.lower()).strip("-._")[:128]
    return name or "my-run"
