"""`ftc run`: spec -> plan -> program -> run directory.

    load spec -> resolve the base model -> config.json -> data (data.build_datasets; its stats go to
    the log and data_stats.json) -> plan -> mesh
    -> params (from the base, `model.init_from`, or the latest checkpoint) -> optimizer
    -> loop (progress bar, metrics.jsonl, TensorBoard, eval, checkpoints) -> final checkpoint

Each phase is a function of its inputs, so tests drive `train_loop` with any model and iterator.
SIGTERM / SIGINT ask the loop to stop: it saves a checkpoint, waits for it, and the run exits
non-zero (`Interrupted`); `ftc run` on the same spec resumes from there.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import signal
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ftc.backends.jax import checkpoint as ckpt_lib
from ftc.backends.jax import mesh as mesh_lib
from ftc.backends.jax import optimizer as opt_lib
from ftc.backends.jax import run_log
from ftc.backends.jax import shapes
from ftc.backends.jax import train_step as ts
from ftc.compiler import plan as plan_lib

RESOLVED_SPEC = "spec.resolved.json"
DATA_STATS = "data_stats.json"
SHOWN_VALIDATION = ("loss", "perplexity", "token_accuracy", "reward_accuracy", "reward_margin")


class Interrupted(SystemExit):
    """The run was asked to stop (SIGTERM/SIGINT) and saved a checkpoint first."""


# ------------------------------------------------------------------ model config and plan


def read_model_config(base: str) -> tuple[Path | None, dict]:
    """(model directory, config.json) for `model.base`. A local directory with only a
    config.json plans fine (no weights needed); anything else goes through model_source."""
    from ftc.backends.jax.hf_checkpoint import read_hf_config

    local = Path(base).expanduser()
    if local.is_dir() and (local / "config.json").is_file() and not any(local.glob("*.safetensors")):
        return None, read_hf_config(local)
    from ftc.backends.jax.model_source import resolve_model_source

    model_dir = resolve_model_source(base)
    return model_dir, read_hf_config(model_dir)


def build_module(hf_config: dict, spec):
    """(family, arch, flax module) for the base model, with the spec's remat policy when the
    family's arch carries one (families.py convention)."""
    from ftc.backends.jax.families import family_for

    family = family_for(hf_config)
    arch = family.config_from_hf(hf_config)
    remat = spec.training.remat
    if dataclasses.is_dataclass(arch) and "remat" in {f.name for f in dataclasses.fields(arch)}:
        arch = dataclasses.replace(arch, remat=remat)
    elif remat != "none":
        raise ValueError(f"training.remat={remat!r}: model family {family.name} does not support remat")
    return family, arch, family.build(arch, jnp.dtype(spec.model.dtype))


def trainable_fn(spec) -> Callable[[str], bool]:
    if spec.method.kind != "full":
        raise NotImplementedError(
            f"method.kind={spec.method.kind!r} is not wired into ftc run yet (only 'full' is)")
    return lambda path: True


def plan_spec(spec, device_count: int | None = None, steps_per_epoch: int | None = None) -> plan_lib.Plan:
    """The Plan for a spec: reads only config.json, never weights."""
    _, hf_config = read_model_config(spec.model.base)
    _, _, module = build_module(hf_config, spec)
    infos = shapes.param_infos(shapes.abstract_boxed_params(module))
    trainable = trainable_fn(spec) if spec.method.kind == "full" else None
    plan = plan_lib.compile_plan(spec, hf_config, device_count or jax.device_count(), param_infos=infos,
                                 trainable=trainable, steps_per_epoch=steps_per_epoch)
    if spec.method.kind != "full":
        plan = dataclasses.replace(plan, notes=plan.notes + (
            f"method {spec.method.kind}: trainable counts and memory are those of a full fine-tune until the "
            f"method is wired into the planner",))
    return plan


# ------------------------------------------------------------------ tokenizer and data


