"""Generation metrics: a prediction scored against its reference answer, 1.0 / 0.0 per row (ROUGE-L
an F-measure in [0, 1]), averaged over the rows that have a reference.

  exact_match   normalised prediction == normalised reference (SQuAD's normalisation: lower case,
                no punctuation, no articles a/an/the, single spaces)
  contains      the normalised reference occurs in the normalised prediction
  regex         with a pattern: it is found in the prediction; a pattern with a group must capture
                text equal to the reference (normalised), e.g. "answer: (\\d+)" extracts a number
  rouge_l       ROUGE-L F-measure (Google's rouge-score package, its default tokenizer, no stemming)
"""

from __future__ import annotations

import functools
import re
import signal
import string
import threading
from collections.abc import Sequence

METRICS = ("exact_match", "contains", "rouge_l")  # and "regex" when a pattern is given
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalise(text: str) -> str:
    text = text.lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


# A pattern is data (a spec's reward, a flag): one that backtracks exponentially, such as (a|aa)+$,
# would hold a run for hours on one completion. re checks for signals as it matches, so an alarm stops
# it with re's own meaning kept (the `regex` package's time limit reads [[:alpha:]] and a{e<=1} otherwise).
SEARCH_SECONDS = 1.0


class RegexTimeout(ValueError):
    pass


class _Expired(Exception):
    pass


def compile_regex(pattern: str | None, where: str = "--regex") -> re.Pattern | None:
    """The pattern compiled, or ValueError naming where it came from and why it is not valid."""
    if pattern is None:
        return None
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ValueError(f"{where} {pattern!r} is not a valid regular expression: {e}") from None


def search(compiled: re.Pattern, text: str) -> re.Match | None:
    """`compiled.search(text)`; RegexTimeout past SEARCH_SECONDS (in the main thread, where a signal
    can stop it; elsewhere without a limit)."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        return compiled.search(text)

    def expire(signum, frame):
        raise _Expired

    previous = signal.signal(signal.SIGALRM, expire)
    try:
        signal.setitimer(signal.ITIMER_REAL, SEARCH_SECONDS)
        try:
            return compiled.search(text)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except _Expired:
        raise RegexTimeout(
            f"the pattern {compiled.pattern!r} took over {SEARCH_SECONDS:g} s on a text of {len(text)} characters "
            "(a repetition of overlapping choices such as (a|aa)+ backtracks exponentially): simplify it"
        ) from None
    finally:
        signal.signal(signal.SIGALRM, previous)


@functools.cache
def _rouge():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def score(prediction: str, reference: str, pattern: re.Pattern | None = None) -> dict[str, float]:
    """Every metric of one prediction against its reference."""
    p, r = normalise(prediction), normalise(reference)
    out = {
        "exact_match": float(p == r),
        "contains": float(r in p),
        "rouge_l": float(_rouge().score(reference, prediction)["rougeL"].fmeasure),
    }
    if pattern is not None:
        m = search(pattern, prediction)
        out["regex"] = float(m is not None and (pattern.groups == 0 or normalise(m.group(1) or "") == r))
    return out


def mean_scores(rows: Sequence[dict[str, float]]) -> dict[str, float]:
    """The average of each metric over the scored rows (empty when there are none)."""
    if not rows:
        return {}
    return {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
