"""`ftc run` with method.kind = lora, qlora, adapter and probe, end to end on tiny saved models."""

from __future__ import annotations

import json
import math

import jax
import method_runs_testlib as mr
import numpy as np
import pytest
import train_testlib as tl

from ftc.backends.jax import pipeline as run_lib
from ftc.backends.jax.io import export as export_lib
from ftc.backends.jax.io import hf_checkpoint
from ftc.backends.jax.methods import adapter as adapters
from ftc.backends.jax.methods import base as methods
from ftc.backends.jax.methods import lora, nf4
from ftc.backends.jax.methods.intercept import node
from ftc.backends.jax.objectives import sft
from ftc.backends.jax.state import checkpoint as ckpt_lib
from ftc.spec import load_spec


def restored(kind: str):
    """(TrainedRun of the run's final checkpoint, its params as numpy by path, the base's params by path)."""
    run = mr.trained(kind)
    trained = export_lib.load_run(run.run_dir)
    base = tl.flat(hf_checkpoint.load_model(run.model_dir).params)
    return trained, tl.flat(trained.params), base


def assert_base_bitwise(model: methods.MethodModel, params: dict, base: dict, skip=()) -> None:
    kept = {p: v for p, v in params.items() if not model.trainable(p) and lora.QUANT_CHILD not in p.split("/")}
    expected = {p for p in base if not any(p.startswith(s) for s in skip)}
    assert set(kept) == expected
    for path, value in kept.items():
        assert value.dtype == base[path].dtype and value.tobytes() == base[path].tobytes(), f"{path} moved"


def test_lora_run_trains_only_the_factors_and_plans_lora_counts():
    run = mr.trained("lora")
    assert run.summary["step"] == mr.STEPS and (run.run_dir / "export" / "config.json").is_file()
    trained, params, base = restored("lora")
    assert_base_bitwise(trained.model, params, base)
    factors = {p: v for p, v in params.items() if lora.is_trainable(p)}
    assert len(factors) == 2 * 7  # a and b of 7 projections (stacked over the 2 layers)
    assert all(np.abs(v).max() > 1e-3 for p, v in factors.items() if p.endswith("/b")), "B never left zero"

    plan = run_lib.plan_spec(load_spec(run.spec_path))
    expected = lora.expected_trainable(trained.model.plan)
    assert plan.trainable_count == expected == sum(v.size for v in factors.values())
    assert plan.param_count == sum(v.size for v in base.values()) + expected
    line = f"trains {expected:,} of {plan.param_count:,} weights"
    assert any(line in n for n in plan.notes) and any(line in l for l in run.log)
    losses = [r["loss"] for r in mr.metrics(run.run_dir) if r["split"] == "train"]
    assert len(losses) == mr.STEPS and all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]


def test_lora_validation_runs_without_dropout():
    """The logged validation loss is the LoRA model's without dropout (dropout = 0.2 in training)."""
    run = mr.trained("lora")
    trained, _, _ = restored("lora")
    spec = load_spec(run.spec_path)
    data = run_lib.build_data(spec, run_lib.load_tokenizer(run.model_dir))
    logged = [r for r in mr.metrics(run.run_dir) if r["split"] == "validation" and r["step"] == mr.STEPS][0]["loss"]

    def loss(module):
        sums_fn = jax.jit(lambda params, batch: sft.causal_lm_sums(module, params, batch, jax.random.key(3)))
        sums = [sums_fn(trained.params, b) for b in data.validation_batches(spec.training.micro_batch_size)]
        return float(sum(s["loss_sum"] for s in sums) / sum(s["weight_sum"] for s in sums))

    assert loss(trained.model.eval_module) == pytest.approx(logged, rel=1e-5, abs=1e-6)
    assert abs(loss(trained.model.module) - logged) > 1e-4  # with dropout it would have read differently


