"""`ftc run` for the objectives the probe runner trains (objectives/classify.py): pooled features
of the frozen base over the classification data (cached under RUN_DIR/features), a head trained on
them with the spec's optimizer and schedule (methods/probe.py run_probe), metrics.jsonl,
probe_metrics.json and export/.

A finished probe run with the same spec is not redone; a changed training-relevant key is refused
as for any run; changed [export] keys run it again (the features come from the cache).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from ftc.backends.jax import stages
from ftc.backends.jax.io import export as export_lib
from ftc.backends.jax.io.hf_checkpoint import LoadedModel
from ftc.backends.jax.methods import base as methods
from ftc.backends.jax.methods import probe
from ftc.backends.jax.state import checkpoint as ckpt_lib
from ftc.backends.jax.state.frozen_base import initial_params
from ftc.backends.jax.train import optimizer as opt_lib
from ftc.compiler import plan as plan_lib

METRICS = "probe_metrics.json"


def run_probe(spec, *, echo: Callable[[str], None] = print) -> dict:
    """Train `spec` (training.objective = classify, method.kind = probe) into its run directory.
    Returns {"run_dir", "step", "total_steps", "metrics", "export"}."""
    if spec.method.kind != "probe":  # the runner's own method: its head trains on pooled features
        raise NotImplementedError(
            f"training.objective={spec.training.objective!r} with method.kind={spec.method.kind!r} is not something "
            f"ftc run trains (sft and dpo train a causal LM; classify is method.kind = 'probe')"
        )
    run_dir = os.path.abspath(spec.run_dir)
    done, resolved = os.path.join(run_dir, METRICS), os.path.join(run_dir, stages.RESOLVED_SPEC)
    if os.path.exists(done) and os.path.exists(resolved):
        with open(resolved, encoding="utf-8") as f:
            old = json.load(f)
        ckpt_lib.check_resumable({"spec": old}, spec.to_dict(), None, resolved)
        if old == spec.to_dict():
            with open(done, encoding="utf-8") as f:
                metrics = json.load(f)
            echo(f"probe run already complete in {run_dir} ({METRICS}); nothing to do")
            return {
                "run_dir": run_dir,
                "step": metrics["steps"],
                "total_steps": metrics["steps"],
                "metrics": metrics,
                "export": os.path.join(run_dir, "export"),
            }
    model_dir, hf_config = stages.model_with_weights(spec)
    tok_dir = stages.tokenizer_dir(spec, model_dir)
    tokenizer = stages.load_tokenizer(tok_dir)
    data = stages.build_data(spec, tokenizer)
    echo(data.stats.summary())
    model = methods.build_model(hf_config, spec)
    problem = probe.pooling_problem(model.family.model_types[0], model.arch, model.config)
    if problem:  # before anything is written: a refused start leaves no run directory
        raise ValueError(problem)
    abstract = methods.abstract_params(model, spec.model.param_dtype)
    counts = methods.method_counts(model, abstract)
    for line in counts.lines():
        echo(line)
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    params = initial_params(spec, model_dir, abstract, jax.tree.map(lambda _: one, abstract), model=model)
    loaded = LoadedModel(model.family, model.arch, params, hf_config, Path(model_dir))

    train = probe.ClassificationArrays.from_data_rows(data.train_rows)
    validation = (
        probe.ClassificationArrays.from_data_rows(data.validation_rows) if data.validation_rows is not None else None
    )
    t = spec.training
    # The head trains on whole batches of examples: an epoch is as many as fit (at least one).
    batch_size = min(t.batch_size, len(train.labels))
    steps = plan_lib.step_plan(t, max(1, len(train.labels) // batch_size)).total_steps
    schedule = opt_lib.make_schedule(plan_lib.schedule_plan(t, steps), steps)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else hf_config.get("pad_token_id")
    if jax.process_index() == 0:  # a re-run (changed [export]) starts these afresh
        for stale in ("metrics.jsonl", METRICS, export_lib.PROBE_HEAD):
            if os.path.exists(os.path.join(run_dir, stale)):
                os.remove(os.path.join(run_dir, stale))
        shutil.rmtree(os.path.join(run_dir, "export"), ignore_errors=True)
    stages.write_resolved_spec(spec, run_dir)
    stages.write_data_stats(data.stats, run_dir)
    result = probe.run_probe(
        loaded,
        model.config,
        train,
        list(data.label_names),
        validation=validation,
        run_dir=run_dir,
        dtype=jnp.dtype(spec.model.dtype),
        pad_token_id=pad_id,
        steps=steps,
        batch_size=batch_size,
        tx=opt_lib.make_optimizer(t.optimizer, schedule),
        seed=t.seed,
        log_every=t.log_every,
        export=True,
        export_dtype=spec.export.dtype,
        tokenizer_dir=str(tok_dir) if stages.tokenizer_hash(tok_dir) else None,
    )
    m = result.metrics
    for split in ("train", "validation"):
        if split in m:
            r = m[split]
            echo(
                f"probe {split}: accuracy {r['accuracy']:.4f} (majority baseline {r['majority_accuracy']:.4f}), "
                f"macro-F1 {r['macro_f1']:.4f} (baseline {r['majority_macro_f1']:.4f}) on {r['examples']} examples"
            )
    if result.export:
        echo(
            f"exported {result.export['kind']} ({result.export['architecture']}) to {result.export['dir']}"
            + (f"; note: {m['export_note']}" if m.get("export_note") else "")
        )
    if jax.process_index() == 0:  # the trained head as ftc holds it: what `ftc export --verify` checks against
        from safetensors.numpy import save_file

        save_file(
            {k: np.ascontiguousarray(v, np.float32) for k, v in result.head.items()},
            os.path.join(run_dir, export_lib.PROBE_HEAD),
        )
    if spec.export.verify and result.export:
        check = export_lib.verify_probe_export(run_dir, result.export["dir"])
        echo("verify: " + check.summary())
        if not check.ok:
            raise export_lib.VerifyFailedError(f"{result.export['dir']}: {check.summary()}")
    report = stages.live_report(spec, run_dir, echo)
    if report is not None:
        report.final()
    return {
        "run_dir": run_dir,
        "step": steps,
        "total_steps": steps,
        "metrics": m,
        "export": result.export["dir"] if result.export else None,
    }
