"""Tiny `ftc run`s of every method, shared by test_run_methods.py and test_export.py.

Each run is trained once per pytest process (cached here), on a tiny Llama saved by transformers
(train_testlib.make_model_dir) and tiny chat data; the probe on a tiny BERT with classification
data. Every spec trains in float32 and exports float32 at the end of the run.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import train_testlib as tl

from ftc.backends.jax import pipeline as run_lib
from ftc.spec import load_spec

STEPS = 4
METHODS = {
    "full": "",
    # dropout > 0: evaluation must run without it (test_run_methods checks the logged loss)
    "lora": "rank = 4\nalpha = 16\ndropout = 0.2",
    "qlora": "rank = 4\nalpha = 16\nquant_block_size = 32",
    "adapter": 'placement = "houlsby"\nreduction_factor = 4\nnon_linearity = "gelu"',
}
LEARNING_RATE = {"full": 1e-3, "lora": 3e-2, "qlora": 3e-2, "adapter": 3e-2}

SPEC = """ftc = 1
name = "{name}"
output_dir = "{root}/runs"
[model]
base = "{model}"
max_seq_len = 48
dtype = "float32"
{init_from}
[data]
format = "chat"
train = "{root}/train.jsonl"
validation = "{root}/valid.jsonl"
[method]
kind = "{kind}"
{method}
[training]
steps = {steps}
batch_size = 8
micro_batch_size = 8
learning_rate = {lr}
log_every = 1
schedule = {{ kind = "constant" }}
optimizer = {{ kind = "adamw", weight_decay = 0.1 }}
[export]
dtype = "float32"
{export}
[logging]
progress = false
tensorboard = false
"""

PROBE_SPEC = """ftc = 1
name = "{name}"
output_dir = "{root}/runs"
[model]
base = "{root}/bert"
max_seq_len = 32
dtype = "float32"
[data]
format = "classification"
train = "{root}/cls_train.jsonl"
validation = "{root}/cls_valid.jsonl"
[method]
kind = "probe"
pooling = "{pooling}"
[training]
objective = "classify"
steps = 60
batch_size = 32
micro_batch_size = 32
learning_rate = {lr}
log_every = 20
schedule = {{ kind = "constant" }}
[export]
dtype = "float32"
[logging]
progress = false
tensorboard = false
"""

_ROOT: Path | None = None
_RUNS: dict[str, Trained] = {}


@dataclasses.dataclass(frozen=True)
class Trained:
    kind: str
    spec_path: Path
    run_dir: Path
    model_dir: Path
    summary: dict
    log: tuple[str, ...]  # what `ftc run` echoed


def root() -> Path:
    """One directory per test process: the tiny models and data, and every run under runs/."""
    global _ROOT
    if _ROOT is None:
        _ROOT = Path(tempfile.mkdtemp(prefix="ftc-method-runs-"))
        atexit.register(shutil.rmtree, _ROOT, True)
        tl.make_model_dir(_ROOT / "model")
        tl.write_chat_data(_ROOT / "train.jsonl", 32)
        tl.write_chat_data(_ROOT / "valid.jsonl", 8, seed=1)
    return _ROOT


def write_spec(
    kind: str,
    name: str | None = None,
    *,
    init_from: str | None = None,
    steps: int = STEPS,
    export: str = "",
    method: str | None = None,
) -> Path:
    r = root()
    name = name or kind
    text = SPEC.format(
        name=name,
        root=r,
        model=r / "model",
        kind=kind,
        method=METHODS[kind] if method is None else method,
        steps=steps,
        lr=LEARNING_RATE[kind],
        init_from=f'init_from = "{init_from}"' if init_from else "",
        export=export,
    )
    path = r / f"{name}.toml"
    path.write_text(text)
    return path


def run_spec(path: Path, kind: str) -> Trained:
    log: list[str] = []
    spec = load_spec(path)
    summary = run_lib.run(spec, echo=log.append)
    return Trained(kind, path, Path(spec.run_dir), root() / "model", summary, tuple(log))


def trained(kind: str) -> Trained:
    """The run of `kind` (full, lora, qlora, adapter), trained on first use."""
    if kind not in _RUNS:
        _RUNS[kind] = run_spec(write_spec(kind), kind)
    return _RUNS[kind]


# ------------------------------------------------------------------ the probe's data and model


PROBE_WORDS = {
    "red": "apple cherry fire blood rose",
    "green": "grass leaf frog lime moss",
    "blue": "sky sea ocean water ice",
}


def probe_root() -> Path:
    """A tiny BERT (with the byte-level tokenizer) and separable three-label text data."""
    r = root()
    if not (r / "bert").exists():
        import torch
        import transformers
        from data_testlib import make_tokenizer, write_jsonl

        torch.manual_seed(0)
        config = transformers.BertConfig(
            vocab_size=320,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=64,
            pad_token_id=3,
        )
        transformers.BertModel(config).eval().save_pretrained(r / "bert")
        make_tokenizer().save_pretrained(r / "bert")
        rng = np.random.default_rng(0)
        labels = list(PROBE_WORDS)

        def rows(n):
            out = []
            for i in range(n):
                label = labels[i % 3]
                words = rng.choice(PROBE_WORDS[label].split(), size=int(rng.integers(2, 6)))
                out.append({"text": f"{i} " + " ".join(words), "label": label})
            return out

        write_jsonl(r / "cls_train.jsonl", rows(96))
        write_jsonl(r / "cls_valid.jsonl", rows(30))
    return r


def write_probe_spec(name: str = "probe", lr: float = 0.05, pooling: str = "mean") -> Path:
    """mean pooling exports the generic ftc-probe format; cls on BERT a BertForSequenceClassification."""
    r = probe_root()
    path = r / f"{name}.toml"
    path.write_text(PROBE_SPEC.format(name=name, root=r, lr=lr, pooling=pooling))
    return path


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
