"""Embedding probe: a frozen model's pooled features, cached, and a small classifier head on them.

The probe has its own loop (`run_probe`), not the training core's: the base model runs once over
the data (features are cached in memory and, given a run dir, as .npy keyed by a hash of the model
weights, the data and the pooling; probe_features.py), then a linear or MLP head trains on the
cached features with optax (probe_head.py). Its export is written at the end of that run
(probe_export.py), so a probe keeps no checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ftc.backends.jax.io import hf_checkpoint
from ftc.backends.jax.methods.contract import Method
from ftc.backends.jax.methods.probe_export import PROBE_FORMAT, export_from_run, export_probe
from ftc.backends.jax.methods.probe_features import (
    ClassificationArrays,
    ProbeConfig,
    cached_features,
    compute_features,
    exact_target,
    head_has_bias,
    model_fingerprint,
    pooling_problem,
    uses_pooler,
)
from ftc.backends.jax.methods.probe_head import classification_metrics, predict_logits, train_head
from ftc.backends.jax.state import files


@dataclasses.dataclass(frozen=True)
class ProbeResult:
    metrics: dict  # what probe_metrics.json holds
    head: dict  # numpy arrays reading raw features (see head_logits)
    export: dict | None  # {"kind", "architecture", "dir"} or None


def _last_token_is_pad(data: ClassificationArrays, pad_token_id: int) -> bool:
    last = np.maximum(data.attention_mask.sum(1) - 1, 0)
    return bool(np.any(data.input_ids[np.arange(len(last)), last] == pad_token_id))


def run_probe(
    model: hf_checkpoint.LoadedModel,
    config: ProbeConfig,
    train: ClassificationArrays,
    labels: Sequence[str],
    *,
    validation: ClassificationArrays | None = None,
    run_dir: str | None = None,
    dtype=jnp.float32,
    pad_token_id: int | None = None,
    steps: int | None = None,
    epochs: int | None = None,
    batch_size: int = 64,
    tx: optax.GradientTransformation | None = None,
    learning_rate: float = 1e-3,
    l2: float = 0.0,
    seed: int = 0,
    log_every: int = 10,
    feature_batch_size: int = 32,
    export: bool = True,
    export_dtype: str = "float32",
    tokenizer_dir: str | None = None,
    model_key: str | None = None,
) -> ProbeResult:
    """The probe's whole run: features (cached), head training, metrics, export.

    `tx` defaults to adamw(learning_rate); steps default to `epochs` (1) passes of `batch_size`.
    `pad_token_id` defaults to config.json's; decoder exports need one. Under run_dir it writes
    features/features-<key>.npy, metrics.jsonl (loss lines, then one "probe_eval" line),
    probe_metrics.json and export/.
    """
    model_type = model.family.model_types[0]
    num_labels = len(labels)
    for name, split in (("train", train), ("validation", validation)):
        if split is not None and len(split.labels) and (split.labels.min() < 0 or split.labels.max() >= num_labels):
            raise ValueError(f"{name} labels must lie in [0, {num_labels}) for labels={list(labels)}")
    if pad_token_id is None:
        pad_token_id = model.hf_config.get("pad_token_id")
    if steps is None:
        steps = (epochs or 1) * max(1, len(train.labels) // min(batch_size, len(train.labels)))
    module = model.family.build(model.arch, dtype)
    pooled_output = uses_pooler(model_type, config)
    model_key = model_key or model_fingerprint(model.params, model_type, repr(model.arch), str(jnp.dtype(dtype)))
    cache_dir = os.path.join(run_dir, "features") if run_dir else None
    metrics_path = os.path.join(run_dir, "metrics.jsonl") if run_dir else None
    if run_dir:
        os.makedirs(run_dir, exist_ok=True)

    def log(entry):
        if metrics_path and jax.process_index() == 0:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(entry) + "\n")

    t0 = time.perf_counter()
    feats, sources = {}, {}
    for name, split in (("train", train), ("validation", validation)):
        if split is not None:
            feats[name], sources[name] = cached_features(
                module,
                model.params,
                split,
                pooling=config.pooling,
                pooled_output=pooled_output,
                model_key=model_key,
                cache_dir=cache_dir,
                batch_size=feature_batch_size,
            )
    feature_seconds = time.perf_counter() - t0

    t0 = time.perf_counter()
    head, _ = train_head(
        feats["train"],
        train.labels,
        num_labels,
        config,
        bias=head_has_bias(model_type, config),
        steps=steps,
        batch_size=batch_size,
        tx=tx or optax.adamw(learning_rate),
        l2=l2,
        seed=seed,
        log_every=log_every,
        log=log,
    )
    head_seconds = time.perf_counter() - t0

    majority = int(np.bincount(train.labels, minlength=num_labels).argmax())
    metrics: dict[str, Any] = {}
    for name in feats:
        y = train.labels if name == "train" else validation.labels
        metrics[name] = classification_metrics(y, predict_logits(head, feats[name]).argmax(-1), majority)
    metrics.update(
        majority_label=labels[majority],
        steps=steps,
        pooling=config.pooling,
        head=config.head,
        features="pooler_output" if pooled_output else "last_hidden_state",
        features_from=sources,
        feature_seconds=round(feature_seconds, 3),
        head_seconds=round(head_seconds, 3),
    )

    exported = None
    if export and run_dir:
        exact, target = True, exact_target(model_type, config)
        if target is not None and target.pooling == "last":
            if pad_token_id is None:
                raise ValueError(
                    f"exporting a probe as {target.architecture} needs a pad token id "
                    "(config.json pad_token_id or the tokenizer's)"
                )
            if any(_last_token_is_pad(s, pad_token_id) for s in (train, validation) if s is not None):
                exact = False
                metrics["export_note"] = (
                    f"rows end in the pad token (id {pad_token_id}), where {target.architecture} would read an "
                    f"earlier token: exported in the generic {PROBE_FORMAT} format instead"
                )
        exported = export_probe(
            os.path.join(run_dir, "export"),
            model,
            head,
            config,
            labels,
            pad_token_id=pad_token_id,
            exact=exact,
            dtype=export_dtype,
            tokenizer_dir=tokenizer_dir,
        )
        metrics["export"] = exported
    log(
        {
            "event": "probe_eval",
            **{
                f"{split}/{k}": v
                for split in ("train", "validation")
                if split in metrics
                for k, v in metrics[split].items()
            },
        }
    )
    if run_dir and jax.process_index() == 0:
        # The runner reads this file as "the probe run is complete": written whole or not at all.
        files.write_text_atomic(
            os.path.join(run_dir, "probe_metrics.json"), json.dumps(metrics, indent=2, sort_keys=True) + "\n"
        )
    return ProbeResult(metrics, head, exported)


# ---------------------------------------------------------------- the method record


def detail(model) -> str:
    c = model.config
    return (
        f"{c.pooling} pooling, {c.head} head: the base is frozen; the head "
        f"(features x labels{f', hidden {c.head_hidden}' if c.head == 'mlp' else ''}) trains on cached "
        f"features, outside this count"
    )


METHOD = Method(
    kind="probe",
    config=ProbeConfig.from_spec,
    trainable=lambda path: False,  # the head lives outside the model (run_probe)
    detail=detail,
    formats={"hf": None},  # written by `ftc run` (probe_export.export_probe); `ftc export` copies it
    trains_in_step_loop=False,
    exported_by_run=export_from_run,
)

__all__ = [
    "ClassificationArrays",
    "ProbeConfig",
    "ProbeResult",
    "cached_features",
    "compute_features",
    "model_fingerprint",
    "pooling_problem",
    "predict_logits",
    "run_probe",
    "uses_pooler",
]
