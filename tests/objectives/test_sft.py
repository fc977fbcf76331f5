"""objectives/: the sft objective, and the registry `ftc run` picks an objective from by
`training.objective`."""

from __future__ import annotations

import dataclasses
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import train_testlib as tl

from ftc.backends.jax import objectives, pipeline
from ftc.backends.jax.methods import base as methods
from ftc.backends.jax.objectives import contract, sft
from ftc.backends.jax.train import step as ts
from ftc.compiler import plan as plan_lib
from ftc.spec import choices

CFG = tl.tiny_llama_config()

# A toy objective in a module of its own: sft with every token weighing twice as much.
TOY_OBJECTIVE = """
from ftc.backends.jax.objectives import sft
from ftc.backends.jax.objectives.contract import Built, Objective, Registered


def sums(model, params, batch, rng, reference=None):
    return sft.causal_lm_sums(model, params, dict(batch, weights=batch["weights"] * 2), rng, reference)


OBJECTIVE = Objective("sft_x2", sums, sft.causal_lm_summary, sft.SUM_KEYS, sft.BATCH_KEYS, perplexity=True)
RECORD = Registered("sft_x2", lambda spec, model: Built(OBJECTIVE))
"""


def test_cross_entropy_and_hits_equal_optax_and_argmax_with_the_same_gradient():
    import optax

    logits = jax.random.normal(jax.random.key(1), (3, 7, 50)) * 4
    targets = jax.random.randint(jax.random.key(2), (3, 7), 0, 50)
    targets = targets.at[0, :3].set(jnp.argmax(logits[0, :3], -1))  # some hits for sure
    losses, hits = sft.cross_entropy_and_hits(logits, targets)
    np.testing.assert_array_equal(losses, optax.softmax_cross_entropy_with_integer_labels(logits, targets))
    np.testing.assert_array_equal(hits, (jnp.argmax(logits, -1) == targets).astype(jnp.float32))
    assert hits[0, :3].tolist() == [1.0, 1.0, 1.0]
    ours = jax.grad(lambda x: sft.cross_entropy_and_hits(x, targets)[0].sum())(logits)
    theirs = jax.grad(lambda x: optax.softmax_cross_entropy_with_integer_labels(x, targets).sum())(logits)
    np.testing.assert_array_equal(ours, theirs)


def test_an_objective_registered_from_its_own_module_trains_a_step_through_the_registry(tmp_path, monkeypatch):
    (tmp_path / "toy_objective.py").write_text(TOY_OBJECTIVE)
    monkeypatch.syspath_prepend(str(tmp_path))
    toy = importlib.import_module("toy_objective")
    monkeypatch.setitem(objectives.OBJECTIVES, "sft_x2", toy.RECORD)  # the one registry line
    spec = tl.spec({"mesh": {"fsdp": 1}})
    toy_spec = dataclasses.replace(spec, training=dataclasses.replace(spec.training, objective="sft_x2"))
    model = methods.build_model(CFG, toy_spec)
    objective, reference_copy = pipeline.build_objective(toy_spec, model)
    assert objective is toy.OBJECTIVE and not reference_copy
    plan, _ = pipeline.plan_for(toy_spec, CFG, 1, model=model)
    assert plan.objective == "sft_x2" and plan.memory.reference == 0

    batch = tl.random_batch(np.random.default_rng(0), 8)
    metrics = {}
    for name, what in (("sft", sft.CAUSAL_LM), ("toy", objective)):
        program = tl.program(spec, CFG, 1, objective=what)
        _, step_metrics = program.steps.train(program.state, program.steps.put_train_batch(batch))
        metrics[name] = ts.host_metrics(step_metrics)
    # Twice the weight on every token: twice the total weight, the same weighted mean loss.
    assert metrics["toy"]["loss_weight"] == 2 * metrics["sft"]["loss_weight"] > 0
    assert metrics["toy"]["loss"] == pytest.approx(metrics["sft"]["loss"], rel=1e-6)


def test_the_registry_holds_the_schemas_objectives_and_classify_is_the_probe_runners():
    assert list(objectives.OBJECTIVES) == list(choices.objectives())
    assert all(record.name == name for name, record in objectives.OBJECTIVES.items())
    classify = objectives.get("classify")
    assert classify.trainer == contract.PROBE and classify.build is None
    assert all(objectives.get(name).trainer == contract.STEPS for name in ("sft", "dpo", "orpo"))
    assert all(objectives.get(name).trainer == contract.ROLLOUTS for name in ("grpo", "ppo"))
    with pytest.raises(ValueError, match="training.objective='kto': expected one of sft, dpo, orpo, classify"):
        objectives.get("kto")


def test_dpo_keeps_a_reference_copy_only_for_a_full_fine_tune_and_the_plan_counts_it():
    def spec(kind):
        return tl.spec(
            {
                "training": {"objective": "dpo"},
                "data": {"format": "preference"},
                "method": {"kind": kind},
                "mesh": {"fsdp": 1},
            }
        )

    for kind, copy in (("full", True), ("lora", False)):
        model = methods.build_model(CFG, spec(kind))
        assert pipeline.build_objective(spec(kind), model)[1] is copy
        cost = pipeline.objective_cost(spec(kind), model)
        assert cost == plan_lib.ObjectiveCost(sequences_per_example=2, reference_forward=True, reference_copy=copy)
        plan, _ = pipeline.plan_for(spec(kind), CFG, 1, model=model)
        assert (plan.memory.reference == plan.memory.params) is copy
