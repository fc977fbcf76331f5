"""The inputs both runners (pipeline.py's train steps, probe_runner.py) read and the run-directory
files they write: the base model's directory, the tokenizer, the data, spec.resolved.json,
data_stats.json, plan.json and report.html."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import jax

from ftc.backends.jax.data.digest import named_leaves
from ftc.backends.jax.io.hf_checkpoint import TOKENIZER_FILES
from ftc.backends.jax.io.model_source import (
    ModelSourceError,
    check_hf_dir,
    check_tokenizer_dir,
    resolve_model_source,
)
from ftc.backends.jax.state.files import write_json_atomic
from ftc.backends.jax.state.init_from import read_model_config

RESOLVED_SPEC = "spec.resolved.json"
DATA_STATS = "data_stats.json"
PLAN = "plan.json"


def model_with_weights(spec) -> tuple[Path, dict]:
    """(model directory, config.json) of `model.base`, which training needs weights of."""
    model_dir, hf_config = read_model_config(spec.model.base)
    if model_dir is None:  # check_hf_dir says why: no weights at all, or only pickle ones ftc never loads
        check_hf_dir(Path(spec.model.base).expanduser(), spec.model.base)
        raise FileNotFoundError(f"model.base={spec.model.base!r} has a config.json but no *.safetensors weights")
    return model_dir, hf_config


def tokenizer_dir(spec, model_dir: Path) -> Path:
    """model.tokenizer's directory, else model.base's. The schema gives model.tokenizer the forms of
    model.base: a local directory (tokenizer files alone do, no weights needed) or what
    resolve_model_source turns into one (a .gguf file, package:NAME/path, a cached HF id); read as a
    plain path, every form but the first was "no tokenizer" though lint had passed it."""
    tokenizer = spec.model.tokenizer
    if not tokenizer:
        return Path(model_dir)
    if Path(tokenizer).expanduser().is_dir():
        return Path(tokenizer).expanduser()
    return resolve_model_source(tokenizer)


def tokenizer_hash(directory: str | os.PathLike) -> str | None:
    """sha256 over the tokenizer files present (names and bytes), or None when there are none."""
    h = hashlib.sha256()
    found = False
    for name in TOKENIZER_FILES:
        path = Path(directory) / name
        if path.is_file():
            found = True
            h.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16] if found else None


def load_tokenizer(directory: str | os.PathLike):
    from transformers import AutoTokenizer  # transformers is slow to import; `ftc plan` never needs it

    check_tokenizer_dir(directory)  # transformers' own messages for these name no file
    try:
        return AutoTokenizer.from_pretrained(str(directory), local_files_only=True, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - whatever transformers / tokenizers raise, the cause is these files
        raise ModelSourceError(f"{directory}: its tokenizer files do not load: {type(e).__name__}: {e}") from None


def nonfinite_paths(params) -> list[str]:
    """The floating parameters holding a nan or inf (one jitted pass over the weights), by path."""
    import jax.numpy as jnp

    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    leaves = [(p, x) for p, x in flat if jnp.issubdtype(x.dtype, jnp.floating)]
    finite = jax.device_get(jax.jit(lambda xs: [jnp.isfinite(x).all() for x in xs])([x for _, x in leaves]))
    return ["/".join(str(getattr(k, "key", k)) for k in path) for (path, _), ok in zip(leaves, finite) if not ok]


def token_id_problem(rows: dict | None, vocab_size: int, tok_dir) -> str | None:
    """Why the tokenised training rows cannot feed a model of `vocab_size` tokens, or None: an id
    past the embedding table (a tokenizer of another model; before, the step read past the table
    and the loss was nan at step 1, with advice to lower the learning rate)."""
    ids = [a for path, a in named_leaves(rows or {}) if path.rsplit("/", 1)[-1] in ("input_ids", "targets") and a.size]
    largest = max((int(a.max()) for a in ids), default=-1)
    if largest < vocab_size:
        return None
    return (
        f"the tokenizer ({tok_dir}) gives token id {largest}, but the model's vocab_size is {vocab_size} "
        "(config.json): they do not belong together; model.tokenizer (default: model.base's own) must be "
        "the tokenizer the model was trained with"
    )


def build_data(spec, tokenizer):
    """The run's `data.Datasets` (read -> clean -> validation hold-out -> tokenise -> pack ->
    grain), from the spec's [data] keys; this process's share of every batch."""
    from ftc.backends.jax.data import datasets as data_lib  # grain and tfds load only when data is read

    return data_lib.build_datasets(
        **data_options(spec),
        tokenizer=tokenizer,
        batch_size=spec.training.batch_size,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )


def data_options(spec) -> dict:
    """`build_datasets`'s arguments that the spec sets (the data pipeline's one reading of [data])."""
    d = spec.data
    clean = d.clean
    return dict(
        format=d.format,
        train=d.train_sources,
        max_seq_len=spec.model.max_seq_len,
        validation=d.validation,
        validation_split=d.validation_split or 0.0,
        packing=bool(d.packing),
        train_on=d.train_on or "assistant",
        shuffle=d.shuffle,
        clean={
            "dedupe": clean.dedupe,
            "drop_empty": clean.drop_empty,
            "roles": clean.roles,
            "unknown_roles": clean.unknown_roles,
            "overlong": clean.overlong,
        },
        on_bad_row=d.on_bad_row,
        labels=d.labels,
        seed=spec.training.seed,
    )


def write_data_stats(stats, run_dir: str) -> None:
    """`<run_dir>/data_stats.json`: rows read, kept and dropped per reason, packing efficiency."""
    if jax.process_index() != 0:
        return
    os.makedirs(run_dir, exist_ok=True)
    write_json_atomic(os.path.join(run_dir, DATA_STATS), stats.to_dict())


def write_resolved_spec(spec, run_dir: str) -> None:
    """`<run_dir>/spec.resolved.json`: the spec as it ran (extends, overrides and defaults applied)."""
    if jax.process_index() != 0:
        return
    os.makedirs(run_dir, exist_ok=True)
    write_json_atomic(os.path.join(run_dir, RESOLVED_SPEC), spec.to_dict())


def write_plan(plan, run_dir: str) -> None:
    """`<run_dir>/plan.json`: the compiled Plan as `ftc plan --json` prints it (the report reads it)."""
    if jax.process_index() != 0:
        return
    os.makedirs(run_dir, exist_ok=True)
    write_json_atomic(os.path.join(run_dir, PLAN), plan.to_dict())


def live_report(spec, run_dir: str, echo):
    """The RUN_DIR/report.html keeper (`logging.report`) on process 0, else None."""
    if jax.process_index() != 0 or not spec.logging.report:
        return None
    from ftc.report.live import LiveReport  # matplotlib loads at the first refresh

    report = LiveReport(run_dir, echo=echo)
    echo(f"report: {report.path} (kept up to date as the run goes; open it in a browser)")
    return report
