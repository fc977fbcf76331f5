"""Embedding probe: a frozen model's pooled features, cached, and a small classifier head on them.

The probe has its own loop (`run_probe`): the base model runs once over the data (features are
cached in memory and, given a run dir, as .npy keyed by a hash of the model weights, the data and
the pooling), then a linear or MLP head trains on the cached features with optax.

Pooling (`[method].pooling`):
  mean  average of the final hidden states over real tokens;
  last  the final hidden state of the last real token (rows are right-padded);
  cls   the first token. For BERT, "cls" reads the *pooler output* tanh(W h_CLS + b): that is
        what BertForSequenceClassification's classifier reads, so the export is exact.

The head trains on standardised features (train mean/std); the standardisation is folded into
the head's first layer afterwards, so the head returned and exported reads raw features.

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

import collections
import dataclasses
import hashlib
import json
import math
import os
import time
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from ftc.backends.jax.io import hf_checkpoint
from ftc.backends.jax.models.family import HfTensor, linear_t

POOLINGS = ("mean", "cls", "last")
HEADS = ("linear", "mlp")
PROBE_FORMAT = "ftc-probe"
PROBE_CONFIG_FILE = "probe_config.json"
PROBE_HEAD_FILE = "probe_head.safetensors"
_HEAD = "probe_head"  # the head's key beside the base params when exporting through save_hf


@dataclasses.dataclass(frozen=True)
class ProbeConfig:
    """The spec's [method] keys for kind = "probe"."""

    pooling: str = "mean"
    head: str = "linear"
    head_hidden: int = 256

    def __post_init__(self):
        if self.pooling not in POOLINGS:
            raise ValueError(f"[method].pooling={self.pooling!r}: expected one of {', '.join(POOLINGS)}")
        if self.head not in HEADS:
            raise ValueError(f"[method].head={self.head!r}: expected one of {', '.join(HEADS)}")
        if not isinstance(self.head_hidden, int) or isinstance(self.head_hidden, bool) or self.head_hidden < 1:
            raise ValueError(f"[method].head_hidden={self.head_hidden!r}: expected an integer >= 1")


@dataclasses.dataclass(frozen=True)
class SeqClsTarget:
    """A transformers *ForSequenceClassification class whose head ftc's probe reproduces exactly."""

    architecture: str
    pooling: str                   # the only pooling it reads
    base_prefix: str               # its base model attribute ("bert", "model", "transformer")
    base_modules: tuple[str, ...]  # the base model's top-level children
    head_name: str                 # "classifier" | "score"
    head_bias: bool


_DECODER = ("embed_tokens", "layers", "norm")
SEQ_CLS_TARGETS = {
    "bert": SeqClsTarget("BertForSequenceClassification", "cls", "bert", ("embeddings", "encoder", "pooler"),
                         "classifier", True),
    "llama": SeqClsTarget("LlamaForSequenceClassification", "last", "model", _DECODER, "score", False),
    "mistral": SeqClsTarget("MistralForSequenceClassification", "last", "model", _DECODER, "score", False),
    "qwen2": SeqClsTarget("Qwen2ForSequenceClassification", "last", "model", _DECODER, "score", False),
    "qwen3": SeqClsTarget("Qwen3ForSequenceClassification", "last", "model", _DECODER, "score", False),
    "gemma": SeqClsTarget("GemmaForSequenceClassification", "last", "model", _DECODER, "score", False),
    "gpt2": SeqClsTarget("GPT2ForSequenceClassification", "last", "transformer", ("wte", "wpe", "h", "ln_f"),
                         "score", False),
}
_POOLER_MODEL_TYPES = ("bert",)  # families whose output="pooled" is the HF pooler output


