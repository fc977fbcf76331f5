"""The probe's inputs: its config, the frozen model's pooled features (cached) and the HF classes
whose heads it reproduces exactly (see probe.py).

Pooling (`[method].pooling`):
  mean  average of the final hidden states over real tokens;
  last  the final hidden state of the last real token (rows are right-padded);
  cls   the first token. For BERT, "cls" reads the *pooler output* tanh(W h_CLS + b): that is
        what BertForSequenceClassification's classifier reads, so the export is exact.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import os
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

POOLINGS = ("mean", "cls", "last")
HEADS = ("linear", "mlp")


@dataclasses.dataclass(frozen=True)
class ProbeConfig:
    """The spec's [method] keys for kind = "probe" (their defaults are the schema's; head_hidden
    applies to an mlp head only, None otherwise)."""

    pooling: str
    head: str
    head_hidden: int | None = None

    def __post_init__(self):
        if self.pooling not in POOLINGS:
            raise ValueError(f"[method].pooling={self.pooling!r}: expected one of {', '.join(POOLINGS)}")
        if self.head not in HEADS:
            raise ValueError(f"[method].head={self.head!r}: expected one of {', '.join(HEADS)}")
        h = self.head_hidden
        if (self.head == "mlp" or h is not None) and (not isinstance(h, int) or isinstance(h, bool) or h < 1):
            raise ValueError(f"[method].head_hidden={h!r}: expected an integer >= 1")

    @classmethod
    def from_spec(cls, method) -> ProbeConfig:
        """From an ftc.spec MethodSpec (spec validation fills every key that applies)."""
        return cls(method.pooling, method.head, method.head_hidden)


@dataclasses.dataclass(frozen=True)
class SeqClsTarget:
    """A transformers *ForSequenceClassification class whose head ftc's probe reproduces exactly."""

    architecture: str
    pooling: str  # the only pooling it reads
    base_prefix: str  # its base model attribute ("bert", "model", "transformer")
    base_modules: tuple[str, ...]  # the base model's top-level children
    head_name: str  # "classifier" | "score"
    head_bias: bool


_DECODER = ("embed_tokens", "layers", "norm")
SEQ_CLS_TARGETS = {
    "bert": SeqClsTarget(
        "BertForSequenceClassification", "cls", "bert", ("embeddings", "encoder", "pooler"), "classifier", True
    ),
    "llama": SeqClsTarget("LlamaForSequenceClassification", "last", "model", _DECODER, "score", False),
    "mistral": SeqClsTarget("MistralForSequenceClassification", "last", "model", _DECODER, "score", False),
    "qwen2": SeqClsTarget("Qwen2ForSequenceClassification", "last", "model", _DECODER, "score", False),
    "qwen3": SeqClsTarget("Qwen3ForSequenceClassification", "last", "model", _DECODER, "score", False),
    "gemma": SeqClsTarget("GemmaForSequenceClassification", "last", "model", _DECODER, "score", False),
    "gpt2": SeqClsTarget(
        "GPT2ForSequenceClassification", "last", "transformer", ("wte", "wpe", "h", "ln_f"), "score", False
    ),
}
_POOLER_MODEL_TYPES = ("bert",)  # families whose output="pooled" is the HF pooler output


@dataclasses.dataclass(frozen=True)
class ClassificationArrays:
    """Right-padded token rows and their label indices (numpy)."""

    input_ids: np.ndarray  # [N, T] int32
    attention_mask: np.ndarray  # [N, T] int32, 1 on real tokens, left-aligned
    labels: np.ndarray  # [N] int32 in [0, num_labels)

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
    def from_data_rows(cls, rows: dict) -> ClassificationArrays:
        """From the data pipeline's classification arrays (`Datasets.train_rows`): input_ids,
        segment_ids (1 on tokens), labels, and weights (0 marks a padding row, dropped here)."""
        keep = np.asarray(rows["weights"]) > 0 if "weights" in rows else slice(None)
        return cls(
            np.asarray(rows["input_ids"], np.int32)[keep],
            (np.asarray(rows["segment_ids"])[keep] > 0).astype(np.int32),
            np.asarray(rows["labels"], np.int32)[keep],
        )


def uses_pooler(model_type: str, config: ProbeConfig) -> bool:
    return config.pooling == "cls" and model_type in _POOLER_MODEL_TYPES


def pooling_problem(model_type: str, arch, config: ProbeConfig) -> str | None:
    """Why `config.pooling` cannot read this model, or None. Asked before the weights load, so a
    refused probe writes nothing (the model would only fail once the features are computed)."""
    if uses_pooler(model_type, config) and not getattr(arch, "pooler", True):
        return (
            f'[method].pooling="cls" reads {model_type.upper()}\'s pooler output (what *ForSequenceClassification '
            f"classifies), but this checkpoint has no pooler weights (pooler.dense.*; config.json's architectures "
            f'name a head saved without one, e.g. BertForMaskedLM): expected pooling = "mean" or "last", or a '
            f"checkpoint with a pooler (BertModel, BertForSequenceClassification)"
        )
    return None


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


def compute_features(
    module: nn.Module,
    params,
    data: ClassificationArrays,
    *,
    pooling: str,
    pooled_output: bool = False,
    batch_size: int = 32,
) -> np.ndarray:
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
        rows = order[start : start + batch_size]
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


_MEMORY_CACHE: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
_MEMORY_CACHE_SIZE = 8


def cached_features(
    module,
    params,
    data: ClassificationArrays,
    *,
    pooling: str,
    pooled_output: bool,
    model_key: str,
    cache_dir: str | None = None,
    batch_size: int = 32,
) -> tuple[np.ndarray, str]:
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
        feats, where = (
            compute_features(module, params, data, pooling=pooling, pooled_output=pooled_output, batch_size=batch_size),
            "computed",
        )
        if path and jax.process_index() == 0:
            os.makedirs(cache_dir, exist_ok=True)
            tmp = f"{path}.{os.getpid()}.tmp.npy"
            np.save(tmp, feats, allow_pickle=False)
            os.replace(tmp, path)  # atomic: a reader never sees half a file
    _MEMORY_CACHE[key] = feats
    while len(_MEMORY_CACHE) > _MEMORY_CACHE_SIZE:
        _MEMORY_CACHE.popitem(last=False)
    return feats, where
