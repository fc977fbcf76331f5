"""The probe's export, written at the end of `ftc run` (it keeps no checkpoint), and what
`ftc export` does with it: copy it elsewhere and verify it against the head ftc trained.

Export, chosen so the exported model computes exactly what ftc evaluated:
  - an HF *ForSequenceClassification checkpoint when one reads the same thing with a linear head:
    BERT + pooling "cls" -> BertForSequenceClassification (classifier with bias);
    Llama/Mistral/Qwen2/Qwen3/Gemma/GPT-2 + pooling "last" -> *ForSequenceClassification, which
    reads the last token not equal to pad_token_id through a bias-free `score`: ftc then trains
    the head without bias and standardises by scale only (no centring, which needs a bias).
    If a row's last real token *is* the pad token, HF would read an earlier token: ftc then falls
    back to the generic export and says so in the metrics ("export_note").
  - otherwise (mean pooling, MLP heads, cls on a decoder, ...): the base model as a plain HF
    checkpoint (hf_checkpoint.save_hf) + probe_head.safetensors + probe_config.json, which
    `ftc.backends.torch_probe.load_probe(dir)` turns into a PyTorch module with the same logits.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from ftc.backends.jax.io import hf_checkpoint
from ftc.backends.jax.io import verify as verify_lib
from ftc.backends.jax.io.export_common import EXPORT_DIR, ExportError, ExportResult, as_float32, publish, round_leaves
from ftc.backends.jax.methods.probe_features import (
    ClassificationArrays,
    ProbeConfig,
    SeqClsTarget,
    compute_features,
    exact_target,
    uses_pooler,
)
from ftc.backends.jax.methods.probe_head import predict_logits
from ftc.backends.jax.models.family import HfTensor, linear_t
from ftc.spec import spec_from_dict

PROBE_FORMAT = "ftc-probe"
PROBE_CONFIG_FILE = "probe_config.json"
PROBE_HEAD_FILE = "probe_head.safetensors"
_HEAD = "probe_head"  # the head's key beside the base params when exporting through save_hf
PROBE_HEAD = "probe_head.ftc.safetensors"  # the trained head in ftc's layout, beside probe_metrics.json


def _labels_config(labels: Sequence[str]) -> dict:
    return {
        "id2label": {str(i): l for i, l in enumerate(labels)},
        "label2id": {l: i for i, l in enumerate(labels)},
        "num_labels": len(labels),
        "problem_type": "single_label_classification",
    }


def _seq_cls_model(model: hf_checkpoint.LoadedModel, target: SeqClsTarget, head: dict, extra_config: dict):
    """(family, arch, params, hf_config) for save_hf that writes `target`'s state dict: the base
    tensors renamed under its base prefix (LM heads dropped) plus the classifier."""
    family, arch = model.family, model.arch

    def rename(name: str) -> str | None:
        bare = name[len(target.base_prefix) + 1 :] if name.startswith(target.base_prefix + ".") else name
        return f"{target.base_prefix}.{bare}" if bare.split(".")[0] in target.base_modules else None

    tensors = {}
    flat = traverse_util.flatten_dict(nn.unbox(model.params), sep="/")
    params = {}
    for path, spec in family.hf_tensors(arch).items():
        names = tuple(rename(n) if isinstance(n, str) else tuple(map(rename, n)) for n in spec.names)
        if all(n is not None and (isinstance(n, str) or None not in n) for n in names):
            tensors[path] = dataclasses.replace(spec, names=names)
            params[path] = flat[path]
    tensors[f"{_HEAD}/out_kernel"] = HfTensor((f"{target.head_name}.weight",), **linear_t())
    params[f"{_HEAD}/out_kernel"] = head["out_kernel"]
    if target.head_bias:
        tensors[f"{_HEAD}/out_bias"] = HfTensor((f"{target.head_name}.bias",))
        params[f"{_HEAD}/out_bias"] = head["out_bias"]
    seq_cls_family = dataclasses.replace(
        family,
        hf_tensors=lambda _arch: tensors,
        hf_architecture=target.architecture,
        hf_config=lambda a: {**family.hf_config(a), **extra_config},
    )
    return seq_cls_family, arch, traverse_util.unflatten_dict(params, sep="/"), model.hf_config


def export_probe(
    out_dir: str,
    model: hf_checkpoint.LoadedModel,
    head: dict,
    config: ProbeConfig,
    labels: Sequence[str],
    *,
    pad_token_id: int | None,
    exact: bool = True,
    dtype: str = "float32",
    tokenizer_dir: str | None = None,
) -> dict:
    """Writes the export (see the module docstring); returns {"kind": "hf" | "ftc-probe", ...}."""
    from safetensors.numpy import save_file

    model_type = model.family.model_types[0]
    extra = {"pad_token_id": int(pad_token_id)} if pad_token_id is not None else {}
    target = exact_target(model_type, config) if exact else None
    if target is not None:
        extra.update(_labels_config(labels))
        hf_checkpoint.save_hf(
            out_dir, _seq_cls_model(model, target, head, extra), dtype=dtype, tokenizer_dir=tokenizer_dir
        )
        return {"kind": "hf", "architecture": target.architecture, "dir": str(out_dir)}
    family = dataclasses.replace(model.family, hf_config=lambda a: {**model.family.hf_config(a), **extra})
    hf_checkpoint.save_hf(
        out_dir, (family, model.arch, model.params, model.hf_config), dtype=dtype, tokenizer_dir=tokenizer_dir
    )
    if jax.process_index() == 0:
        names = {
            "out_kernel": "out.weight",
            "out_bias": "out.bias",
            "hidden_kernel": "hidden.weight",
            "hidden_bias": "hidden.bias",
        }
        tensors = {
            names[k]: np.ascontiguousarray(v.T if k.endswith("kernel") else v, dtype=np.float32)
            for k, v in head.items()
        }
        save_file(tensors, os.path.join(out_dir, PROBE_HEAD_FILE), metadata={"format": PROBE_FORMAT})
        probe_config = {
            "format": PROBE_FORMAT,
            "version": 1,
            "pooling": config.pooling,
            "head": config.head,
            "head_hidden": config.head_hidden if config.head == "mlp" else None,
            "activation": "gelu" if config.head == "mlp" else None,
            "features": "pooler_output" if uses_pooler(model_type, config) else "last_hidden_state",
            **_labels_config(labels),
        }
        with open(os.path.join(out_dir, PROBE_CONFIG_FILE), "w") as f:
            json.dump(probe_config, f, indent=2, sort_keys=True)
            f.write("\n")
    return {"kind": PROBE_FORMAT, "architecture": model.family.hf_architecture, "dir": str(out_dir)}


# ---------------------------------------------------------------- ftc export


def copy_probe_export(
    run_dir: Path, out_dir: str | os.PathLike, *, format: str | None, dtype: str | None, force: bool = False
) -> ExportResult:
    """A probe run's export is written by `ftc run` (probe.run_probe, in the spec's export.dtype);
    `ftc export` copies it (atomically) to another directory."""
    source = run_dir / EXPORT_DIR
    resolved = run_dir / "spec.resolved.json"
    if not (source / "config.json").is_file() or not resolved.is_file():
        raise ExportError(
            f"{run_dir}: a probe run writes its export at the end of `ftc run`; there is none "
            f"({source}) - run the spec first"
        )
    spec = spec_from_dict(json.loads(resolved.read_text()))
    if format not in (None, "hf"):
        raise ExportError(
            f"export format {format!r} does not apply to method.kind 'probe': expected 'hf' (a probe is a "
            f"classifier head on a frozen model: nothing to merge into a GGUF, no LoRA for PEFT)"
        )
    if dtype not in (None, spec.export.dtype):
        raise ExportError(
            f"a probe's export is written by `ftc run` in export.dtype "
            f"{spec.export.dtype!r}; to change it run the spec again with "
            f"--set export.dtype=... (the features are cached, so it is quick)"
        )
    out = Path(out_dir).absolute()
    files = tuple(sorted(p.name for p in source.iterdir()))
    if out != source.absolute():
        publish(out, lambda tmp: shutil.copytree(source, tmp, dirs_exist_ok=True), force=force, reads=(run_dir,))
    load = (
        "ftc.backends.torch_probe.load_probe"
        if (source / "probe_config.json").exists()
        else "AutoModelForSequenceClassification.from_pretrained"
    )
    return ExportResult(out, "probe", "hf", spec.export.dtype, None, files, f"{load}({str(out)!r})")


def verify_probe_export(
    run_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    tol: float | None = None,
    batch: int = 4,
    seq_len: int = 12,
    seed: int = 0,
):
    """A probe's export against the probe ftc trained: the base's pooled features under ftc (float32,
    weights rounded to the export dtype) through the trained head (RUN_DIR/probe_head.ftc.safetensors),
    vs the export loaded in PyTorch (AutoModelForSequenceClassification, or torch_probe.load_probe
    for the generic format), on fixed right-padded rows that avoid the pad id. Compares class logits."""
    from safetensors.numpy import load_file

    from ftc.backends.jax.pipeline import read_model_config  # lazy: the whole of `ftc run`

    verify_lib.require_torch()
    import torch

    tol = verify_lib.DEFAULT_TOL if tol is None else tol
    run_dir, out = Path(run_dir).absolute(), Path(out_dir).absolute()
    if not (run_dir / PROBE_HEAD).is_file():
        raise ExportError(f"{run_dir}: no {PROBE_HEAD} (the trained head); run the spec again to write it")
    started = time.perf_counter()
    spec = spec_from_dict(json.loads((run_dir / "spec.resolved.json").read_text()))
    model_dir, hf_config = read_model_config(spec.model.base)
    loaded = hf_checkpoint.load_model(model_dir)
    config = ProbeConfig.from_spec(spec.method)
    generic = (out / PROBE_CONFIG_FILE).is_file()
    dtype = spec.export.dtype
    params = as_float32(round_leaves(loaded.params, dtype, lambda path: True))
    head = {k: np.asarray(v, np.float32) for k, v in load_file(run_dir / PROBE_HEAD).items()}
    if not generic:  # the exact export stores the head in the export dtype too
        head = {k: np.asarray(jnp.asarray(v).astype(dtype).astype(jnp.float32)) for k, v in head.items()}
    ftc_load = time.perf_counter() - started

    exported = json.loads((out / "config.json").read_text())
    pad = exported.get("pad_token_id")
    pad = 0 if pad is None else int(pad)
    rng = np.random.default_rng(seed)
    vocab = int(hf_config["vocab_size"])
    rows = [[int(t) for t in rng.integers(0, vocab - 1, size=max(1, seq_len - 3 * i))] for i in range(batch)]
    rows = [[t + 1 if t >= pad else t for t in row] for row in rows]  # ids in [0, vocab) without the pad id
    data = ClassificationArrays.from_token_lists(rows, [0] * batch, pad_id=pad)

    started = time.perf_counter()
    module = loaded.family.build(loaded.arch, jnp.float32)
    feats = compute_features(
        module,
        params,
        data,
        pooling=config.pooling,
        batch_size=batch,
        pooled_output=uses_pooler(loaded.family.model_types[0], config),
    )
    ours = predict_logits(head, feats)
    ftc_forward = time.perf_counter() - started
    started = time.perf_counter()
    if generic:
        from ftc.backends import torch_probe

        reference = torch_probe.load_probe(out, dtype=torch.float32).eval()
    else:
        from transformers import AutoModelForSequenceClassification

        reference = AutoModelForSequenceClassification.from_pretrained(
            out, dtype=torch.float32, local_files_only=True, trust_remote_code=False
        ).eval()
    torch_load = time.perf_counter() - started
    started = time.perf_counter()
    with torch.no_grad():
        theirs = (
            reference(
                torch.as_tensor(data.input_ids, dtype=torch.long),
                attention_mask=torch.as_tensor(data.attention_mask, dtype=torch.long),
            )
            .logits.float()
            .numpy()
        )
    torch_forward = time.perf_counter() - started
    diff = float(np.abs(ours.astype(np.float64) - theirs.astype(np.float64)).max())
    return verify_lib.VerifyResult(
        model_dir=out,
        output="class logits",
        max_abs_diff=diff,
        max_abs_reference=float(np.abs(theirs).max()),
        tol=tol,
        shape=(theirs.shape[0], data.input_ids.shape[1], theirs.shape[1]),
        real_tokens=int(data.attention_mask.sum()),
        ftc_load_seconds=ftc_load,
        ftc_forward_seconds=ftc_forward,
        torch_load_seconds=torch_load,
        torch_forward_seconds=torch_forward,
    )


def export_from_run(
    run_dir,
    out,
    *,
    format: str | None,
    dtype: str | None,
    verify: bool | None,
    force: bool,
    tol: float | None,
    echo: Callable[[str], None],
):
    """`ftc export` of a probe run: copy its export, verify it when asked (default: the spec's
    export.verify). Returns (ExportResult, VerifyResult or None)."""
    run_dir = Path(run_dir)
    result = copy_probe_export(run_dir, out, format=format, dtype=dtype, force=force)
    echo(f"probe export: {result.out_dir} (written by ftc run)\n  load with: {result.how_to_load}")
    check = None
    resolved = json.loads((run_dir / "spec.resolved.json").read_text())
    if verify if verify is not None else resolved.get("export", {}).get("verify"):
        check = verify_probe_export(run_dir, result.out_dir, tol=tol)
        echo("verify: " + check.summary())
    return result, check
