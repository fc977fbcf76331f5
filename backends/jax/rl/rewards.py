"""Rewards declared as data: each a kind, a weight and the kind's options, never code.

    exact_match  1 if the normalised completion equals the normalised answer (generate/metrics.py:
                 SQuAD's normalisation: lower case, no punctuation, no articles, single spaces)
    contains     1 if the normalised answer occurs in the normalised completion
    numeric      1 if the last number in the completion equals the answer's number (commas in
                 thousands ignored; "42", "42.0" and "4.2e1" are equal)
    regex        1 if `pattern` is found in the completion (answer formats such as "Answer: \\d+")
    length       1 if the completion's token count is within [min_tokens, max_tokens], else
                 falling linearly to 0 at 0 tokens below or at twice max_tokens above
    json         1 if the completion is a JSON object (surrounding whitespace and a ``` fence
                 allowed) holding every key of `required_keys`
    model        a local HF *ForSequenceClassification directory (`path`) scored in JAX: the
                 probability of `label` (rl/reward_model.py), of the prompt's conversation plus
                 the completion (`text = "conversation"`) or the completion alone ("completion")

A row's reward is sum_k weight_k * reward_k; `score` returns the total and each part (logged as
TRL logs them: rewards/<name>/mean). exact_match, contains and numeric need the row's reference
answer (`needs_answer`); lint refuses them on data without answers. A model reward is scored
in batches by a loaded scorer (`score(..., models={label: reward_model.load(r)})`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from ftc.backends.jax.generate.metrics import RegexTimeout, compile_regex, normalise, search

KINDS = ("exact_match", "contains", "numeric", "regex", "length", "json", "model")
NEEDS_ANSWER = ("exact_match", "contains", "numeric")
_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?|[-+]?\.\d+(?:[eE][-+]?\d+)?")
_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)
FLOAT32_MAX = float(np.finfo(np.float32).max)


class RewardError(ValueError):
    """A reward that cannot be used (not a finite number); the message names the reward and row."""


@dataclasses.dataclass(frozen=True)
class Reward:
    """One declared reward: `name` labels its metric (default: the kind)."""

    kind: str
    weight: float = 1.0
    name: str = ""
    pattern: str | None = None  # regex
    min_tokens: int = 0  # length
    max_tokens: int | None = None  # length
    required_keys: tuple[str, ...] = ()  # json
    path: str | None = None  # model: the classifier's directory
    label_choice: int | str | None = None  # model: the label whose probability is the reward
    text: str = "conversation"  # model: what it scores (reward_model.TEXTS)

    @property
    def label(self) -> str:
        return self.name or self.kind

    @property
    def needs_answer(self) -> bool:
        return self.kind in NEEDS_ANSWER


def parse(entries: Sequence[Mapping], where: str = "rewards") -> tuple[Reward, ...]:
    """Rewards from their declarations (dicts as a spec holds them), with ValueError naming the
    entry's key path and what was expected."""
    out = []
    for i, entry in enumerate(entries):
        at = f"{where}[{i}]"
        kind = entry.get("kind")
        if kind not in KINDS:
            raise ValueError(f"{at}.kind: expected one of {', '.join(KINDS)}, got {kind!r}")
        allowed = {"kind", "weight", "name"} | {
            "regex": {"pattern"},
            "length": {"min_tokens", "max_tokens"},
            "json": {"required_keys"},
            "model": {"path", "label", "text"},
        }.get(kind, set())
        extra = sorted(set(entry) - allowed)
        if extra:
            raise ValueError(f"{at}.{extra[0]}: not a key of a {kind!r} reward (it takes {', '.join(sorted(allowed))})")
        weight = entry.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise ValueError(f"{at}.weight: expected a finite number, got {weight!r}")
        if abs(weight) > FLOAT32_MAX:  # rewards are float32: this weight would make every total inf
            raise ValueError(f"{at}.weight: expected a number within float32's range (|w| <= 3.4e38), got {weight!r}")
        if kind == "regex":
            if not isinstance(entry.get("pattern"), str):
                raise ValueError(f"{at}.pattern: a regex reward needs a pattern (a string)")
            compile_regex(entry["pattern"], f"{at}.pattern")
        if kind == "model" and not isinstance(entry.get("path"), str):
            raise ValueError(f"{at}.path: a model reward needs path (a local *ForSequenceClassification directory)")
        label = entry.get("label")
        if isinstance(label, bool) or not (label is None or isinstance(label, (int, str))):
            raise ValueError(f"{at}.label: expected a label name or index, got {label!r}")
        if entry.get("text", "conversation") not in ("conversation", "completion"):
            raise ValueError(f"{at}.text: expected 'conversation' or 'completion', got {entry.get('text')!r}")
        lo, hi = entry.get("min_tokens", 0), entry.get("max_tokens")
        if kind == "length" and (hi is None or not 0 <= lo <= hi):
            raise ValueError(f"{at}.max_tokens: a length reward needs 0 <= min_tokens <= max_tokens, got {lo}, {hi}")
        out.append(
            Reward(
                kind=kind,
                weight=float(weight),
                name=str(entry.get("name", "")),
                pattern=entry.get("pattern"),
                min_tokens=int(lo),
                max_tokens=None if hi is None else int(hi),
                required_keys=tuple(entry.get("required_keys", ())),
                path=entry.get("path"),
                label_choice=entry.get("label"),
                text=entry.get("text", "conversation"),
            )
        )
    labels = [r.label for r in out]
    if len(set(labels)) != len(labels):
        dup = next(x for x in labels if labels.count(x) > 1)
        raise ValueError(f"{where}: two rewards are named {dup!r}; give each a distinct `name`")
    return tuple(out)


