"""`ftc run`: spec -> plan -> program -> run directory. This module wires the stages; each job
lives in its package.

    spec -> the base model (state/init_from.py) and its config.json -> tokenizer and data
    (stages.py; the data's stats go to the log and data_stats.json) -> the method's model
    (methods/) and the objective (objectives/, by training.objective) -> plan (compiler/, from
    the facts computed here: `plan_for`) -> mesh -> params (from the base, `model.init_from`, or
    the latest checkpoint: state/) -> optimizer -> loop (train/loop.py: metrics.jsonl,
    TensorBoard, eval, checkpoints) -> final checkpoint -> export/

An objective another runner trains (classify: probe_runner.py) goes there instead.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
from flax import traverse_util

from ftc.backends.jax import objectives, probe_runner
from ftc.backends.jax.data.digest import rows_digest
from ftc.backends.jax.generate.in_run import generation_hook
from ftc.backends.jax.io import export as export_lib
from ftc.backends.jax.io.hf_checkpoint import abstract_params as family_abstract
from ftc.backends.jax.memory_fit import memory_problem
from ftc.backends.jax.methods import base as methods
from ftc.backends.jax.methods.base import build_model
from ftc.backends.jax.models import shapes
from ftc.backends.jax.objectives import contract
from ftc.backends.jax.rl import loop as rl_loop
from ftc.backends.jax.stages import (
    build_data,
    live_report,
    load_tokenizer,
    model_with_weights,
    nonfinite_paths,
    token_id_problem,
    tokenizer_dir,
    tokenizer_hash,
    write_data_stats,
    write_plan,
    write_resolved_spec,
)
from ftc.backends.jax.state import checkpoint as ckpt_lib
from ftc.backends.jax.state import frozen_base
from ftc.backends.jax.state.frozen_base import initial_params
from ftc.backends.jax.state.init_from import init_from_step, read_model_config
from ftc.backends.jax.state.lock import run_lock
from ftc.backends.jax.train import ahead, device_peak, run_log
from ftc.backends.jax.train import step as ts
from ftc.backends.jax.train.compile_cache import use_compilation_cache
from ftc.backends.jax.train.loop import Interrupted, LoopConfig, StopSignals, train_loop
from ftc.backends.jax.train.program import build_program
from ftc.compiler import flops as flops_lib
from ftc.compiler import plan as plan_lib
from ftc.compiler.report import format_plan
from ftc.spec import spec_from_dict

__all__ = [
    "run",
    "plan_spec",
    "plan_for",
    "build_objective",
    "build_model",
    "initial_params",
    "read_model_config",
    "build_data",
    "load_tokenizer",
    "tokenizer_dir",
    "tokenizer_hash",
    "export_at_end",
    "use_compilation_cache",
    "Interrupted",
    "LoopConfig",
    "StopSignals",
    "train_loop",
]


# ------------------------------------------------------------------ objective and plan


def build_objective(spec, model) -> tuple[contract.Objective, bool]:
    """(what the steps compute for `training.objective`, whether the train state carries a frozen
    reference copy of the starting parameters), as the registered objective builds it for the
    method's `model` (objectives/)."""
    registered = objectives.get(spec.training.objective)
    if registered.build is None:
        raise NotImplementedError(
            f"training.objective={registered.name!r} is not trained by ftc run's train steps "
            f"(its runner: {registered.trainer})"
        )
    built = registered.build(spec, model)
    return built.objective, built.reference_copy


def objective_cost(spec, model) -> plan_lib.ObjectiveCost:
    """What the spec's objective adds to a step, as the compiler counts it."""
    registered = objectives.get(spec.training.objective)
    reference_copy = registered.build is not None and registered.build(spec, model).reference_copy
    rollout = registered.rollout(spec) if registered.rollout else None
    return plan_lib.ObjectiveCost(
        registered.sequences_per_example, registered.reference_forward, reference_copy, rollout
    )