def tokenizer_dir(spec, model_dir: Path) -> Path:
    return Path(spec.model.tokenizer) if spec.model.tokenizer else Path(model_dir)


def tokenizer_hash(directory: str | os.PathLike) -> str | None:
    """sha256 over the tokenizer files present (names and bytes), or None when there are none."""
    from ftc.backends.jax.hf_checkpoint import TOKENIZER_FILES

    h = hashlib.sha256()
    found = False
    for name in TOKENIZER_FILES:
        path = Path(directory) / name
        if path.is_file():
            found = True
            h.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16] if found else None


def load_tokenizer(directory: str | os.PathLike):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory), local_files_only=True, trust_remote_code=False)


def build_data(spec, tokenizer):
    """The run's `data.Datasets` (read -> clean -> validation hold-out -> tokenise -> pack ->
    grain), from the spec's [data] keys; this process's share of every batch."""
    from ftc.backends.jax import data as data_lib

    d = spec.data
    clean = d.clean
    return data_lib.build_datasets(
        format=d.format, train=d.train_sources, tokenizer=tokenizer, max_seq_len=spec.model.max_seq_len,
        batch_size=spec.training.batch_size, validation=d.validation, validation_split=d.validation_split or 0.0,
        packing=bool(d.packing), train_on=d.train_on or "assistant", shuffle=d.shuffle,
        clean={"dedupe": clean.dedupe, "drop_empty": clean.drop_empty, "roles": clean.roles,
               "unknown_roles": clean.unknown_roles, "overlong": clean.overlong},
        on_bad_row=d.on_bad_row, labels=d.labels, seed=spec.training.seed,
        process_index=jax.process_index(), process_count=jax.process_count())


