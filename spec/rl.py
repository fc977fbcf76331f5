"""Lint rules of the online RL objectives (training.objective = "grpo" or "ppo"), over a
default-filled spec dict: (key path, message, severity) for each problem, as targets.py gives
them. Each objective's keys carry its name as a prefix (grpo_rewards, ppo_rewards, ...), so one
set of rules serves both.

Checked here rather than by the schema: rules across keys (batch_size a multiple of the group
size, a prompt plus <objective>_max_new_tokens within model.max_seq_len), a reward's options (a regex
that compiles, a length range), and a reward that needs the row's answer against the training
rows when they are local JSONL files (a row without "answer" is named by file:line), and a
`model` reward's directory (there, a *ForSequenceClassification config.json without custom code,
safetensors weights, a `label` that fits its labels: `label_index`, which the backend uses too).
Never imports jax: `ftc lint` stays light.
"""

from __future__ import annotations

import glob
import json
import math
import os
import re

from ftc.spec.local_files import value_at

NEEDS_ANSWER = ("exact_match", "contains", "numeric")  # backends/jax/rl/rewards.py
ANSWER_FORMATS = ("prompt",)  # data formats whose rows carry a reference answer ("answer")
OPTIONS = {
    "regex": {"pattern"},
    "length": {"min_tokens", "max_tokens"},
    "json": {"required_keys"},
    "model": {"path", "label", "text"},
}
SEQ_CLS_SUFFIX = "ForSequenceClassification"
SHOWN_ROWS = 3  # rows without an answer named in the message
RL_OBJECTIVES = ("grpo", "ppo")  # their keys: training.<objective>_*
FLOAT32_MAX = 3.4028234663852886e38  # rewards are float32 (backends/jax/rl/rewards.py)


def issues(s: dict) -> list[tuple[tuple, str, str]]:
    objective = value_at(s, ("training", "objective"))
    if objective not in RL_OBJECTIVES:
        return []
    p = objective + "_"
    t = s.get("training", {})
    out: list[tuple[tuple, str, str]] = []

    def add(path, message):
        out.append((("training", *path), message, "error"))

    # An RL run has no validation pass yet (rl/loop.py: the rewards are its measure); these keys
    # were accepted and then ignored, so a run asked to validate every N steps never did.
    data = s.get("data") if isinstance(s.get("data"), dict) else {}
    evals = s.get("eval") if isinstance(s.get("eval"), dict) else {}
    not_yet = (
        f"training.objective = {objective!r} has no validation pass yet (its rewards are the run's measure); remove it"
    )
    for path, given in (
        (("data", "validation"), data.get("validation") is not None),
        (("data", "validation_split"), bool(data.get("validation_split"))),
        (("training", "eval_every"), bool(t.get("eval_every"))),
        (("eval", "samples"), bool(evals.get("samples"))),
    ):
        if given:
            out.append((path, not_yet, "error"))
    group, batch = t.get(p + "group_size"), t.get("batch_size")  # PPO has no groups
    # A group of one (no comparison, no advantage) is the schema's minimum: its message names the key.
    if isinstance(group, int) and group >= 2 and isinstance(batch, int) and batch % group:
        add(("batch_size",), f"batch_size counts completions: it must be a multiple of grpo_group_size ({group})")
    new, seq = t.get(p + "max_new_tokens"), value_at(s, ("model", "max_seq_len"))
    if isinstance(new, int) and isinstance(seq, int) and new >= seq:
        add((p + "max_new_tokens",), f"{new} new tokens leave no room for a prompt in model.max_seq_len ({seq})")
    rewards = t.get(p + "rewards") or []
    rewards = rewards if isinstance(rewards, list) else []  # another type: the schema's to report
    if not rewards:
        example = '[{kind = "numeric"}]'
        add((p + "rewards",), f"{objective.upper()} needs at least one reward, e.g. {example} (rewards are data)")
    labels = []
    for i, r in enumerate(rewards):
        if not isinstance(r, dict) or not isinstance(r.get("kind"), str):
            continue  # not a table, or a kind that is no string: the schema's to report
        kind, at = r.get("kind"), (p + "rewards", i)
        labels.append(r.get("name") if isinstance(r.get("name"), str) and r.get("name") else kind)
        extra = sorted(set(r) - {"kind", "weight", "name"} - OPTIONS.get(kind, set()))
        if extra:
            add((*at, extra[0]), f"not an option of a {kind!r} reward")
        weight = r.get("weight")
        if isinstance(weight, (int, float)) and not isinstance(weight, bool) and FLOAT32_MAX < abs(weight) < math.inf:
            # rewards are float32 (rl/rewards.py): every weighted total would be inf, every advantage nan
            add((*at, "weight"), f"expected a number within float32's range (|w| <= 3.4e38), got {weight!r}")
        # An option of the wrong type is the schema's to report (once); these rules see the rest.
        if kind == "regex":
            if r.get("pattern") is None:
                add((*at, "pattern"), "a regex reward needs a pattern (a string)")
            elif isinstance(r["pattern"], str):
                try:
                    re.compile(r["pattern"])
                except re.error as e:
                    add((*at, "pattern"), f"not a valid regular expression: {e}")
        if kind == "length":
            lo, hi = r.get("min_tokens", 0), r.get("max_tokens")
            if hi is None:
                add((*at, "max_tokens"), "a length reward needs min_tokens <= max_tokens; max_tokens is missing")
            elif _is_number(lo) and _is_number(hi) and lo > hi:
                add((*at, "max_tokens"), f"a length reward needs min_tokens <= max_tokens, got {lo}, {hi}")
        if kind == "model":
            for key, message in model_reward_problems(r):
                add((*at, key), message)
        if kind in NEEDS_ANSWER:
            why = _answer_problem(s)
            if why:
                add((*at, "kind"), f"a {kind!r} reward compares with the row's reference answer, but {why}")
    dup = next((x for x in labels if labels.count(x) > 1), None)
    if dup:
        add((p + "rewards",), f"two rewards are named {dup!r}; give each a distinct `name`")
    return out


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)  # 3.0 is an integer to the schema