def plan_for(
    spec, hf_config: dict, device_count: int, model=None, steps_per_epoch: int | None = None
) -> tuple[plan_lib.Plan, Any]:
    """(Plan, abstract params) for a spec's method: the compiler's Plan from the facts only the
    backend knows -- the method's parameters (shapes and logical axes), its counts (trainable
    weights vs every weight, an NF4 kernel counting its logical weights; a note on its settings),
    the FLOP count's matmul weights and what the objective costs."""
    model = model or build_model(hf_config, spec)
    infos = shapes.param_infos(shapes.abstract_boxed_params(model.module))
    # Abstract params as the method creates them: floating leaves in param_dtype, NF4 storage as is.
    abstract = methods.abstract_params(model, spec.model.param_dtype)
    counts = methods.method_counts(model, abstract)
    summary = plan_lib.model_summary(hf_config, model.family.name)
    experts = _expert_paths(model) if summary.experts else set()
    inactive = _expert_weights(model, abstract, experts) * (1 - summary.active_fraction)
    plan = plan_lib.compile_plan(
        spec,
        hf_config,
        device_count,
        family=model.family.name,
        param_infos=infos,
        trainable=model.trainable,
        counts=plan_lib.Counts(counts.total, counts.trainable, tuple(counts.lines()), round(counts.total - inactive)),
        matmul_weights=matmul_weights(model, abstract, summary, experts),
        objective=objective_cost(spec, model),
        steps_per_epoch=steps_per_epoch,
    )
    return plan, abstract


def matmul_weights(
    model, method_params, summary: plan_lib.ModelSummary, experts: set[str] = frozenset()
) -> flops_lib.MatmulWeights:
    """What the FLOP count needs of a method's weights: the family's dense kernels (whatever the
    method stores them as, NF4 included) and which of them train, plus the trainable matmul
    weights the method adds (LoRA factors, adapter kernels)."""
    base = traverse_util.flatten_dict(nn.unbox(family_abstract(model.family, model.arch, "float32")), sep="/")
    added = traverse_util.flatten_dict(nn.unbox(method_params), sep="/")
    # An expert's weights (and their LoRA factors) run for the tokens routed to it: top-k of E per token.

    def active(path: str) -> float:
        return summary.active_fraction if path in experts else 1.0

    kernels = {k: math.prod(v.shape) * active(k) for k, v in base.items() if k.rsplit("/", 1)[-1] == "kernel"}
    n = round(sum(kernels.values()))
    trained = round(sum(size for k, size in kernels.items() if k in added and model.trainable(k)))
    adapter = round(
        sum(
            math.prod(v.shape) * active(k)
            for k, v in added.items()
            if k not in base and len(v.shape) >= 2 and model.trainable(k)
        )
    )
    if summary.tied_embeddings:
        table = [k for k, v in base.items() if tuple(v.shape) == (summary.vocab, summary.hidden)]
        n += summary.vocab * summary.hidden
        trained += summary.vocab * summary.hidden if any(k in added and model.trainable(k) for k in table) else 0
    return flops_lib.MatmulWeights(n, trained, adapter)


def _expert_paths(model) -> set[str]:
    """Parameters with an "expert" axis, in the family's tree and the method's (LoRA factors on experts)."""
    modules = {id(m): m for m in (model.base, model.module)}.values()
    return {i.path for m in modules for i in shapes.param_infos(shapes.abstract_boxed_params(m)) if "expert" in i.axes}


def _expert_weights(model, method_params, experts: set[str]) -> int:
    """The expert weights (an NF4 kernel counted as the family's kernel) plus trainable factors on them."""
    base = traverse_util.flatten_dict(nn.unbox(family_abstract(model.family, model.arch, "float32")), sep="/")
    added = traverse_util.flatten_dict(nn.unbox(method_params), sep="/")
    own = sum(math.prod(v.shape) for k, v in base.items() if k in experts)
    return own + sum(
        math.prod(v.shape) for k, v in added.items() if k in experts and k not in base and model.trainable(k)
    )


def plan_spec(spec, device_count: int | None = None, steps_per_epoch: int | None = None) -> plan_lib.Plan:
    """The Plan for a spec: reads only config.json, never weights."""
    _, hf_config = read_model_config(spec.model.base)
    return plan_for(spec, hf_config, device_count or jax.device_count(), steps_per_epoch=steps_per_epoch)[0]


# ------------------------------------------------------------------ the run


def run(spec, *, echo: Callable[[str], None] = print, after_step: Callable[[int], None] | None = None) -> dict:
    """Train `spec` (an ftc.spec.Spec) into its run directory; resumes from the latest checkpoint
    there. Returns {"run_dir", "step", "total_steps"}. `after_step` is passed to `train_loop`.
    Holds the run directory's lock throughout (state/lock.py): a second run of it is refused."""
    with run_lock(spec.run_dir) as lock, StopSignals() as stop:
        try:
            with contextlib.ExitStack() as closing:  # closed before the lock looks at what was written
                return _run(spec, echo=echo, after_step=after_step, stop=stop, closing=closing)
        except BaseException:
            lock.discard()  # a start refused before anything was written leaves no run directory
            raise


