"""backends/jax/rl/rewards.py: each reward kind on the cases that decide it, weights and parts,
TRL's metric names, and refusals that name the key path."""

from __future__ import annotations

import numpy as np
import pytest

from ftc.backends.jax.rl import rewards as rw


def _one(entry: dict, completion: str, answer: str | None = None, tokens: int = 5) -> float:
    (reward,) = rw.parse([entry])
    return rw.one(reward, completion, tokens, answer)


@pytest.mark.parametrize(
    ("completion", "answer", "want"),
    [("The Paris.", "paris", 1.0), ("Paris, France", "Paris", 0.0), ("", "x", 0.0)],
)
def test_exact_match_compares_normalised_text(completion, answer, want):
    assert _one({"kind": "exact_match"}, completion, answer) == want


def test_contains_finds_the_normalised_answer():
    assert _one({"kind": "contains"}, "I think it is PARIS!", "Paris") == 1.0
    assert _one({"kind": "contains"}, "I think it is Lyon", "Paris") == 0.0


@pytest.mark.parametrize(
    ("completion", "answer", "want"),
    [
        ("3 + 4 = 7. Answer: 7", "7", 1.0),
        ("first 7 then 8", "7", 0.0),  # the last number counts
        ("It is 1,234.", "1234", 1.0),
        ("-2.50", "-2.5", 1.0),
        ("4.2e1", "42", 1.0),
        ("no number here", "3", 0.0),
        ("12", "answer: 12", 1.0),  # the answer's own last number
    ],
)
def test_numeric_compares_the_last_number(completion, answer, want):
    assert _one({"kind": "numeric"}, completion, answer) == want


def test_regex_searches_the_pattern():
    entry = {"kind": "regex", "pattern": r"Answer: -?\d+$"}
    assert _one(entry, "so... Answer: 12") == 1.0
    assert _one(entry, "answer 12") == 0.0


def test_length_is_one_inside_the_range_and_falls_linearly_outside():
    entry = {"kind": "length", "min_tokens": 4, "max_tokens": 10}
    assert [_one(entry, "", tokens=n) for n in (0, 2, 4, 10, 15, 20, 40)] == [0.0, 0.5, 1.0, 1.0, 0.5, 0.0, 0.0]


def test_json_needs_an_object_with_the_required_keys():
    entry = {"kind": "json", "required_keys": ["answer"]}
    assert _one(entry, '{"answer": 3}') == 1.0
    assert _one(entry, '```json\n{"answer": 3, "why": "x"}\n```') == 1.0
    assert _one(entry, '{"result": 3}') == 0.0
    assert _one(entry, "[1, 2]") == 0.0
    assert _one(entry, "{not json") == 0.0
    assert _one({"kind": "json"}, "{}") == 1.0


def test_score_weights_the_parts_and_metrics_use_trls_names():
    rewards = rw.parse(
        [
            {"kind": "numeric", "weight": 2.0},
            {"kind": "regex", "pattern": r"^Answer: ", "name": "format", "weight": 0.5},
        ]
    )
    completions = ["Answer: 7", "7", "Answer: 8", "eight"]
    total, parts = rw.score(rewards, completions, [3, 1, 3, 1], ["7", "7", "7", "7"])
    np.testing.assert_allclose(parts["numeric"], [1, 1, 0, 0])
    np.testing.assert_allclose(parts["format"], [1, 0, 1, 0])
    np.testing.assert_allclose(total, [2.5, 2.0, 0.5, 0.0])
    m = rw.metrics(total, parts, group_size=2)
    assert m["reward"] == pytest.approx(1.25)
    assert m["reward_std"] == pytest.approx(np.std([2.5, 2.0, 0.5, 0.0], ddof=1))
    assert m["rewards/numeric/mean"] == 0.5 and m["rewards/format/mean"] == 0.5
    assert m["frac_reward_zero_std"] == 0.0


def test_an_answer_needing_reward_refuses_a_row_without_an_answer():
    (reward,) = rw.parse([{"kind": "numeric"}])
    assert reward.needs_answer
    with pytest.raises(ValueError, match="needs the row's answer"):
        rw.one(reward, "7", 1, None)


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([{"kind": "python", "code": "1"}], r"rewards\[0\]\.kind: expected one of exact_match"),
        ([{"kind": "regex"}], r"rewards\[0\]\.pattern: a regex reward needs a pattern"),
        ([{"kind": "regex", "pattern": "("}], r"rewards\[0\]\.pattern '\(' is not a valid regular expression"),
        ([{"kind": "numeric", "pattern": "x"}], r"rewards\[0\]\.pattern: not a key of a 'numeric' reward"),
        ([{"kind": "length", "min_tokens": 5}], r"rewards\[0\]\.max_tokens: a length reward needs"),
        ([{"kind": "contains", "weight": "high"}], r"rewards\[0\]\.weight: expected a finite number"),
        ([{"kind": "contains"}, {"kind": "contains"}], "two rewards are named 'contains'"),
        ([{"kind": "contains", "weight": 1e39}], r"rewards\[0\]\.weight: expected a number within float32's range"),
    ],
)
def test_bad_declarations_are_refused_with_their_key_path(entries, message):
    with pytest.raises(ValueError, match=message):
        rw.parse(entries)


def test_a_reward_that_is_not_finite_is_refused_naming_the_reward_and_the_prompt():
    """A nan from a model reward would make every advantage and the loss nan, and the run's
    message then advises a lower learning rate; it is refused where it arises instead."""
    (reward,) = rw.parse([{"kind": "model", "path": "rm", "name": "rm"}])

    def scorer(conversations, completions):
        return np.array([0.5, np.nan, 0.2], np.float32)

    with pytest.raises(
        rw.RewardError, match=r"reward 'rm' \(model\) is nan for a completion of data\.jsonl:2 \(1 of 3"
    ):
        rw.score(
            [reward],
            ["a", "b", "c"],
            [1, 1, 1],
            [None] * 3,
            conversations=[[]] * 3,
            models={"rm": scorer},
            where=["data.jsonl:1", "data.jsonl:2", "data.jsonl:3"],
        )


def test_a_weighted_total_past_float32_is_refused():
    rewards = rw.parse(
        [
            {"kind": "regex", "pattern": "a", "weight": 3e38},
            {"kind": "regex", "pattern": "b", "name": "b", "weight": 3e38},
        ]
    )
    with pytest.raises(rw.RewardError, match="weighted reward total is inf for a completion of completion 0"):
        rw.score(rewards, ["ab"], [2], [None])


def test_a_regex_that_backtracks_exponentially_stops_the_run_naming_the_reward_and_the_prompt():
    """`(a|aa)+$` on 40 a's and a b takes about 1.6^40 steps: the rollout hung with no word. A
    search now stops after about metrics.SEARCH_SECONDS and says which reward, prompt and pattern."""
    import time

    (reward,) = rw.parse([{"kind": "regex", "pattern": r"(a|aa)+$", "name": "greedy"}])
    t0 = time.monotonic()
    with pytest.raises(rw.RewardError) as caught:
        rw.score([reward], ["aaa", "a" * 40 + "b"], [1, 1], [None] * 2, where=["p.jsonl:1", "p.jsonl:2"])
    assert time.monotonic() - t0 < 30
    message = str(caught.value)
    assert message.startswith("reward 'greedy' (regex) on a completion of p.jsonl:2: the pattern '(a|aa)+$' took over")
    assert "backtracks exponentially" in message
