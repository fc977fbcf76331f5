"""Training objectives by `training.objective`: one module each, one registry line each.

To add one: write objectives/<name>.py with its sums and summary (contract.Objective) and a
`RECORD = Registered("<name>", build, ...)`, add a line below, and add "<name>" to the schema's
`training.objective` enum (with its `x-ftc-objectives` entry: the data formats it trains on).
"""

from __future__ import annotations

from ftc.backends.jax.objectives import classify, contract, dpo, grpo, orpo, ppo, sft

OBJECTIVES: dict[str, contract.Registered] = {
    "sft": sft.RECORD,
    "dpo": dpo.RECORD,
    "orpo": orpo.RECORD,
    "classify": classify.RECORD,
    "grpo": grpo.RECORD,
    "ppo": ppo.RECORD,
}


def get(name: str) -> contract.Registered:
    """The registered objective `name` (a spec's `training.objective`)."""
    try:
        return OBJECTIVES[name]
    except KeyError:
        raise ValueError(f"training.objective={name!r}: expected one of {', '.join(OBJECTIVES)}") from None