def write_data_stats(stats, run_dir: str) -> None:
    """`<run_dir>/data_stats.json`: rows read, kept and dropped per reason, packing efficiency."""
    if jax.process_index() != 0:
        return
    os.makedirs(run_dir, exist_ok=True)
    tmp = os.path.join(run_dir, DATA_STATS + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(stats.to_dict(), f, indent=2)
        f.write("\n")
    os.replace(tmp, os.path.join(run_dir, DATA_STATS))


# ------------------------------------------------------------------ stop signals


class StopSignals:
    """Turns SIGTERM / SIGINT into a flag the loop polls (a second SIGINT kills at once)."""

    def __init__(self):
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


# ------------------------------------------------------------------ the loop


@dataclasses.dataclass
class LoopConfig:
    total_steps: int
    log_every: int = 10
    eval_every: int = 0  # 0: only at the end (and at step 0)
    eval_at_start: bool = True  # evaluate before the first step: the starting validation loss
    checkpoint_every: int = 0  # 0: only at the end and on interrupt
    progress: bool = True


def train_loop(
    steps: ts.Steps,
    state: dict,
    train_iter: Iterator[dict],
    config: LoopConfig,
    *,
    checkpointer: ckpt_lib.Checkpointer | None,
    metadata: dict,
    logger: run_log.RunLogger | None = None,
    eval_batches: Callable[[], Iterable[dict]] | None = None,
    stop: StopSignals | None = None,
    after_step: Callable[[int], None] | None = None,
) -> dict:
    """Train from `state["step"]` to `config.total_steps`. Returns the final state.

    `train_iter` yields host batches of [global batch (this process's share), T] and has
    get_state() (grain); its state is saved with every checkpoint. `after_step(step)` is a test
    hook, called after each step is dispatched.
    """
    from tqdm import tqdm

    step = int(jax.device_get(state["step"]))
    bar = tqdm(total=config.total_steps, initial=step, disable=not config.progress or jax.process_index() != 0,
               unit="step", dynamic_ncols=True)
    window_tokens, window_start = 0.0, time.perf_counter()
    metrics = None  # the last step's metrics (device arrays), checked before any save

    def checked(at: int) -> dict | None:
        # Reading the loss waits for the step: done at log/checkpoint/stop points only, so the
        # host runs ahead of the device in between. No checkpoint holds an unchecked state.
        if metrics is None:
            return None
        host = ts.host_metrics(metrics)
        ts.check_finite(host, at)
        return host

    def save(at: int):
        checked(at)
        if checkpointer is not None:
            checkpointer.save(at, state, train_iter.get_state(), metadata)

    def run_eval(at: int):
        nonlocal window_start
        if eval_batches is None:
            return
        began = time.perf_counter()
        result = ts.evaluate(steps, state, eval_batches())
        if logger:
            logger.log(at, "validation", result)
        shown = [f"{k.replace('_', ' ')} {result[k]:.4f}" for k in SHOWN_VALIDATION if k in result]
        bar.write(f"step {at}: validation {', '.join(shown)}")
        window_start += time.perf_counter() - began  # tokens/s counts training time only

    try:
        if step == 0 and config.eval_at_start:
            run_eval(0)
        while step < config.total_steps:
            if stop is not None and stop.signum is not None:
                save(step)
                if checkpointer is not None:
                    checkpointer.wait()
                name = signal.Signals(stop.signum).name
                raise Interrupted(f"{name}: saved a checkpoint at step {step}; run again to resume")
            batch = next(train_iter)
            state, metrics = steps.train(state, steps.put_train_batch(batch))
            step += 1
            window_tokens += float(ts.real_tokens(batch)) * jax.process_count()
            if after_step is not None:
                after_step(step)
            bar.update(1)
            last = step == config.total_steps
            if step % max(config.log_every, 1) == 0 or last:
                host = checked(step)
                elapsed = max(time.perf_counter() - window_start, 1e-9)
                row = {**host, "tokens_per_second": window_tokens / elapsed, **run_log.device_memory()}
                if logger:
                    logger.log(step, "train", row)
                bar.set_postfix(loss=f"{host['loss']:.4f}", tok_s=f"{row['tokens_per_second']:.0f}")
                window_tokens, window_start = 0.0, time.perf_counter()
            if last or (config.eval_every and step % config.eval_every == 0):
                run_eval(step)
            if last or (config.checkpoint_every and step % config.checkpoint_every == 0):
                save(step)
        if checkpointer is not None:
            checkpointer.wait()
    finally:
        bar.close()
    return state


# ------------------------------------------------------------------ program assembly


def _abstract_params_with_shardings(abstract_params, shardings):
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), abstract_params, shardings)


def _initial_params(spec, model_dir: Path, abstract_params, param_shardings):
    """Parameters to start from: `model.init_from` (a run dir's latest checkpoint, or an export
    / HF dir), else the base model's weights; placed by `param_shardings`."""
    from ftc.backends.jax.hf_checkpoint import load_model

    dtype = jnp.dtype(spec.model.param_dtype)
    source = spec.model.init_from
    if source and os.path.isdir(ckpt_lib.checkpoint_dir(source)):
        reader = ckpt_lib.Checkpointer(ckpt_lib.checkpoint_dir(source), read_only=True)
        return reader.restore_params(_abstract_params_with_shardings(abstract_params, param_shardings))
    return load_model(source or model_dir, dtype=dtype, shardings=param_shardings).params


