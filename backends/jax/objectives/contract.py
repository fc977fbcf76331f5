"""The Objective contract: what the train and eval steps compute, as plain data.

An objective gives per micro-batch *sums* (e.g. weighted token loss and total weight), added over
every micro-batch of a step, and metrics that are ratios of those totals. The loss is divided
once by the total weight of the whole optimizer step, so a batch split into micro-batches, packed
or spread over data-parallel devices gives the same loss and gradient as one full batch (up to
float reassociation) -- unlike averaging per micro-batch.

Each objective module (sft.py, dpo.py, ...) also declares a `Registered` record: how `ftc run`
builds it from a spec and a method model, and what the plan must count for it. The registry
(objectives/__init__.py) maps `training.objective` to those records.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

LossSums = Callable[..., dict]

# Which runner trains an objective: the jitted train steps of pipeline.py, or the probe runner
# (probe_runner.py: pooled features of a frozen base, a head trained on them).
STEPS = "steps"
PROBE = "probe"
# The train steps fed by rollouts instead of the data pipeline (rl/loop.py: rollout -> score -> update).
ROLLOUTS = "rollouts"


@dataclasses.dataclass(frozen=True)
class Objective:
    """What the train and eval steps compute.

    sums(model, params, micro_batch, rng, reference) -> float32 scalar sums over the micro-batch,
        keyed by `sum_keys`; "loss_sum" (the objective summed over examples or tokens) and
        "weight_sum" (what the step's loss is divided by) are required. `reference` is the state's
        frozen reference parameters, or None when the state has none.
    summarize(totals) -> metrics, from the sums added over a whole step or validation pass. Only
        arithmetic, so the same function runs in the jitted step and on host floats.
    batch_keys: the top-level batch keys the steps take (anything else in a host batch is left out).
    """

    name: str
    sums: LossSums
    summarize: Callable[[Mapping[str, Any]], dict]
    sum_keys: tuple[str, ...]
    batch_keys: tuple[str, ...]
    perplexity: bool = False  # validation also reports exp(loss)


@dataclasses.dataclass(frozen=True)
class Built:
    """An objective made for one run: what the steps compute, and whether the train state carries
    a frozen reference copy of the starting parameters (one extra parameter-sized buffer)."""

    objective: Objective
    reference_copy: bool = False


@dataclasses.dataclass(frozen=True)
class Registered:
    """One `training.objective` as `ftc run` knows it.

    build(spec, model) -> Built: the objective for a resolved Spec and its methods.MethodModel (the
        objective decides, given the method, whether it needs a reference copy). None when another
        runner than the train steps trains it (`trainer`).
    sequences_per_example: model rows one example runs through per forward pass (DPO: chosen and
        rejected), for the plan's activation estimate.
    reference_forward: each step also runs a frozen reference model forward (DPO), for the FLOP count.
    rollout(spec) -> compiler.memory.RolloutShape: what one rollout of an online RL objective holds
        (rl/shape.py), for the plan's rollout memory; None for objectives that sample nothing.
    """

    name: str
    build: Callable[[Any, Any], Built] | None
    trainer: str = STEPS
    sequences_per_example: int = 1
    reference_forward: bool = False
    rollout: Callable[[Any], Any] | None = None


def nonzero(w):
    """`w`, or 1 where `w` is 0 (a sum over no examples is 0, so the ratio reads 0): arithmetic
    only, so it works on traced arrays and on host floats alike."""
    return w + (w == 0)