def _run(
    spec,
    *,
    echo: Callable[[str], None],
    after_step: Callable[[int], None] | None,
    stop: StopSignals,
    closing: contextlib.ExitStack,
) -> dict:
    """`closing` closes the checkpointer and the logger however the run ends, before the lock goes."""
    use_compilation_cache()
    if objectives.get(spec.training.objective).trainer == contract.PROBE:
        return probe_runner.run_probe(spec, echo=echo)
    run_dir = os.path.abspath(spec.run_dir)
    model_dir, hf_config = model_with_weights(spec)
    tok_dir = tokenizer_dir(spec, model_dir)
    tokenizer = load_tokenizer(tok_dir)
    tok_hash = tokenizer_hash(tok_dir)
    rollouts = objectives.get(spec.training.objective).trainer == contract.ROLLOUTS
    data = rl_loop.prompt_data(spec, tokenizer) if rollouts else build_data(spec, tokenizer)
    echo(data.stats.summary())

    model = build_model(hf_config, spec)
    objective, with_reference = build_objective(spec, model)
    plan, abstract_params = plan_for(
        spec, hf_config, jax.device_count(), model=model, steps_per_epoch=data.steps_per_epoch
    )
    echo(format_plan(plan, max_params=0))
    if problem := memory_problem(plan.memory.total, jax.local_devices()):  # before it is OOM-killed, unexplained
        raise ValueError(problem)
    if problem := token_id_problem(getattr(data, "train_rows", None), plan.model.vocab, tok_dir):
        raise ValueError(problem)
    total = plan.steps.total_steps
    program = build_program(plan, model, abstract_params, objective, reference=with_reference)
    mesh, mask, tx, state_sh, steps = program.mesh, program.mask, program.tx, program.state_sh, program.steps
    # The step compiles in a thread while the weights load (train/ahead.py); rollouts feed other batches.
    compiling = None if rollouts else _compile_ahead(spec, plan, objective, program)
    feed = None
    if rollouts:  # train steps fed by rollout -> score rounds (rl/loop.py), not the data pipeline
        feed = rl_loop.RolloutFeed(spec, data, model, tokenizer, model_dir, hf_config, mesh)
        steps = feed.wrap(steps)

    # Checkpoints hold what trains; the frozen base and a reference copy are rebuilt on resume.
    saved_params = frozen_base.saved_mask(abstract_params, model.method)
    ckpt_lib.set_aside_damaged(run_dir, echo)
    checkpointer = ckpt_lib.Checkpointer(
        ckpt_lib.checkpoint_dir(run_dir),
        keep=spec.checkpoint.keep,
        async_save=spec.checkpoint.async_,
        saved_params=saved_params,
    )
    closing.callback(checkpointer.close)
    metadata = {
        "spec": spec.to_dict(),
        "tokenizer_hash": tok_hash,
        **ckpt_lib.fingerprint_metadata(plan.fingerprint()),
        "family": model.family.name,
        "model_dir": str(model_dir),
    }
    rows = getattr(data, "train_rows", None)  # what the data position indexes (rollouts: prompts, kept apart)
    if rows is not None:
        metadata["data_digest"] = rows_digest(rows)
    latest = checkpointer.latest_step()
    data_state = None
    if latest is not None:
        saved = checkpointer.metadata(latest)
        where = f"{checkpointer.directory}/{latest}"
        ckpt_lib.check_resumable(
            saved, metadata["spec"], tok_hash, where, plan.fingerprint(), metadata.get("data_digest")
        )
        state, data_state = frozen_base.restore_state(
            checkpointer,
            latest,
            saved,
            model_dir,
            model,
            program.abstract_state(),
        )
        if saved.get("format_version", 1) >= 2:
            frozen = saved.get("frozen")
        else:  # format 1 held the whole state: record its frozen part for the checkpoints to come
            started = spec_from_dict(saved["spec"])
            frozen = frozen_base.record(started, model_dir, state, saved_params, init_from_step(started))
        echo(f"resumed from step {latest} ({checkpointer.directory})")
    else:
        init_step = init_from_step(spec)
        params = initial_params(spec, model_dir, abstract_params, state_sh["params"], model=model, init_step=init_step)
        if bad := nonfinite_paths(params):  # else: a nan loss at step 1, and advice to lower the learning rate
            where = spec.model.init_from or model_dir
            raise ValueError(f"{where}: the starting weights hold nan or inf in {', '.join(bad[:3])}: corrupted?")
        init = jax.jit(
            lambda p: ts.init_state(p, tx, mask, spec.training.seed, reference=with_reference),
            out_shardings=state_sh,
            donate_argnums=(0,),
        )
        state = init(params)
        frozen = frozen_base.record(spec, model_dir, state, saved_params, init_step)
    if frozen is not None:
        metadata["frozen"] = frozen
    write_resolved_spec(spec, run_dir)
    write_data_stats(data.stats, run_dir)
    write_plan(plan, run_dir)
    report = live_report(spec, run_dir, echo)

    # positioned where the checkpoint left off
    train_iter = feed.start(state, data_state) if feed else data.train_iterator(data_state)
    eval_batches = None
    if data.validation_rows is not None:
        eval_batches = lambda: data.validation_batches(spec.training.micro_batch_size)
    logger = run_log.RunLogger(run_dir, tensorboard=spec.logging.tensorboard, resume_step=latest)
    closing.callback(logger.close)
    generation_eval = generation_hook(spec, model, tokenizer, model_dir, hf_config, mesh, logger)  # [eval]
    peak, peak_source = device_peak.peak_flops(spec.model.dtype, spec.logging.peak_tflops)
    # CPU "devices" forced by XLA_FLAGS share the host's cores: the peak is per host there.
    peak_units = jax.process_count() if jax.devices()[0].platform == "cpu" else jax.device_count()
    echo(
        f"MFU: model FLOPs over {peak / 1e12:.4g} TFLOP/s x {peak_units} "
        f"{'host' if jax.devices()[0].platform == 'cpu' else 'device'}(s) ({peak_source})"
    )
    config = LoopConfig(
        total_steps=total,
        log_every=spec.training.log_every,
        eval_every=spec.training.eval_every,
        checkpoint_every=spec.checkpoint.every,
        eval_first=latest is not None and bool(saved.get("eval_pending")),
        progress=spec.logging.progress,
        flops_per_step=plan.flops_per_token * plan.batch.tokens_per_step,
        peak_flops=peak * peak_units,
    )
    ahead.result(compiling)  # its first call finds the executable compiled
    try:
        state = train_loop(
            steps,
            state,
            train_iter,
            config,
            checkpointer=checkpointer,
            metadata=metadata,
            logger=logger,
            eval_batches=eval_batches,
            stop=stop,
            after_step=after_step,
            generation_eval=generation_eval,
            on_metrics=report,
        )
    except (Exception, Interrupted):
        if report is not None:  # a stopped or failed run's report shows how far it got
            report.final()
        raise
    finally:
        closing.close()  # the last save committed before the export reads it back
    summary = {"run_dir": run_dir, "step": int(jax.device_get(state["step"])), "total_steps": total}
    del state  # export reads the final checkpoint back, sharded its own way
    stop.outside = f"stopped during the export; the checkpoint at step {total} is complete: run again to export"
    try:
        if summary["step"] >= total:
            summary["export"] = export_at_end(run_dir, echo=echo)
    finally:
        if report is not None:
            report.final()
    return summary