def _answer_problem(s: dict) -> str | None:
    """Why the training rows have no reference answer to compare with, or None."""
    fmt = value_at(s, ("data", "format"))
    if fmt not in ANSWER_FORMATS:
        return f"data.format {fmt!r} has no answer field (use {' or '.join(map(repr, ANSWER_FORMATS))})"
    train = value_at(s, ("data", "train"))
    sources = [train] if isinstance(train, str) else [x for x in train or () if isinstance(x, str)]
    missing = []
    for source in sources:
        for path in sorted(glob.glob(source, recursive=True)) if source.endswith((".jsonl", ".json")) else ():
            missing += _rows_without_answer(path)
    if not missing:
        return None
    shown = ", ".join(missing[:SHOWN_ROWS]) + (f" and {len(missing) - SHOWN_ROWS} more" if len(missing) > 3 else "")
    return f'{len(missing)} training row(s) have no "answer": {shown}'


def _rows_without_answer(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8-sig") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError):
        return []  # unreadable data is reported when it is read; here only answers are checked
    out = []
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line) if line.strip() else {"answer": ""}
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("answer") is None:
            out.append(f"{path}:{number}")
    return out


# ---------------------------------------------------------------- the model reward


def num_labels(config: dict) -> int:
    """A classifier config.json's label count, as transformers reads it (id2label, else num_labels, else 2)."""
    id2label = config.get("id2label")
    if isinstance(id2label, dict) and id2label:
        return len(id2label)
    n = config.get("num_labels", 2)
    return n if isinstance(n, int) and not isinstance(n, bool) and n >= 1 else 2


def label_index(config: dict, label) -> int:
    """The index of the label whose probability a model reward is, from `label` (an index, or a
    name in config.json's id2label): by default the last of two labels (a binary classifier's
    positive class); with one label its logit is the reward (index 0); with more, `label` is
    required. ValueError saying what fits."""
    n = num_labels(config)
    id2label = config.get("id2label") if isinstance(config.get("id2label"), dict) else {}
    names = [str(id2label.get(str(i), id2label.get(i, f"LABEL_{i}"))) for i in range(n)]
    shown = ", ".join(f"{i} = {name!r}" for i, name in enumerate(names))
    if label is None:
        if n <= 2:
            return n - 1
        raise ValueError(f"the model has {n} labels ({shown}): name the one whose probability is the reward (label)")
    if isinstance(label, bool) or not isinstance(label, (int, str)):
        raise ValueError(f"label {label!r}: expected a label name or an index ({shown})")
    if isinstance(label, int):
        if not 0 <= label < n:
            raise ValueError(f"label {label} is not an index of the model's {n} label(s) ({shown})")
        return label
    if label not in names:
        raise ValueError(f"label {label!r} is not one of the model's labels ({shown})")
    return names.index(label)


def model_reward_problems(r: dict) -> list[tuple[str, str]]:
    """(option, message) for a `model` reward whose directory cannot be scored with (no jax)."""
    path = r.get("path")
    if path is None or isinstance(path, str) and path and not path.strip():
        return [("path", "a model reward needs path: a local *ForSequenceClassification directory")]
    if not isinstance(path, str) or not path:
        return []  # a path of the wrong type, or empty: the schema says so (as it does of a bad `text`)
    out = []
    config_path = os.path.join(path, "config.json")
    if not os.path.isdir(path):
        return out + [("path", f"no such directory: {path}")]
    if not os.path.isfile(config_path):
        return out + [("path", f"{path}: no config.json (expected a Hugging Face *{SEQ_CLS_SUFFIX} directory)")]
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        return out + [("path", f"{config_path}: cannot read a config.json ({e})")]
    if not isinstance(config, dict):
        return out + [("path", f"{config_path}: expected a JSON object")]
    if "auto_map" in config or config.get("trust_remote_code"):
        return out + [("path", f"{config_path}: asks for custom model code (auto_map); ftc never runs it")]
    archs = config.get("architectures") or []
    if not any(isinstance(a, str) and a.endswith(SEQ_CLS_SUFFIX) for a in archs):
        out.append(("path", f"{config_path} names {archs or 'no architectures'}, not a *{SEQ_CLS_SUFFIX} model"))
        return out
    if not any(os.path.exists(os.path.join(path, f)) for f in ("model.safetensors", "model.safetensors.index.json")):
        out.append(("path", f"{path}: no model.safetensors (ftc reads safetensors only, never pickle)"))
    try:
        label_index(config, r.get("label"))
    except ValueError as e:
        out.append(("label", str(e)))
    return out
