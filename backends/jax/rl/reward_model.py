"""The `model` reward: a local HF *ForSequenceClassification directory (config.json + safetensors,
e.g. what ftc's probe exports) loaded into ftc's own model families and scored in JAX.

    scorer = load(reward)                                  # a rewards.Reward of kind "model"
    values_N = scorer(conversations, completions)         # [N] float32, one per completion

What it reads, as transformers' classes do (probe_features.SEQ_CLS_TARGETS): BERT's pooler
output through `classifier` (with bias); a decoder's final hidden state at the last token that is
not config.json's pad_token_id (the last token when there is none) through the bias-free `score`.

The text scored: with `text = "conversation"` (the default) the prompt's messages plus the
completion as the assistant's turn, through the reward tokenizer's chat template when it has one
(tokenised without adding special tokens again, as TRL's GRPOTrainer does), otherwise the
messages' contents and the completion joined by blank lines and tokenised with the tokenizer's
special tokens (BERT's [CLS] ... [SEP]); with `text = "completion"` the completion alone. Texts
longer than the model's max_position_embeddings are cut (the tokenizer's truncation side).

The value (spec/rl.py's `label_index` resolves `label` against config.json): with one label, its
logit (a Bradley-Terry reward model's score, as TRL uses it); otherwise the probability of the
chosen label -- a softmax over the labels, or the label's sigmoid when config.json's problem_type
is multi_label_classification (transformers' text-classification pipeline does the same).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ftc.backends.jax.io import hf_checkpoint
from ftc.backends.jax.io.safetensors_read import SafetensorsCheckpoint
from ftc.backends.jax.methods.probe_features import SEQ_CLS_TARGETS, SeqClsTarget
from ftc.backends.jax.stages import load_tokenizer, nonfinite_paths
from ftc.spec.rl import label_index, num_labels

TEXTS = ("conversation", "completion")
ROWS = 8  # rows per scoring call: one compiled shape per length bucket


class RewardModelError(ValueError):
    """A reward model directory ftc cannot score with (message names the directory and why)."""


@dataclasses.dataclass(frozen=True)
class Head:
    kernel_DC: np.ndarray  # float32
    bias_C: np.ndarray | None
    reads: str  # "pooled" (BERT's pooler output) | "last" (the last non-pad token's hidden state)


def target_of(config: dict, where: str) -> SeqClsTarget:
    """The transformers class config.json names, if ftc reproduces its head."""
    model_type, archs = config.get("model_type"), config.get("architectures") or []
    target = SEQ_CLS_TARGETS.get(model_type)
    if target is None or target.architecture not in archs:
        known = ", ".join(t.architecture for t in SEQ_CLS_TARGETS.values())
        raise RewardModelError(
            f"{where}: config.json names {archs or 'no architectures'} (model_type {model_type!r}); "
            f"a model reward reads one of {known}"
        )
    return target


def read_head(model_dir: Path, target: SeqClsTarget, labels: int, hidden: int) -> Head:
    checkpoint = SafetensorsCheckpoint(model_dir)
    name = f"{target.head_name}.weight"
    if name not in checkpoint.where:
        raise RewardModelError(f"{model_dir}: no {name} tensor (the classification head {target.architecture} reads)")
    weight_CD = np.asarray(checkpoint.get(name), np.float32)
    if weight_CD.shape != (labels, hidden):
        raise RewardModelError(
            f"{model_dir}: {name} has shape {list(weight_CD.shape)}, but config.json implies [{labels}, {hidden}]"
        )
    bias = f"{target.head_name}.bias"
    bias_C = np.asarray(checkpoint.get(bias), np.float32) if target.head_bias and bias in checkpoint.where else None
    if target.head_bias and bias_C is None:
        raise RewardModelError(f"{model_dir}: no {bias} tensor ({target.architecture}'s head has a bias)")
    return Head(np.ascontiguousarray(weight_CD.T), bias_C, "pooled" if target.pooling == "cls" else "last")


def last_read_positions(ids_NT: np.ndarray, lengths_N: np.ndarray, pad_id: int | None) -> np.ndarray:
    """Where a decoder's classifier reads each right-padded row, as transformers does: the last
    position whose token is not pad_id (0 when all are), or the last real token without a pad id."""
    if pad_id is None:
        return np.maximum(lengths_N - 1, 0)
    T = ids_NT.shape[1]
    real_NT = (ids_NT != pad_id) & (np.arange(T)[None, :] < lengths_N[:, None])
    return (np.arange(T)[None, :] * real_NT).argmax(axis=1)


def _bucket(length: int, cap: int) -> int:
    return min(max(16, 1 << (length - 1).bit_length()), cap)


class RewardModel:
    """A loaded reward model: `self(conversations, completions)` -> [N] float32 rewards."""

    def __init__(self, model_dir: str, label: int | str | None = None, text: str = "conversation"):
        if text not in TEXTS:
            raise RewardModelError(f"text={text!r}: expected one of {', '.join(TEXTS)}")
        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise RewardModelError(f"{model_dir}: not a directory (a model reward's path is a local HF directory)")
        config = hf_checkpoint.read_hf_config(model_dir)
        target = target_of(config, str(model_dir))
        try:
            self.label = label_index(config, label)
        except ValueError as e:
            raise RewardModelError(f"{model_dir}: {e}") from None
        # A *ForSequenceClassification decoder has no LM head: read it as a tied one (its hidden
        # states, all the classifier reads, do not depend on the head).
        reads_hidden = target.pooling != "cls"
        self.loaded = hf_checkpoint.load_model(
            model_dir, hf_config={**config, "tie_word_embeddings": True} if reads_hidden else config
        )
        hidden = int(config.get("hidden_size") or config.get("n_embd"))
        self.labels = num_labels(config)
        self.head = read_head(model_dir, target, self.labels, hidden)
        # A damaged checkpoint: said here, by tensor, rather than as a nan reward at the first rollout.
        bad = nonfinite_paths(self.loaded.params) + [
            f"{target.head_name}.{name}"
            for name, x in (("weight", self.head.kernel_DC), ("bias", self.head.bias_C))
            if x is not None and not np.isfinite(x).all()
        ]
        if bad:
            raise RewardModelError(f"{model_dir}: the weights hold nan or inf in {', '.join(bad[:3])}: corrupted?")
        self.tokenizer = load_tokenizer(model_dir)
        self.text = text
        self.sigmoid = config.get("problem_type") == "multi_label_classification"
        pad = config.get("pad_token_id")
        self.pad_id = None if pad is None else int(pad)
        self.max_len = int(config.get("max_position_embeddings") or config.get("n_positions") or 1 << 30)
        self._logits = jax.jit(self._logits_fn)

    # ------------------------------------------------------------ text -> ids

    def texts(self, conversations: Sequence[Sequence[dict]], completions: Sequence[str]) -> list[tuple[str, bool]]:
        """(text, add_special_tokens) of each completion (module docstring)."""
        out = []
        template = getattr(self.tokenizer, "chat_template", None)
        for messages, completion in zip(conversations, completions, strict=True):
            if self.text == "completion":
                out.append((completion, True))
            elif template:
                turns = [{"role": m["role"], "content": m["content"]} for m in messages]
                turns.append({"role": "assistant", "content": completion})
                out.append((self.tokenizer.apply_chat_template(turns, tokenize=False), False))
            else:
                out.append(("\n\n".join([*(m["content"] for m in messages), completion]), True))
        return out

    def encode(self, conversations, completions) -> list[dict]:
        rows = []
        for text, special in self.texts(conversations, completions):
            enc = self.tokenizer(text, add_special_tokens=special, truncation=True, max_length=self.max_len)
            ids = list(enc["input_ids"]) or [self.pad_id or 0]
            types = list(enc.get("token_type_ids") or [0] * len(ids))[: len(ids)]
            rows.append({"ids": ids, "types": types})
        return rows

    # ------------------------------------------------------------ scoring

    def _logits_fn(self, params, ids_BT, mask_BT, types_BT, read_B):
        module = self.loaded.family.build(self.loaded.arch, jnp.float32)
        if self.head.reads == "pooled":  # BERT: token types from the tokenizer (a single text: zeros)
            feats_BD = module.apply(
                {"params": params}, ids_BT, attention_mask=mask_BT, token_type_ids=types_BT, output="pooled"
            )
        else:
            hidden_BTD = module.apply({"params": params}, ids_BT, attention_mask=mask_BT, output="hidden")
            feats_BD = jnp.take_along_axis(hidden_BTD, read_B[:, None, None], axis=1)[:, 0]
        logits_BC = feats_BD.astype(jnp.float32) @ self.head.kernel_DC
        return logits_BC if self.head.bias_C is None else logits_BC + self.head.bias_C

    def logits(self, rows: Sequence[dict]) -> np.ndarray:
        """[N, C] float32 class logits of encoded rows, ROWS at a time, lengths bucketed."""
        out = np.zeros((len(rows), self.labels), np.float32)
        order = np.argsort([len(r["ids"]) for r in rows], kind="stable")
        for start in range(0, len(order), ROWS):
            picked = list(order[start : start + ROWS])
            T = _bucket(max(len(rows[i]["ids"]) for i in picked), self.max_len)
            ids = np.full((ROWS, T), self.pad_id or 0, np.int32)
            types = np.zeros((ROWS, T), np.int32)
            lengths = np.ones(ROWS, np.int32)
            for j, i in enumerate(picked + [picked[0]] * (ROWS - len(picked))):  # fill: a repeated row
                n = len(rows[i]["ids"])
                ids[j, :n], types[j, :n], lengths[j] = rows[i]["ids"], rows[i]["types"], n
            mask = (np.arange(T)[None, :] < lengths[:, None]).astype(np.int32)
            read = last_read_positions(ids, lengths, self.pad_id).astype(np.int32)
            logits = np.asarray(self._logits(self.loaded.params, ids, mask, types, read))
            out[picked] = logits[: len(picked)]
        return out

    def values(self, logits_NC: np.ndarray) -> np.ndarray:
        """The reward of each row from its class logits (module docstring)."""
        logits_NC = logits_NC.astype(np.float64)
        if self.labels == 1:
            return logits_NC[:, 0].astype(np.float32)
        if self.sigmoid:
            return (1.0 / (1.0 + np.exp(-logits_NC[:, self.label]))).astype(np.float32)
        shifted = logits_NC - logits_NC.max(axis=1, keepdims=True)
        probs = np.exp(shifted) / np.exp(shifted).sum(axis=1, keepdims=True)
        return probs[:, self.label].astype(np.float32)

    def __call__(self, conversations: Sequence[Sequence[dict]], completions: Sequence[str]) -> np.ndarray:
        if not completions:
            return np.zeros(0, np.float32)
        return self.values(self.logits(self.encode(conversations, completions)))


def load(reward: Any) -> RewardModel:
    """The scorer of a rewards.Reward of kind "model"."""
    return RewardModel(reward.path, reward.label_choice, reward.text)