def _compile_ahead(spec, plan, objective, program):
    try:
        batch = ahead.abstract_batch(spec, plan, objective, program.steps.train_batch_sharding)
    except ahead.BatchKeysError:  # the step's first call says what is missing
        return None
    return ahead.start(program.steps.train, program.abstract_state(), batch)


def export_at_end(run_dir: str, *, echo: Callable[[str], None] = print) -> str:
    """The run's export/ (replaced if there), as the spec's [export] asks: `ftc export RUN_DIR`
    with its defaults. Raises export.VerifyFailedError when export.verify finds a difference."""
    result, check = export_lib.export_run(run_dir, force=True, echo=echo)
    if check is not None and not check.ok:
        raise export_lib.VerifyFailedError(f"{result.out_dir}: {check.summary()}")
    resolved = os.path.join(run_dir, "spec.resolved.json")
    with open(resolved, encoding="utf-8") as f:
        spec = spec_from_dict(json.load(f))
    for fmt in export_lib.target_formats(spec):  # [export] targets
        # a quantised GGUF dtype is for the gguf export only; the others keep the run's float dtype
        dtype = spec.export.dtype if fmt == "gguf" or spec.export.dtype not in ("q8_0", "q4_0") else "bfloat16"
        out = os.path.join(run_dir, f"export-{fmt}")
        extra, extra_check = export_lib.export_run(run_dir, out=out, format=fmt, dtype=dtype, force=True, echo=echo)
        if extra_check is not None and not extra_check.ok:
            raise export_lib.VerifyFailedError(f"{extra.out_dir}: {extra_check.summary()}")
    echo(f"to export again in another dtype or format: ftc export {run_dir} --out DIR [--dtype ...] [--format ...]")
    return str(result.out_dir)