@dataclasses.dataclass(frozen=True)
class ClassificationArrays:
    """Right-padded token rows and their label indices (numpy)."""

    input_ids: np.ndarray        # [N, T] int32
    attention_mask: np.ndarray   # [N, T] int32, 1 on real tokens, left-aligned
    labels: np.ndarray           # [N] int32 in [0, num_labels)

    @classmethod
    def from_token_lists(cls, token_rows: Sequence[Sequence[int]], labels: Sequence[int], pad_id: int = 0):
        if len(token_rows) != len(labels):
            raise ValueError(f"{len(token_rows)} token rows but {len(labels)} labels")
        if any(len(r) == 0 for r in token_rows):
            raise ValueError("a classification row has no tokens")
        T = max(len(r) for r in token_rows)
        ids = np.full((len(token_rows), T), pad_id, np.int32)
        mask = np.zeros((len(token_rows), T), np.int32)
        for i, row in enumerate(token_rows):
            ids[i, : len(row)] = row
            mask[i, : len(row)] = 1
        return cls(ids, mask, np.asarray(labels, np.int32))

    @classmethod
    def from_data_rows(cls, rows: dict) -> "ClassificationArrays":
        """From the data pipeline's classification arrays (`Datasets.train_rows`): input_ids,
        segment_ids (1 on tokens), labels, and weights (0 marks a padding row, dropped here)."""
        keep = np.asarray(rows["weights"]) > 0 if "weights" in rows else slice(None)
        return cls(np.asarray(rows["input_ids"], np.int32)[keep],
                   (np.asarray(rows["segment_ids"])[keep] > 0).astype(np.int32),
                   np.asarray(rows["labels"], np.int32)[keep])


def uses_pooler(model_type: str, config: ProbeConfig) -> bool:
    return config.pooling == "cls" and model_type in _POOLER_MODEL_TYPES


def exact_target(model_type: str, config: ProbeConfig) -> SeqClsTarget | None:
    """The HF class an export maps onto exactly, or None (generic ftc-probe export)."""
    target = SEQ_CLS_TARGETS.get(model_type)
    if target is None or config.head != "linear" or config.pooling != target.pooling:
        return None
    return target


def head_has_bias(model_type: str, config: ProbeConfig) -> bool:
    target = exact_target(model_type, config)
    return True if target is None else target.head_bias


# ---------------------------------------------------------------- features


def pool(hidden_BTD: jax.Array, attention_mask_BT: jax.Array, pooling: str) -> jax.Array:
    """[B, D] float32 features from final hidden states."""
    h_BTD = hidden_BTD.astype(jnp.float32)
    if pooling == "mean":
        mask_BT = attention_mask_BT.astype(jnp.float32)
        return (h_BTD * mask_BT[..., None]).sum(1) / jnp.maximum(mask_BT.sum(1, keepdims=True), 1.0)
    if pooling == "cls":
        return h_BTD[:, 0]
    if pooling == "last":
        last_B = jnp.maximum(attention_mask_BT.astype(jnp.int32).sum(1) - 1, 0)
        return jnp.take_along_axis(h_BTD, last_B[:, None, None], axis=1)[:, 0]
    raise ValueError(f"unknown pooling {pooling!r}")


def _bucket(length: int) -> int:
    return max(16, 1 << (length - 1).bit_length())


def compute_features(module: nn.Module, params, data: ClassificationArrays, *, pooling: str,
                     pooled_output: bool = False, batch_size: int = 32) -> np.ndarray:
    """[N, D] float32 features of `data` under the frozen model.

    Rows are sorted by length and each batch is cut to a power-of-two length (>= 16), so short
    rows don't pay for long ones and at most log2(T) shapes compile.
    """

    @jax.jit
    def features(params, ids_BT, mask_BT):
        if pooled_output:
            pooled_BD = module.apply({"params": params}, ids_BT, attention_mask=mask_BT, output="pooled")
            return pooled_BD.astype(jnp.float32)
        hidden_BTD = module.apply({"params": params}, ids_BT, attention_mask=mask_BT, output="hidden")
        return pool(hidden_BTD, mask_BT, pooling)

    lengths = data.attention_mask.sum(1)
    if np.any(lengths == 0):
        raise ValueError(f"{int(np.sum(lengths == 0))} classification row(s) have no tokens")
    order = np.argsort(lengths, kind="stable")
    out = None
    for start in range(0, len(order), batch_size):
        rows = order[start: start + batch_size]
        T = min(_bucket(int(lengths[rows].max())), data.input_ids.shape[1])
        ids, mask = data.input_ids[rows, :T], data.attention_mask[rows, :T]
        n = len(rows)
        if n < batch_size:  # one batch shape per length bucket: repeat a row, drop its output
            ids = np.concatenate([ids, np.repeat(ids[:1], batch_size - n, 0)])
            mask = np.concatenate([mask, np.repeat(mask[:1], batch_size - n, 0)])
        feats = np.asarray(features(params, ids, mask))[:n]
        if out is None:
            out = np.zeros((len(order), feats.shape[1]), np.float32)
        out[rows] = feats
    return out


