"""Clean rows before training: exact duplicates, empty rows, unknown roles, over-long sequences.

Two passes, each returning what it kept and a `CleanReport` of counts per reason (the run logs it):
- `clean_rows` on read rows (see data/formats/ for their normalised shapes), in this order per row:
  unknown role (drop, or collect and raise), empty, duplicate. A row dropped for one reason is not
  counted again for a later one.
- `clean_lengths` on tokenised items (data_tokenize): over-long (truncate | drop | split | error), then
  sequences left with nothing to learn (no supervised prediction) are always dropped as "no_target",
  since they would only take room in a batch.

Reasons (keys of `CleanReport.dropped`):
  duplicate          same normalised row as an earlier one (stable hash of canonical JSON)
  in_train           validation row identical to a training row (only with dedupe)
  empty              no content (chat), empty completion/text, an empty chosen/rejected response
  no_assistant_turn  chat with content but no assistant turn to train (none, empty, or weight 0)
  same_pair          preference row whose chosen and rejected responses are identical
  unknown_role       a message role outside `roles` (unknown_roles="drop")
  overlong           more than max_seq_len tokens (overlong="drop"), or nothing supervised left
                     after truncation (overlong="split" cuts chat, completion and text sequences
                     into max_seq_len pieces instead, counted as split; pieces with nothing to
                     predict are no_target)
  no_target          a tokenised sequence with no supervised next-token prediction
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable, Sequence

import numpy as np

from ftc.backends.jax.data import formats
from ftc.backends.jax.data.read import DataError, Row
from ftc.backends.jax.data.tokenize import Labelled, Pair, Tokens

# The data.clean keys (their defaults are the schema's; the spec resolves them).
CLEAN_KEYS = ("dedupe", "drop_empty", "roles", "unknown_roles", "overlong")


@dataclasses.dataclass(frozen=True)
class CleanReport:
    seen: int = 0
    kept: int = 0
    dropped: tuple[tuple[str, int], ...] = ()  # (reason, count), reasons in first-seen order
    truncated: int = 0
    split: int = 0  # sequences cut into max_seq_len pieces (overlong="split")

    @property
    def dropped_by_reason(self) -> dict[str, int]:
        return dict(self.dropped)

    def then(self, later: CleanReport) -> CleanReport:
        """This pass followed by `later` (which saw what this one kept)."""
        counts = dict(self.dropped)
        for reason, n in later.dropped:
            counts[reason] = counts.get(reason, 0) + n
        return CleanReport(
            self.seen, later.kept, tuple(counts.items()), self.truncated + later.truncated, self.split + later.split
        )

    def summary(self) -> str:
        parts = [f"kept {self.kept} of {self.seen}"]
        parts += [f"{n} {reason}" for reason, n in self.dropped if n]
        if self.truncated:
            parts.append(f"{self.truncated} truncated")
        if self.split:
            parts.append(f"{self.split} split into max_seq_len pieces")
        return ", ".join(parts)


def _report(seen: int, kept: int, counts: dict[str, int], truncated: int = 0, split: int = 0) -> CleanReport:
    return CleanReport(seen, kept, tuple((r, n) for r, n in counts.items() if n), truncated, split)


def row_hash(data: dict) -> str:
    """Stable across runs and machines: canonical JSON of the normalised row."""
    canonical = json.dumps(data, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.blake2b(canonical.encode("utf-8"), digest_size=16).hexdigest()


def clean_rows(
    rows: Sequence[Row],
    *,
    format: str,
    dedupe: bool,
    drop_empty: bool,
    roles: Iterable[str],
    unknown_roles: str,
    train_on: str | None = None,
    exclude: Iterable[str] = (),
) -> tuple[list[Row], CleanReport]:
    """Rows kept, in order, and the counts of those dropped. `exclude` holds `row_hash`es of rows
    that must not appear (the training rows, when cleaning a validation file). `train_on` is
    data.train_on, for the formats it applies to (None for the others)."""
    fmt = formats.get(format)
    fmt.check_train_on(train_on)
    if unknown_roles not in ("drop", "error"):
        raise ValueError(f"unknown_roles {unknown_roles!r} is not 'drop' or 'error'")
    roles = frozenset(roles)
    exclude = frozenset(exclude)
    seen_hashes: set[str] = set()
    counts = dict.fromkeys(("unknown_role", "empty", "no_assistant_turn", "same_pair", "duplicate", "in_train"), 0)
    bad_roles, kept = [], []
    for row in rows:
        unknown = sorted({m["role"] for m in fmt.messages(row.data)} - roles)
        if unknown:
            if unknown_roles == "error":
                bad_roles.append(
                    f"{row.where}: role {', '.join(map(repr, unknown))} is not one of "
                    f"{', '.join(map(repr, sorted(roles)))}"
                )
            counts["unknown_role"] += 1
            continue
        if drop_empty:
            reason = fmt.empty_reason(row.data, train_on)
            if reason:
                counts[reason] += 1
                continue
        if dedupe:
            h = row_hash(row.data)
            if h in exclude:
                counts["in_train"] += 1
                continue
            if h in seen_hashes:
                counts["duplicate"] += 1
                continue
            seen_hashes.add(h)
        kept.append(row)
    if bad_roles:
        raise DataError(
            f"{len(bad_roles)} row(s) with unknown message roles (add them to "
            f'data.clean.roles, or set data.clean.unknown_roles = "drop")',
            bad_roles,
        )
    return kept, _report(len(rows), len(kept), counts)


# ---------------------------------------------------------------------------- lengths

Item = Tokens | Pair | Labelled


def clean_lengths(items: Sequence[Item], *, max_seq_len: int, overlong: str) -> tuple[list[Item], CleanReport]:
    """Items no longer than `max_seq_len` tokens (each side of a pair), and the counts."""
    if overlong not in OVERLONG:
        raise ValueError(f"overlong {overlong!r} is not one of {', '.join(map(repr, OVERLONG))}")
    counts = {"overlong": 0, "no_target": 0}
    truncated, split, too_long, kept = 0, 0, [], []
    for item in items:
        n = _length(item)
        if n > max_seq_len and overlong == "split":
            pieces = _split(item, max_seq_len)
            split += 1
            kept += [p for p in pieces if _has_target(p)]
            counts["no_target"] += sum(not _has_target(p) for p in pieces)
            continue
        if n > max_seq_len:
            if overlong == "error":
                too_long.append(f"{item.where}: {n} tokens, more than max_seq_len = {max_seq_len}")
                continue
            if overlong == "drop":
                counts["overlong"] += 1
                continue
            item = _truncate(item, max_seq_len)
            if not _has_target(item):
                counts["overlong"] += 1
                continue
            truncated += 1
        if not _has_target(item):
            counts["no_target"] += 1
            continue
        kept.append(item)
    if too_long:
        raise DataError(
            f"{len(too_long)} sequence(s) longer than model.max_seq_len (set "
            f'data.clean.overlong = "truncate" or "drop", or raise max_seq_len)',
            too_long,
        )
    return kept, _report(len(items), len(kept), counts, truncated, split)


OVERLONG = ("truncate", "drop", "split", "error")


def _split(item: Item, n: int) -> list[Tokens]:
    """An LM sequence as consecutive pieces of at most n tokens, each trained on its own tokens
    (the first token of a piece is predicted from nothing, as any sequence's first)."""
    if not isinstance(item, Tokens):
        raise DataError(
            f"{item.where}: {_length(item)} tokens, more than max_seq_len = {n}, and data.clean.overlong = 'split' "
            "splits chat, completion and text sequences only; expected 'truncate' or 'drop' for this format"
        )
    count = -(-len(item.ids) // n)
    return [
        Tokens(
            f"{item.where} (part {k + 1} of {count})", item.ids[k * n : (k + 1) * n], item.weights[k * n : (k + 1) * n]
        )
        for k in range(count)
    ]


def _length(item: Item) -> int:
    if isinstance(item, Pair):
        return max(len(item.chosen.ids), len(item.rejected.ids))
    return len(item.ids)


def _cut(t: Tokens, n: int) -> Tokens:
    return dataclasses.replace(t, ids=t.ids[:n], weights=t.weights[:n])


def _truncate(item: Item, n: int) -> Item:
    if isinstance(item, Pair):
        return dataclasses.replace(item, chosen=_cut(item.chosen, n), rejected=_cut(item.rejected, n))
    if isinstance(item, Tokens):
        return _cut(item, n)
    return dataclasses.replace(item, ids=item.ids[:n])


def _predicts(t: Tokens) -> bool:
    # weights[0] is never used: no token comes before the first to predict it from.
    return bool(np.any(t.weights[1:] > 0))


def _has_target(item: Item) -> bool:
    if isinstance(item, Pair):
        return _predicts(item.chosen) and _predicts(item.rejected)
    if isinstance(item, Tokens):
        return _predicts(item)
    return len(item.ids) > 0