@pytest.mark.slow  # ~30 s: a QLoRA run of its own (the plan test above checks QLoRA's counts quickly)
def test_qlora_run_keeps_nf4_storage_and_unquantised_weights_bitwise():
    run = mr.trained("qlora")
    trained, params, base = restored("qlora")
    plan = trained.model.plan
    sites = plan.quant_sites
    assert len(sites) == 7
    assert_base_bitwise(trained.model, params, base, skip=[s.param_path + "/kernel" for s in sites])
    loaded = hf_checkpoint.load_model(run.model_dir).params
    for s in sites:  # what the run stores is the base kernel quantised once, untouched by training
        want = nf4.quantize(node(loaded, s.module_path)["kernel"], 1, s.n_in, block_size=32)
        for name, value in want.items():
            got = params[f"{s.param_path}/{lora.QUANT_CHILD}/{name}"]
            assert got.tobytes() == np.asarray(value).tobytes(), (s.param_path, name)

    counts = methods.method_counts(trained.model, trained.params)
    q_weights = sum(base[s.param_path + "/kernel"].size for s in sites)
    assert counts.quantized_weights == q_weights
    assert counts.quantized_bytes == q_weights // 2 + 4 * q_weights // 32  # codes + float32 absmax per 32
    assert counts.trainable == lora.expected_trainable(plan)
    assert any("qlora frozen base" in l and "0.312 x their bfloat16 bytes" in l for l in run.log)
    assert run_lib.plan_spec(load_spec(run.spec_path)).trainable_count == counts.trainable


def test_adapter_run_trains_only_the_adapters_and_counts_by_formula():
    run = mr.trained("adapter")
    trained, params, base = restored("adapter")
    assert_base_bitwise(trained.model, params, base)
    ups = [v for p, v in params.items() if p.endswith(f"{adapters.CHILD}/up/kernel")]
    assert len(ups) == 2 and all(np.abs(v).max() > 1e-3 for v in ups)  # up starts at zero
    expected = adapters.num_trainable(trained.model.plan, 32)
    plan = run_lib.plan_spec(load_spec(run.spec_path))
    assert plan.trainable_count == expected == sum(v.size for p, v in params.items() if adapters.is_trainable(p))
    assert plan.param_count == sum(v.size for v in base.values()) + expected
    assert (run.run_dir / "export" / adapters.HF_SUBDIR / "adapter_config.json").is_file()


def test_ftc_plan_prints_method_counts_not_full_model_counts():
    from click.testing import CliRunner

    from ftc.cli import main

    for kind, want in (
        ("lora", "method lora: rank 4, alpha 16, dropout 0.2"),
        ("qlora", "qlora frozen base"),
        ("adapter", "method adapter: houlsby placement"),
    ):
        result = CliRunner().invoke(main, ["plan", str(mr.write_spec(kind, f"plan-{kind}"))])
        assert result.exit_code == 0, result.output
        assert want in result.output and "full fine-tune" not in result.output
        out = json.loads(CliRunner().invoke(main, ["plan", str(mr.write_spec(kind, f"plan-{kind}")), "--json"]).output)
        assert 0 < out["trainable_count"] < out["param_count"] / 5


def test_lora_starts_from_a_peft_adapter_given_as_init_from(tmp_path):
    trained, params, base = restored("lora")
    result = export_lib.write_export(trained, tmp_path / "adapter", format="peft", dtype="float32")
    spec = load_spec(mr.write_spec("lora", "lora-again", init_from=str(result.out_dir)))
    model = run_lib.build_model(trained.hf_config, spec)
    abstract = methods.abstract_params(model, "float32")
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    start = tl.flat(
        run_lib.initial_params(spec, trained.model_dir, abstract, jax.tree.map(lambda _: one, abstract), model=model)
    )
    assert set(start) == set(params)
    for path, value in start.items():  # factors from the adapter, base from model.base: all bitwise
        assert value.tobytes() == params[path].tobytes(), path
    with pytest.raises(ValueError, match="PEFT LORA adapter, which a method.kind='adapter' run cannot start"):
        spec = load_spec(mr.write_spec("adapter", "adapter-from-peft", init_from=str(result.out_dir)))
        run_lib.initial_params(spec, trained.model_dir, None, None)


def test_probe_run_on_tiny_bert_writes_accuracy_majority_baseline_and_export():
    spec_path = mr.write_probe_spec()
    run = mr.run_spec(spec_path, "probe")
    m = json.loads((run.run_dir / "probe_metrics.json").read_text())
    v = m["validation"]
    assert v["examples"] == 30 and v["majority_accuracy"] == pytest.approx(1 / 3)
    assert v["accuracy"] >= v["majority_accuracy"] + 0.3, v
    lines = mr.metrics(run.run_dir)
    assert [l["step"] for l in lines[:-1]] == [20, 40, 60] and lines[-1]["event"] == "probe_eval"
    assert lines[-1]["validation/accuracy"] == v["accuracy"]
    assert any("majority baseline" in l for l in run.log)
    export = run.run_dir / "export"
    assert (export / "config.json").is_file() and m["export"]["dir"] == str(export)

    again = mr.run_spec(spec_path, "probe")  # the same spec: done already
    assert any("already complete" in l for l in again.log) and again.summary["metrics"] == m
    with pytest.raises(ckpt_lib.ResumeRefusedError, match="training.learning_rate"):
        run_lib.run(load_spec(mr.write_probe_spec(lr=0.01)), echo=lambda s: None)