def model_fingerprint(params, *extra: Any) -> str:
    """sha256 over every parameter's path, shape, dtype and bytes, plus `extra` settings."""
    digest = hashlib.sha256(repr(extra).encode())
    for path, leaf in sorted(traverse_util.flatten_dict(nn.unbox(params), sep="/").items()):
        array = np.ascontiguousarray(jax.device_get(leaf))
        digest.update(f"{path}:{array.shape}:{array.dtype}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def data_fingerprint(data: ClassificationArrays) -> str:
    digest = hashlib.sha256()
    for array in (data.input_ids, data.attention_mask):
        digest.update(f"{array.shape}:{array.dtype}".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


_MEMORY_CACHE: "collections.OrderedDict[str, np.ndarray]" = collections.OrderedDict()
_MEMORY_CACHE_SIZE = 8


def cached_features(module, params, data: ClassificationArrays, *, pooling: str, pooled_output: bool,
                    model_key: str, cache_dir: str | None = None, batch_size: int = 32) -> tuple[np.ndarray, str]:
    """Features from the in-memory cache, else `cache_dir/features-<key>.npy`, else computed.

    Returns (features, where), where in {"memory", "disk", "computed"}.
    """
    key = hashlib.sha256(f"{model_key}:{data_fingerprint(data)}:{pooling}:{pooled_output}".encode()).hexdigest()[:32]
    if key in _MEMORY_CACHE:
        _MEMORY_CACHE.move_to_end(key)
        return _MEMORY_CACHE[key], "memory"
    path = os.path.join(cache_dir, f"features-{key}.npy") if cache_dir else None
    if path and os.path.exists(path):
        feats, where = np.load(path, allow_pickle=False), "disk"
    else:
        feats, where = compute_features(module, params, data, pooling=pooling, pooled_output=pooled_output,
                                        batch_size=batch_size), "computed"
        if path and jax.process_index() == 0:
            os.makedirs(cache_dir, exist_ok=True)
            tmp = f"{path}.{os.getpid()}.tmp.npy"
            np.save(tmp, feats, allow_pickle=False)
            os.replace(tmp, path)  # atomic: a reader never sees half a file
    _MEMORY_CACHE[key] = feats
    while len(_MEMORY_CACHE) > _MEMORY_CACHE_SIZE:
        _MEMORY_CACHE.popitem(last=False)
    return feats, where


# ---------------------------------------------------------------- head


def init_head(rng: jax.Array, features: int, num_labels: int, config: ProbeConfig, bias: bool) -> dict:
    """Head parameters, kernels [in, out]. An MLP always has biases (it never maps onto an HF class)."""
    k1, k2 = jax.random.split(rng)
    if config.head == "linear":
        head = {"out_kernel": jnp.zeros((features, num_labels))}  # convex: zero is a fine start
        if bias:
            head["out_bias"] = jnp.zeros((num_labels,))
        return head
    return {
        "hidden_kernel": jax.random.normal(k1, (features, config.head_hidden)) / math.sqrt(features),
        "hidden_bias": jnp.zeros((config.head_hidden,)),
        "out_kernel": jax.random.normal(k2, (config.head_hidden, num_labels)) / math.sqrt(config.head_hidden),
        "out_bias": jnp.zeros((num_labels,)),
    }


def head_logits(head: dict, x_BF: jax.Array) -> jax.Array:
    """Linear: x W (+ b). MLP: gelu(x W1 + b1) W2 + b2, with exact (erf) gelu as torch's default."""
    if "hidden_kernel" in head:
        x_BF = jax.nn.gelu(x_BF @ head["hidden_kernel"] + head["hidden_bias"], approximate=False)
    logits_BC = x_BF @ head["out_kernel"]
    return logits_BC + head["out_bias"] if "out_bias" in head else logits_BC


@dataclasses.dataclass(frozen=True)
class Standardizer:
    """x' = (x - mean) / scale. Centring is off for bias-free heads (no bias to fold it into)."""

    mean: np.ndarray
    scale: np.ndarray

    @classmethod
    def fit(cls, x: np.ndarray, center: bool) -> "Standardizer":
        mean = x.mean(0) if center else np.zeros(x.shape[1], np.float32)
        scale = np.sqrt(((x - mean) ** 2).mean(0))
        return cls(mean.astype(np.float32), np.where(scale > 1e-6, scale, 1.0).astype(np.float32))

    def __call__(self, x):
        return (x - self.mean) / self.scale


def fold_standardizer(head: dict, std: Standardizer) -> dict:
    """The same head reading raw features: W' = W / s, b' = b - (m / s) W."""
    head = {k: np.asarray(v, np.float32) for k, v in head.items()}
    first = "hidden" if "hidden_kernel" in head else "out"
    kernel = head[f"{first}_kernel"]
    out = dict(head)
    out[f"{first}_kernel"] = kernel / std.scale[:, None]
    if f"{first}_bias" in head:
        out[f"{first}_bias"] = head[f"{first}_bias"] - (std.mean / std.scale) @ kernel
    elif np.any(std.mean != 0):
        raise ValueError("a bias-free head cannot absorb centred features")
    return out


def train_head(features: np.ndarray, labels: np.ndarray, num_labels: int, config: ProbeConfig, *,
               bias: bool, steps: int, batch_size: int, tx: optax.GradientTransformation, l2: float = 0.0,
               seed: int = 0, log_every: int = 0, log=None) -> tuple[dict, list[dict]]:
    """Minibatch mean cross-entropy (+ l2/2 · sum of squared kernels) on standardised features.

    Returns (head reading raw features, logged losses). `l2 = 1 / (C · N)` is scikit-learn's
    LogisticRegression(C) objective on the same standardised features.
    """
    std = Standardizer.fit(features, center=bias)
    x = jnp.asarray(std(features))
    y = jnp.asarray(labels, jnp.int32)
    rng_init, rng_data = jax.random.split(jax.random.key(seed))
    head = init_head(rng_init, x.shape[1], num_labels, config, bias)
    opt_state = tx.init(head)
    batch_size = min(batch_size, x.shape[0])

    def loss_fn(head, x_BF, y_B):
        loss = optax.softmax_cross_entropy_with_integer_labels(head_logits(head, x_BF), y_B).mean()
        return loss + 0.5 * l2 * sum(jnp.sum(v ** 2) for k, v in head.items() if k.endswith("kernel"))

    @jax.jit
    def step(head, opt_state, index_B):
        loss, grads = jax.value_and_grad(loss_fn)(head, x[index_B], y[index_B])
        updates, opt_state = tx.update(grads, opt_state, head)
        return optax.apply_updates(head, updates), opt_state, loss

    steps_per_epoch = x.shape[0] // batch_size
    history, order = [], None
    for i in range(steps):
        epoch, j = divmod(i, steps_per_epoch)
        if j == 0:
            order = jax.random.permutation(jax.random.fold_in(rng_data, epoch), x.shape[0])
        head, opt_state, loss = step(head, opt_state, order[j * batch_size: (j + 1) * batch_size])
        if log_every and ((i + 1) % log_every == 0 or i + 1 == steps):
            entry = {"step": i + 1, "loss": float(loss)}
            history.append(entry)
            if log:
                log(entry)
    return fold_standardizer(jax.device_get(head), std), history


def predict_logits(head: dict, features: np.ndarray) -> np.ndarray:
    return np.asarray(head_logits({k: jnp.asarray(v) for k, v in head.items()}, jnp.asarray(features)))


# ---------------------------------------------------------------- metrics


def accuracy(y_true, y_pred) -> float:
    return float(np.mean(np.asarray(y_true) == np.asarray(y_pred)))


def macro_f1(y_true, y_pred) -> float:
    """Unweighted mean F1 over the labels present in y_true or y_pred (scikit-learn's default)."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    scores = []
    for c in np.union1d(y_true, y_pred):
        tp = np.sum((y_pred == c) & (y_true == c))
        fp = np.sum((y_pred == c) & (y_true != c))
        fn = np.sum((y_pred != c) & (y_true == c))
        scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores))


def classification_metrics(y_true, y_pred, majority_label: int) -> dict:
    """Accuracy and macro-F1, and the same for always predicting the train set's majority label."""
    majority = np.full_like(np.asarray(y_true), majority_label)
    return {
        "accuracy": accuracy(y_true, y_pred),
        "macro_f1": macro_f1(y_true, y_pred),
        "majority_accuracy": accuracy(y_true, majority),
        "majority_macro_f1": macro_f1(y_true, majority),
        "examples": int(len(y_true)),
    }


# ---------------------------------------------------------------- export


def _labels_config(labels: Sequence[str]) -> dict:
    return {"id2label": {str(i): l for i, l in enumerate(labels)}, "label2id": {l: i for i, l in enumerate(labels)},
            "num_labels": len(labels), "problem_type": "single_label_classification"}


def _seq_cls_model(model: hf_checkpoint.LoadedModel, target: SeqClsTarget, head: dict, extra_config: dict):
    """(family, arch, params, hf_config) for save_hf that writes `target`'s state dict: the base
    tensors renamed under its base prefix (LM heads dropped) plus the classifier."""
    family, arch = model.family, model.arch

    def rename(name: str) -> str | None:
        bare = name[len(target.base_prefix) + 1:] if name.startswith(target.base_prefix + ".") else name
        return f"{target.base_prefix}.{bare}" if bare.split(".")[0] in target.base_modules else None

    tensors = {}
    flat = traverse_util.flatten_dict(nn.unbox(model.params), sep="/")
    params = {}
    for path, spec in family.hf_tensors(arch).items():
        names = tuple(rename(n) for n in spec.names)
        if all(n is not None for n in names):
            tensors[path] = dataclasses.replace(spec, names=names)
            params[path] = flat[path]
    tensors[f"{_HEAD}/out_kernel"] = HfTensor((f"{target.head_name}.weight",), **linear_t())
    params[f"{_HEAD}/out_kernel"] = head["out_kernel"]
    if target.head_bias:
        tensors[f"{_HEAD}/out_bias"] = HfTensor((f"{target.head_name}.bias",))
        params[f"{_HEAD}/out_bias"] = head["out_bias"]
    seq_cls_family = dataclasses.replace(
        family, hf_tensors=lambda _arch: tensors, hf_architecture=target.architecture,
        hf_config=lambda a: {**family.hf_config(a), **extra_config})
    return seq_cls_family, arch, traverse_util.unflatten_dict(params, sep="/"), model.hf_config


def export_probe(out_dir: str, model: hf_checkpoint.LoadedModel, head: dict, config: ProbeConfig,
                 labels: Sequence[str], *, pad_token_id: int | None, exact: bool = True, dtype: str = "float32",
                 tokenizer_dir: str | None = None) -> dict:
    """Writes the export (see the module docstring); returns {"kind": "hf" | "ftc-probe", ...}."""
    from safetensors.numpy import save_file

    model_type = model.family.model_types[0]
    extra = {"pad_token_id": int(pad_token_id)} if pad_token_id is not None else {}
    target = exact_target(model_type, config) if exact else None
    if target is not None:
        extra.update(_labels_config(labels))
        hf_checkpoint.save_hf(out_dir, _seq_cls_model(model, target, head, extra), dtype=dtype,
                              tokenizer_dir=tokenizer_dir)
        return {"kind": "hf", "architecture": target.architecture, "dir": str(out_dir)}
    family = dataclasses.replace(model.family, hf_config=lambda a: {**model.family.hf_config(a), **extra})
    hf_checkpoint.save_hf(out_dir, (family, model.arch, model.params, model.hf_config), dtype=dtype,
                          tokenizer_dir=tokenizer_dir)
    if jax.process_index() == 0:
        names = {"out_kernel": "out.weight", "out_bias": "out.bias",
                 "hidden_kernel": "hidden.weight", "hidden_bias": "hidden.bias"}
        tensors = {names[k]: np.ascontiguousarray(v.T if k.endswith("kernel") else v, dtype=np.float32)
                   for k, v in head.items()}
        save_file(tensors, os.path.join(out_dir, PROBE_HEAD_FILE), metadata={"format": PROBE_FORMAT})
        probe_config = {
            "format": PROBE_FORMAT, "version": 1, "pooling": config.pooling, "head": config.head,
            "head_hidden": config.head_hidden if config.head == "mlp" else None,
            "activation": "gelu" if config.head == "mlp" else None,
            "features": "pooler_output" if uses_pooler(model_type, config) else "last_hidden_state",
            **_labels_config(labels),
        }
        with open(os.path.join(out_dir, PROBE_CONFIG_FILE), "w") as f:
            json.dump(probe_config, f, indent=2, sort_keys=True)
            f.write("\n")
    return {"kind": PROBE_FORMAT, "architecture": model.family.hf_architecture, "dir": str(out_dir)}


# ---------------------------------------------------------------- the loop


@dataclasses.dataclass(frozen=True)
class ProbeResult:
    metrics: dict          # what probe_metrics.json holds
    head: dict             # numpy arrays reading raw features (see head_logits)
    export: dict | None    # {"kind", "architecture", "dir"} or None


def _last_token_is_pad(data: ClassificationArrays, pad_token_id: int) -> bool:
    last = np.maximum(data.attention_mask.sum(1) - 1, 0)
    return bool(np.any(data.input_ids[np.arange(len(last)), last] == pad_token_id))


def run_probe(model: hf_checkpoint.LoadedModel, config: ProbeConfig, train: ClassificationArrays,
              labels: Sequence[str], *, validation: ClassificationArrays | None = None, run_dir: str | None = None,
              dtype=jnp.float32, pad_token_id: int | None = None, steps: int | None = None,
              epochs: int | None = None, batch_size: int = 64, tx: optax.GradientTransformation | None = None,
              learning_rate: float = 1e-3, l2: float = 0.0, seed: int = 0, log_every: int = 10,
              feature_batch_size: int = 32, export: bool = True, export_dtype: str = "float32",
              tokenizer_dir: str | None = None, model_key: str | None = None) -> ProbeResult:
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
                module, model.params, split, pooling=config.pooling, pooled_output=pooled_output,
                model_key=model_key, cache_dir=cache_dir, batch_size=feature_batch_size)
    feature_seconds = time.perf_counter() - t0

    t0 = time.perf_counter()
    head, _ = train_head(feats["train"], train.labels, num_labels, config, bias=head_has_bias(model_type, config),
                         steps=steps, batch_size=batch_size, tx=tx or optax.adamw(learning_rate), l2=l2,
                         seed=seed, log_every=log_every, log=log)
    head_seconds = time.perf_counter() - t0

    majority = int(np.bincount(train.labels, minlength=num_labels).argmax())
    metrics: dict[str, Any] = {}
    for name in feats:
        y = train.labels if name == "train" else validation.labels
        metrics[name] = classification_metrics(y, predict_logits(head, feats[name]).argmax(-1), majority)
    metrics.update(majority_label=labels[majority], steps=steps, pooling=config.pooling, head=config.head,
                   features="pooler_output" if pooled_output else "last_hidden_state",
                   features_from=sources, feature_seconds=round(feature_seconds, 3),
                   head_seconds=round(head_seconds, 3))

    exported = None
    if export and run_dir:
        exact, target = True, exact_target(model_type, config)
        if target is not None and target.pooling == "last":
            if pad_token_id is None:
                raise ValueError(f"exporting a probe as {target.architecture} needs a pad token id "
                                 "(config.json pad_token_id or the tokenizer's)")
            if any(_last_token_is_pad(s, pad_token_id) for s in (train, validation) if s is not None):
                exact = False
                metrics["export_note"] = (
                    f"rows end in the pad token (id {pad_token_id}), where {target.architecture} would read an "
                    f"earlier token: exported in the generic {PROBE_FORMAT} format instead")
        exported = export_probe(os.path.join(run_dir, "export"), model, head, config, labels,
                                pad_token_id=pad_token_id, exact=exact, dtype=export_dtype,
                                tokenizer_dir=tokenizer_dir)
        metrics["export"] = exported
    log({"event": "probe_eval", **{f"{split}/{k}": v for split in ("train", "validation") if split in metrics
                                   for k, v in metrics[split].items()}})
    if run_dir and jax.process_index() == 0:
        with open(os.path.join(run_dir, "probe_metrics.json"), "w") as f:
            json.dump(metrics, f, indent=2, sort_keys=True)
            f.write("\n")
    return ProbeResult(metrics, head, exported)