def _write_resolved_spec(spec, run_dir: str) -> None:
    if jax.process_index() != 0:
        return
    os.makedirs(run_dir, exist_ok=True)
    tmp = os.path.join(run_dir, RESOLVED_SPEC + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(spec.to_dict(), f, indent=2)
        f.write("\n")
    os.replace(tmp, os.path.join(run_dir, RESOLVED_SPEC))


def run(spec, *, echo: Callable[[str], None] = print, after_step: Callable[[int], None] | None = None) -> dict:
    """Train `spec` (an ftc.spec.Spec) into its run directory; resumes from the latest checkpoint
    there. Returns {"run_dir", "step", "total_steps"}. `after_step` is passed to `train_loop`."""
    run_dir = os.path.abspath(spec.run_dir)
    model_dir, hf_config = read_model_config(spec.model.base)
    if model_dir is None:
        raise FileNotFoundError(f"model.base={spec.model.base!r} has a config.json but no *.safetensors weights")
    tok_dir = tokenizer_dir(spec, model_dir)
    tokenizer = load_tokenizer(tok_dir)
    tok_hash = tokenizer_hash(tok_dir)
    data = build_data(spec, tokenizer)
    echo(data.stats.summary())
    spe = data.steps_per_epoch

    family, arch, module = build_module(hf_config, spec)
    boxed = shapes.abstract_boxed_params(module)
    infos = shapes.param_infos(boxed)
    plan = plan_lib.compile_plan(spec, hf_config, jax.device_count(), param_infos=infos,
                                 trainable=trainable_fn(spec), steps_per_epoch=spe)
    echo(plan_lib.format_plan(plan, max_params=0))
    total = plan.steps.total_steps
    mesh = mesh_lib.mesh_for_plan(plan)
    abstract_params = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.dtype(spec.model.param_dtype)),
                                   nn.unbox(boxed))
    mask = opt_lib.trainable_mask(abstract_params, trainable_fn(spec))
    schedule = opt_lib.make_schedule(plan.schedule, total)
    tx = opt_lib.make_optimizer(plan.optimizer, schedule, {i.path: i.axes for i in infos})
    state_abs = ts.abstract_state(abstract_params, tx, mask)
    state_sh = ts.state_shardings(mesh, state_abs, plan.partitions())
    steps = ts.build_steps(module, tx, schedule, mask, mesh, state_sh, accum_steps=plan.batch.accum_steps)

    checkpointer = ckpt_lib.Checkpointer(ckpt_lib.checkpoint_dir(run_dir), keep=spec.checkpoint.keep,
                                         async_save=spec.checkpoint.async_)
    metadata = {"spec": spec.to_dict(), "tokenizer_hash": tok_hash, "plan_fingerprint": plan.fingerprint(),
                "family": family.name, "model_dir": str(model_dir)}
    latest = checkpointer.latest_step()
    data_state = None
    if latest is not None:
        saved = checkpointer.metadata(latest)
        ckpt_lib.check_resumable(saved, metadata["spec"], tok_hash, f"{checkpointer.directory}/{latest}")
        state, data_state, _ = checkpointer.restore(
            jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), state_abs, state_sh),
            latest)
        echo(f"resumed from step {latest} ({checkpointer.directory})")
    else:
        params = _initial_params(spec, model_dir, abstract_params, state_sh["params"])
        init = jax.jit(lambda p: ts.init_state(p, tx, mask, spec.training.seed), out_shardings=state_sh,
                       donate_argnums=(0,))
        state = init(params)
    _write_resolved_spec(spec, run_dir)
    write_data_stats(data.stats, run_dir)

    train_iter = data.train_iterator(data_state)  # positioned where the checkpoint left off
    eval_batches = None
    if data.validation_rows is not None:
        eval_batches = lambda: data.validation_batches(spec.training.micro_batch_size)
    logger = run_log.RunLogger(run_dir, tensorboard=spec.logging.tensorboard, resume_step=latest)
    config = LoopConfig(total_steps=total, log_every=spec.training.log_every, eval_every=spec.training.eval_every,
                        checkpoint_every=spec.checkpoint.every, progress=spec.logging.progress)
    try:
        with StopSignals() as stop:
            state = train_loop(steps, state, train_iter, config, checkpointer=checkpointer, metadata=metadata,
                               logger=logger, eval_batches=eval_batches, stop=stop, after_step=after_step)
    finally:
        logger.close()
        checkpointer.close()
    return {"run_dir": run_dir, "step": int(jax.device_get(state["step"])), "total_steps": total}