def test_cls_probe_on_a_bert_saved_without_its_pooler_is_refused_before_writing_a_run_dir():
    # BertForMaskedLM saves no pooler.dense.*: "cls" (BERT's pooler output) cannot be read from it;
    # the run failed only once features were computed, leaving spec.resolved.json and data_stats.json
    import transformers

    r = mr.probe_root()
    mlm = r / "bert_mlm"
    config = transformers.BertConfig.from_pretrained(r / "bert")
    transformers.BertForMaskedLM(config).eval().save_pretrained(mlm)
    for f in (r / "bert").iterdir():
        if "token" in f.name or "special" in f.name:
            (mlm / f.name).write_bytes(f.read_bytes())
    path = mr.write_probe_spec("probe_no_pooler", pooling="cls")
    path.write_text(path.read_text().replace(f'base = "{r}/bert"', f'base = "{mlm}"'))
    spec = load_spec(path)
    with pytest.raises(ValueError, match=r'\[method\]\.pooling="cls" .*no pooler weights.*"mean" or "last"'):
        run_lib.run(spec, echo=lambda s: None)
    assert not (r / "runs" / "probe_no_pooler").exists()


def test_lora_starts_from_a_full_fine_tune_run_or_an_earlier_lora_run():
    full_run, lora_run = mr.trained("full"), mr.trained("lora")
    full_params = tl.flat(export_lib.load_run(full_run.run_dir).params)
    lora_params = tl.flat(export_lib.load_run(lora_run.run_dir).params)
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def start(spec):
        model = run_lib.build_model(hf_checkpoint.read_hf_config(full_run.model_dir), spec)
        abstract = methods.abstract_params(model, "float32")
        return tl.flat(
            run_lib.initial_params(
                spec, full_run.model_dir, abstract, jax.tree.map(lambda _: one, abstract), model=model
            )
        )

    spec = load_spec(mr.write_spec("lora", "lora-on-full", init_from=str(full_run.run_dir)))
    params = start(spec)
    for path, value in params.items():  # the full run's final weights are the base; fresh factors on top
        if lora.is_trainable(path):
            assert not path.endswith("/b") or not value.any(), path
        else:
            assert value.tobytes() == full_params[path].tobytes(), path
    # Its PEFT export names the full run's export (float32, written at the end of that run) as base.
    assert export_lib.base_source(spec, full_run.model_dir)[:2] == (
        str(full_run.run_dir / "export"),
        full_run.run_dir / "export",
    )

    again = start(load_spec(mr.write_spec("lora", "lora-on-lora", init_from=str(lora_run.run_dir))))
    assert set(again) == set(lora_params)
    assert all(again[p].tobytes() == lora_params[p].tobytes() for p in again)  # the whole tree, factors too
    with pytest.raises(ValueError, match="is a lora run; a method.kind='adapter' run starts from"):
        start(load_spec(mr.write_spec("adapter", "adapter-on-lora", init_from=str(lora_run.run_dir))))


@pytest.mark.slow  # two more LoRA runs (~30 s)
def test_lora_run_resumed_midway_equals_the_uninterrupted_run():
    """Resume restores the LoRA tree as saved: no second LoRA init on top (a trap other tools hit)."""
    whole = tl.flat(export_lib.load_run(mr.trained("lora").run_dir).params)
    path = mr.write_spec("lora", "lora-halves", steps=2)
    first = mr.run_spec(path, "lora")
    assert first.summary["step"] == 2
    second = run_lib.run(load_spec(path, ["training.steps=4"]), echo=lambda s: None)
    assert second["step"] == 4
    resumed = tl.flat(export_lib.load_run(first.run_dir).params)
    assert set(resumed) == set(whole)
    for name, value in resumed.items():  # constant schedule: 2 + 2 steps are the 4 steps
        assert value.tobytes() == whole[name].tobytes(), name