def last_number(text: str) -> float | None:
    """The last number written in `text`, or None."""
    found = _NUMBER.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def _json_object(text: str) -> dict | None:
    text = text.strip()
    fenced = _FENCE.match(text)
    try:
        value = json.loads(fenced.group(1) if fenced else text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def one(reward: Reward, completion: str, tokens: int, answer: str | None) -> float:
    """`reward`'s value (before its weight) for one completion of `tokens` tokens."""
    if reward.needs_answer and answer is None:
        raise ValueError(f"reward {reward.label!r} ({reward.kind}) needs the row's answer, and this row has none")
    if reward.kind == "exact_match":
        return float(normalise(completion) == normalise(answer))
    if reward.kind == "contains":
        return float(normalise(answer) in normalise(completion))
    if reward.kind == "numeric":
        got, want = last_number(completion), last_number(answer)
        return float(got is not None and want is not None and math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-9))
    if reward.kind == "regex":
        return float(search(re.compile(reward.pattern), completion) is not None)  # re caches compiled patterns
    if reward.kind == "length":
        lo, hi = reward.min_tokens, reward.max_tokens
        if lo <= tokens <= hi:
            return 1.0
        return max(0.0, tokens / lo) if tokens < lo else max(0.0, 1.0 - (tokens - hi) / max(hi, 1))
    if reward.kind == "json":
        obj = _json_object(completion)
        return float(obj is not None and all(k in obj for k in reward.required_keys))
    if reward.kind == "model":
        raise ValueError(f"reward {reward.label!r} (model) scores whole batches: pass its scorer to score(models=)")
    raise ValueError(f"unknown reward kind {reward.kind!r}")


def score(
    rewards: Sequence[Reward],
    completions: Sequence[str],
    tokens: Sequence[int],
    answers: Sequence[str | None],
    *,
    conversations: Sequence[Sequence[Mapping]] | None = None,
    models: Mapping[str, Callable] | None = None,
    where: Sequence[str] | None = None,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """([N] weighted totals, {label: [N] unweighted values}) for N completions. A model reward
    takes its scorer from `models` (by label) and each completion's prompt messages from
    `conversations`. A value or total that is not finite raises RewardError naming the reward and
    the completion's prompt (`where[i]`, e.g. file:line; else its index)."""
    name = (lambda i: where[i]) if where is not None else (lambda i: f"completion {i}")
    parts = {}
    for r in rewards:
        if r.kind == "model":
            if not models or r.label not in models or conversations is None:
                raise ValueError(f"reward {r.label!r} (model) needs its loaded scorer and the prompts' conversations")
            parts[r.label] = np.asarray(models[r.label](conversations, completions), np.float32)
        else:
            values = []
            for i, (c, n, a) in enumerate(zip(completions, tokens, answers, strict=True)):
                try:
                    values.append(one(r, c, n, a))
                except RegexTimeout as e:
                    raise RewardError(f"reward {r.label!r} ({r.kind}) on a completion of {name(i)}: {e}") from None
            parts[r.label] = np.array(values, np.float32)
    for r in rewards:
        bad = np.flatnonzero(~np.isfinite(parts[r.label]))
        if bad.size:  # a nan advantage would make the loss nan, and the message advise a lower learning rate
            i = int(bad[0])
            raise RewardError(
                f"reward {r.label!r} ({r.kind}) is {float(parts[r.label][i])} for a completion of {name(i)} "
                f"({bad.size} of {len(completions)} in this rollout); a reward must be a finite number"
                + (": is the reward model's checkpoint damaged?" if r.kind == "model" else "")
            )
    total = np.zeros(len(completions), np.float32)
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow is reported below
        for r in rewards:
            total += np.float32(r.weight) * parts[r.label]
    bad = np.flatnonzero(~np.isfinite(total))
    if bad.size:
        i = int(bad[0])
        raise RewardError(
            f"the weighted reward total is {float(total[i])} for a completion of {name(i)}: the rewards' weights "
            f"times their values pass float32's range (3.4e38); use smaller weights"
        )
    return total, parts


def metrics(total: np.ndarray, parts: Mapping[str, np.ndarray], group_size: int) -> dict[str, float]:
    """TRL's reward metrics: reward and reward_std (mean and Bessel std of the totals over the
    batch), frac_reward_zero_std (share of groups whose rewards are all equal: no signal),
    rewards/<name>/mean and rewards/<name>/std."""
    grouped = total.reshape(-1, group_size)
    out = {"reward": float(total.mean()), "reward_std": float(total.std(ddof=1)) if total.size > 1 else 0.0}
    if group_size > 1:  # PPO samples one completion per prompt: no groups to compare
        out["frac_reward_zero_std"] = float(np.mean(np.isclose(grouped.std(axis=1), 0.0)))
    for label, values in parts.items():
        out[f"rewards/{label}/mean"] = float(values.mean())
        out[f"rewards/{label}/std"] = float(values.std(ddof=1)) if values.size > 1 else 0.0
    return out
