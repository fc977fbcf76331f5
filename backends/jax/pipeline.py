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
import math
import os
import signal
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ftc.backends.jax.state import checkpoint as ckpt_lib
from ftc.backends.jax.train import device_peak
from ftc.backends.jax.state import frozen_base
from ftc.backends.jax.train import mesh as mesh_lib
from ftc.backends.jax.train import optimizer as opt_lib
from ftc.backends.jax.train import run_log
from ftc.backends.jax.models import shapes
from ftc.backends.jax.train import step as ts
from ftc.compiler import flops as flops_lib
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
    from ftc.backends.jax.io.hf_checkpoint import read_hf_config

    local = Path(base).expanduser()
    if local.is_dir() and (local / "config.json").is_file() and not any(local.glob("*.safetensors")):
        return None, read_hf_config(local)
    from ftc.backends.jax.io.model_source import resolve_model_source

    model_dir = resolve_model_source(base)
    return model_dir, read_hf_config(model_dir)


def build_model(hf_config: dict, spec, dtype=None):
    """The program's model for a spec (a `methods.MethodModel`): the base family's module with the
    spec's remat policy, transformed by `[method]` (LoRA / QLoRA / adapter), plus its plan and
    trainable predicate. `.module` trains, `.eval_module` evaluates (no LoRA dropout), `.base` is
    the untransformed family module; `methods.disabled_params(model, params)` makes the method a
    no-op (its base model, e.g. a DPO reference). `dtype`: compute dtype, default spec.model.dtype."""
    from ftc.backends.jax.methods import base as methods

    return methods.build_model(hf_config, spec, dtype)


def build_module(hf_config: dict, spec):
    """(family, arch, flax module that trains) for a spec: see `build_model`."""
    model = build_model(hf_config, spec)
    return model.family, model.arch, model.module


def trainable_fn(spec) -> Callable[[str], bool]:
    """"/"-joined param path -> trained? for the spec's method (see methods.py)."""
    from ftc.backends.jax.methods import base as methods

    return methods.trainable_predicate(spec.method.kind)


def method_plan(spec, hf_config: dict, device_count: int, model=None, steps_per_epoch: int | None = None
                ) -> tuple[plan_lib.Plan, Any]:
    """(Plan, abstract params) for a spec's method. The plan's counts are the method's: trainable
    weights vs every weight of the model (an NF4 kernel counts its logical weights), with a note on
    the method's settings and, for QLoRA, the frozen base's bytes."""
    from ftc.backends.jax.methods import base as methods

    model = model or build_model(hf_config, spec)
    infos = shapes.param_infos(shapes.abstract_boxed_params(model.module))
    abstract = methods.abstract_params(model, spec.model.param_dtype)
    plan = plan_lib.compile_plan(spec, hf_config, device_count, param_infos=infos, trainable=model.trainable,
                                 steps_per_epoch=steps_per_epoch,
                                 matmul_weights=matmul_weights(model, abstract, plan_lib.model_summary(hf_config)))
    counts = methods.method_counts(model, abstract)
    plan = dataclasses.replace(plan, param_count=counts.total, trainable_count=counts.trainable,
                               notes=tuple(counts.lines()) + plan.notes)
    return plan, abstract


def matmul_weights(model, method_params, summary: plan_lib.ModelSummary) -> flops_lib.MatmulWeights:
    """What the FLOP count needs of a method's weights: the family's dense kernels (whatever the
    method stores them as, NF4 included) and which of them train, plus the trainable matmul
    weights the method adds (LoRA factors, adapter kernels)."""
    from flax import traverse_util

    from ftc.backends.jax.io.hf_checkpoint import abstract_params as family_abstract

    base = traverse_util.flatten_dict(nn.unbox(family_abstract(model.family, model.arch, "float32")), sep="/")
    added = traverse_util.flatten_dict(nn.unbox(method_params), sep="/")
    kernels = {k: math.prod(v.shape) for k, v in base.items() if k.rsplit("/", 1)[-1] == "kernel"}
    n = sum(kernels.values())
    trained = sum(size for k, size in kernels.items() if k in added and model.trainable(k))
    adapter = sum(math.prod(v.shape) for k, v in added.items()
                  if k not in base and len(v.shape) >= 2 and model.trainable(k))
    if summary.tied_embeddings:
        table = [k for k, v in base.items() if tuple(v.shape) == (summary.vocab, summary.hidden)]
        n += summary.vocab * summary.hidden
        trained += summary.vocab * summary.hidden if any(k in added and model.trainable(k) for k in table) else 0
    return flops_lib.MatmulWeights(n, trained, adapter)


def plan_spec(spec, device_count: int | None = None, steps_per_epoch: int | None = None) -> plan_lib.Plan:
    """The Plan for a spec: reads only config.json, never weights."""
    _, hf_config = read_model_config(spec.model.base)
    return method_plan(spec, hf_config, device_count or jax.device_count(), steps_per_epoch=steps_per_epoch)[0]


# ------------------------------------------------------------------ tokenizer and data


def tokenizer_dir(spec, model_dir: Path) -> Path:
    return Path(spec.model.tokenizer) if spec.model.tokenizer else Path(model_dir)


def tokenizer_hash(directory: str | os.PathLike) -> str | None:
    """sha256 over the tokenizer files present (names and bytes), or None when there are none."""
    from ftc.backends.jax.io.hf_checkpoint import TOKENIZER_FILES

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
    from ftc.backends.jax.data import datasets as data_lib

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


# ------------------------------------------------------------------ objective


def build_objective(spec, model) -> tuple[ts.Objective, bool]:
    """(what the steps compute for `training.objective`, whether the train state carries a frozen
    reference copy of the starting parameters). DPO's reference model: for lora / qlora / adapter
    the same parameters with the method disabled (no second copy of the base; an `init_from`
    adapter is disabled too, so the reference is its base); for a full fine-tune a frozen copy
    of the starting parameters, one extra parameter-sized buffer (the plan's memory counts it)."""
    t = spec.training
    if t.objective == "sft":
        return ts.CAUSAL_LM, False
    if t.objective == "dpo":
        from ftc.backends.jax.objectives import dpo
        from ftc.backends.jax.methods import base as methods

        beta = 0.1 if t.dpo_beta is None else t.dpo_beta
        if model.kind == "full":
            return dpo.objective(beta), True
        return dpo.objective(beta, reference_params=lambda params: methods.disabled_params(model, params)), False
    raise NotImplementedError(f"training.objective={t.objective!r} with method.kind={spec.method.kind!r} is not "
                              f"something ftc run trains (sft and dpo train a causal LM; classify is method.kind "
                              f"= 'probe')")


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
    flops_per_step: float = 0.0  # model FLOPs of one optimizer step (plan); 0: no MFU
    peak_flops: float = 0.0      # peak FLOP/s of every device of the run together


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
    window_tokens, window_steps, window_start = 0.0, 0, time.perf_counter()
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
        if jax.process_index() == 0:
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
            window_steps += 1
            if after_step is not None:
                after_step(step)
            bar.update(1)
            last = step == config.total_steps
            if step % max(config.log_every, 1) == 0 or last:
                host = checked(step)
                elapsed = max(time.perf_counter() - window_start, 1e-9)
                row = {**host, "tokens_per_second": window_tokens / elapsed}
                if config.flops_per_step and config.peak_flops:
                    row["mfu"] = config.flops_per_step * window_steps / elapsed / config.peak_flops
                row.update(run_log.device_memory())
                row.update(run_log.host_memory())
                if logger:
                    logger.log(step, "train", row)
                bar.set_postfix(loss=f"{host['loss']:.4f}", tok_s=f"{row['tokens_per_second']:.0f}")
                window_tokens, window_steps, window_start = 0.0, 0, time.perf_counter()
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


def _initial_params(spec, model_dir: Path, abstract_params, param_shardings, model=None, *,
                    init_step: int | None = None, method_weights: bool = True):
    """Parameters to start from, placed by `param_shardings` (a tree matching the method's params):

    model.init_from = a run directory   its checkpoint (`init_step`, default its latest; a checkpoint
                                        that leaves its frozen base out has it rebuilt, see
                                        frozen_base.py): the whole tree when that run trained
                                        the same method, or a full fine-tune's params as this
                                        method's base
    model.init_from = a PEFT LoRA dir   (lora, qlora) base from model.base, factors from the adapter
    model.init_from = an ftc adapter    (adapter) adapters from the export; the base from the export
                      export            when it holds one (format hf), else from model.base
    model.init_from = an HF directory   its weights as the base
    otherwise                           model.base's weights
    The method's fresh parameters (LoRA A random and B zero, NF4 storage, adapters with up = 0) are
    added to a base, so a run starts computing exactly what its base model computes.
    Deterministic: resume and export rebuild a checkpoint's frozen part with it (frozen_base.py),
    where `method_weights=False` skips reading the trained weights of a PEFT / adapter init_from."""
    from ftc.backends.jax.methods import adapter as adapters, lora, base as methods
    from ftc.backends.jax.io.hf_checkpoint import abstract_params as family_abstract, load_model

    if model is None:
        model = build_model(read_model_config(spec.model.base)[1], spec)
    dtype = jnp.dtype(spec.model.param_dtype)
    kind = model.kind
    source = spec.model.init_from
    base_dir, method_dir = model_dir, None
    if source and os.path.isdir(ckpt_lib.checkpoint_dir(source)):
        reader = ckpt_lib.Checkpointer(ckpt_lib.checkpoint_dir(source), read_only=True)
        step = reader.latest_step() if init_step is None else init_step
        if step is None:
            raise FileNotFoundError(f"model.init_from={source!r}: no complete checkpoint in {reader.directory}")
        if step not in reader.all_steps():
            raise ckpt_lib.ResumeRefusedError(
                f"model.init_from={source!r}: its checkpoint at step {step}, which this run started from, is gone "
                f"(there are: {', '.join(map(str, reader.all_steps())) or 'none'})")
        meta = reader.metadata(step)
        earlier = meta.get("spec", {}).get("method", {}).get("kind", "full")
        if earlier == kind:
            return frozen_base.restore_params(reader, step, meta, model,
                                              _abstract_params_with_shardings(abstract_params, param_shardings),
                                              what=f"model.init_from={source!r}")
        if earlier != "full":
            raise ValueError(f"model.init_from={source!r} is a {earlier} run; a method.kind={kind!r} run starts "
                             f"from a run of the same method or of a full fine-tune. Export it first (`ftc export "
                             f"{source} --format hf` merges a LoRA) and give the export directory as model.init_from")
        base = reader.restore_params(_abstract_params_with_shardings(
            family_abstract(model.family, model.arch, dtype), methods.base_shardings(model, param_shardings)), step)
    else:
        if source:
            source_path = Path(source)
            adapter_config = source_path / "adapter_config.json"
            if adapter_config.is_file():
                found = json.loads(adapter_config.read_text())
                want = ("lora", "qlora") if found.get("peft_type") else ("adapter",) \
                    if found.get("format") == adapters.FORMAT else ()
                if kind not in want:
                    what = f"a PEFT {found.get('peft_type')} adapter" if found.get("peft_type") else "an adapter export"
                    raise ValueError(f"model.init_from={source!r} is {what}, which a method.kind={kind!r} run cannot "
                                     f"start from" + (f" (expected method.kind {' or '.join(want)})" if want else ""))
                method_dir = source_path
            elif (source_path / "config.json").is_file():
                base_dir = source_path
                nested = source_path / "ftc_adapters"
                if (nested / "adapter_config.json").is_file():
                    if kind != "adapter":
                        raise ValueError(f"model.init_from={source!r} holds bottleneck adapters (ftc_adapters/) "
                                         f"that a method.kind={kind!r} run would drop; start an adapter run from it, "
                                         f"or a {kind} run from its base model")
                    method_dir = nested
            else:
                raise ValueError(f"model.init_from={source!r}: expected a run directory (with checkpoints/), a "
                                 f"Hugging Face directory (config.json), a PEFT adapter or an ftc adapter export")
        base = load_model(base_dir, dtype=dtype, shardings=methods.base_shardings(model, param_shardings)).params
    params = methods.init_method_params(model, base, spec.training.seed, shardings=param_shardings, param_dtype=dtype)
    if method_dir is not None and method_weights:
        if kind == "adapter":
            params = adapters.import_adapters(model.plan, method_dir, params)
        else:
            params = lora.load_peft_adapter(method_dir, model.family, model.arch, model.plan, params)
        params = jax.device_put(params, param_shardings)
    return params


def _write_resolved_spec(spec, run_dir: str) -> None:
    if jax.process_index() != 0:
        return
    os.makedirs(run_dir, exist_ok=True)
    tmp = os.path.join(run_dir, RESOLVED_SPEC + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(spec.to_dict(), f, indent=2)
        f.write("\n")
    os.replace(tmp, os.path.join(run_dir, RESOLVED_SPEC))


def use_compilation_cache() -> str | None:
    """Keep compiled steps in JAX's persistent cache (`$FTC_CACHE/jax`, or the user's own
    `JAX_COMPILATION_CACHE_DIR`), so a resumed or repeated run skips XLA compilation (measured on
    CPU: 7.5 s -> 0.95 s for the bench step). Returns the directory in use."""
    if not jax.config.jax_compilation_cache_dir:
        from ftc.backends.jax.io.gguf_import import default_cache_root

        jax.config.update("jax_compilation_cache_dir", str(default_cache_root() / "jax"))
    return jax.config.jax_compilation_cache_dir


def run(spec, *, echo: Callable[[str], None] = print, after_step: Callable[[int], None] | None = None) -> dict:
    """Train `spec` (an ftc.spec.Spec) into its run directory; resumes from the latest checkpoint
    there. Returns {"run_dir", "step", "total_steps"}. `after_step` is passed to `train_loop`."""
    use_compilation_cache()
    if spec.method.kind == "probe":
        return run_probe(spec, echo=echo)
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

    model = build_model(hf_config, spec)
    family, module = model.family, model.module
    # Abstract params as the method creates them: floating leaves in param_dtype, NF4 storage as is.
    plan, abstract_params = method_plan(spec, hf_config, jax.device_count(), model=model, steps_per_epoch=spe)
    echo(plan_lib.format_plan(plan, max_params=0))
    total = plan.steps.total_steps
    mesh = mesh_lib.mesh_for_plan(plan)
    mask = opt_lib.trainable_mask(abstract_params, model.trainable)
    schedule = opt_lib.make_schedule(plan.schedule, total)
    tx = opt_lib.make_optimizer(plan.optimizer, schedule, {p.path: p.axes for p in plan.params})
    objective, with_reference = build_objective(spec, model)
    state_abs = ts.abstract_state(abstract_params, tx, mask, reference=with_reference)
    state_sh = ts.state_shardings(mesh, state_abs, plan.partitions())
    steps = ts.build_steps(module, tx, schedule, mask, mesh, state_sh, accum_steps=plan.batch.accum_steps,
                           eval_model=model.eval_module, objective=objective)

    # Checkpoints hold what trains; the frozen base and a reference copy are rebuilt on resume.
    saved_params = frozen_base.saved_mask(abstract_params, model.trainable)
    checkpointer = ckpt_lib.Checkpointer(ckpt_lib.checkpoint_dir(run_dir), keep=spec.checkpoint.keep,
                                         async_save=spec.checkpoint.async_, saved_params=saved_params)
    metadata = {"spec": spec.to_dict(), "tokenizer_hash": tok_hash, "plan_fingerprint": plan.fingerprint(),
                "family": family.name, "model_dir": str(model_dir)}
    latest = checkpointer.latest_step()
    data_state = None
    if latest is not None:
        saved = checkpointer.metadata(latest)
        ckpt_lib.check_resumable(saved, metadata["spec"], tok_hash, f"{checkpointer.directory}/{latest}")
        state, data_state = frozen_base.restore_state(
            checkpointer, latest, saved, model_dir, model,
            jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), state_abs, state_sh))
        if saved.get("format_version", 1) >= 2:
            frozen = saved.get("frozen")
        else:  # format 1 held the whole state: record its frozen part for the checkpoints to come
            from ftc.spec import spec_from_dict

            started = spec_from_dict(saved["spec"])
            frozen = frozen_base.record(started, model_dir, state, saved_params, frozen_base.init_from_step(started))
        echo(f"resumed from step {latest} ({checkpointer.directory})")
    else:
        init_step = frozen_base.init_from_step(spec)
        params = _initial_params(spec, model_dir, abstract_params, state_sh["params"], model=model,
                                 init_step=init_step)
        init = jax.jit(lambda p: ts.init_state(p, tx, mask, spec.training.seed, reference=with_reference),
                       out_shardings=state_sh, donate_argnums=(0,))
        state = init(params)
        frozen = frozen_base.record(spec, model_dir, state, saved_params, init_step)
    if frozen is not None:
        metadata["frozen"] = frozen
    _write_resolved_spec(spec, run_dir)
    write_data_stats(data.stats, run_dir)

    train_iter = data.train_iterator(data_state)  # positioned where the checkpoint left off
    eval_batches = None
    if data.validation_rows is not None:
        eval_batches = lambda: data.validation_batches(spec.training.micro_batch_size)
    logger = run_log.RunLogger(run_dir, tensorboard=spec.logging.tensorboard, resume_step=latest)
    peak, peak_source = device_peak.peak_flops(spec.model.dtype, spec.logging.peak_tflops)
    # CPU "devices" forced by XLA_FLAGS share the host's cores: the peak is per host there.
    peak_units = jax.process_count() if jax.devices()[0].platform == "cpu" else jax.device_count()
    echo(f"MFU: model FLOPs over {peak / 1e12:.4g} TFLOP/s x {peak_units} "
         f"{'host' if jax.devices()[0].platform == 'cpu' else 'device'}(s) ({peak_source})")
    config = LoopConfig(total_steps=total, log_every=spec.training.log_every, eval_every=spec.training.eval_every,
                        checkpoint_every=spec.checkpoint.every, progress=spec.logging.progress,
                        flops_per_step=plan.flops_per_token * plan.batch.tokens_per_step,
                        peak_flops=peak * peak_units)
    try:
        with StopSignals() as stop:
            state = train_loop(steps, state, train_iter, config, checkpointer=checkpointer, metadata=metadata,
                               logger=logger, eval_batches=eval_batches, stop=stop, after_step=after_step)
    finally:
        logger.close()
        checkpointer.close()
    summary = {"run_dir": run_dir, "step": int(jax.device_get(state["step"])), "total_steps": total}
    del state  # export reads the final checkpoint back, sharded its own way
    if summary["step"] >= total:
        summary["export"] = export_at_end(run_dir, echo=echo)
    return summary


def export_at_end(run_dir: str, *, echo: Callable[[str], None] = print) -> str:
    """The run's export/ (replaced if there), as the spec's [export] asks: `ftc export RUN_DIR`
    with its defaults. Raises export.VerifyFailedError when export.verify finds a difference."""
    from ftc.backends.jax.io import export as export_lib

    result, check = export_lib.export_run(run_dir, force=True, echo=echo)
    if check is not None and not check.ok:
        raise export_lib.VerifyFailedError(f"{result.out_dir}: {check.summary()}")
    echo(f"to export again in another dtype or format: ftc export {run_dir} --out DIR [--dtype ...] [--format ...]")
    return str(result.out_dir)


def run_probe(spec, *, echo: Callable[[str], None] = print) -> dict:
    """`ftc run` for method.kind = "probe": pooled features of the frozen base over the
    classification data (cached under RUN_DIR/features), a head trained on them with the spec's
    optimizer and schedule (probe.run_probe), metrics.jsonl, probe_metrics.json and export/.
    A finished probe run with the same spec is not redone; a changed training-relevant key is
    refused as for any run; changed [export] keys run it again (the features come from the cache)."""
    import shutil

    from ftc.backends.jax.io import export as export_lib
    from ftc.backends.jax.methods import base as methods, probe
    from ftc.backends.jax.io.hf_checkpoint import LoadedModel

    run_dir = os.path.abspath(spec.run_dir)
    done, resolved = os.path.join(run_dir, "probe_metrics.json"), os.path.join(run_dir, RESOLVED_SPEC)
    if os.path.exists(done) and os.path.exists(resolved):
        with open(resolved, encoding="utf-8") as f:
            old = json.load(f)
        ckpt_lib.check_resumable({"spec": old}, spec.to_dict(), None, resolved)
        if old == spec.to_dict():
            with open(done, encoding="utf-8") as f:
                metrics = json.load(f)
            echo(f"probe run already complete in {run_dir} (probe_metrics.json); nothing to do")
            return {"run_dir": run_dir, "step": metrics["steps"], "total_steps": metrics["steps"], "metrics": metrics,
                    "export": os.path.join(run_dir, "export")}
    model_dir, hf_config = read_model_config(spec.model.base)
    if model_dir is None:
        raise FileNotFoundError(f"model.base={spec.model.base!r} has a config.json but no *.safetensors weights")
    tok_dir = tokenizer_dir(spec, model_dir)
    tokenizer = load_tokenizer(tok_dir)
    data = build_data(spec, tokenizer)
    echo(data.stats.summary())
    model = build_model(hf_config, spec)
    abstract = methods.abstract_params(model, spec.model.param_dtype)
    counts = methods.method_counts(model, abstract)
    for line in counts.lines():
        echo(line)
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    params = _initial_params(spec, model_dir, abstract, jax.tree.map(lambda _: one, abstract), model=model)
    loaded = LoadedModel(model.family, model.arch, params, hf_config, Path(model_dir))

    train = probe.ClassificationArrays.from_data_rows(data.train_rows)
    validation = probe.ClassificationArrays.from_data_rows(data.validation_rows) \
        if data.validation_rows is not None else None
    t = spec.training
    batch_size = min(t.batch_size, len(train.labels))
    steps = t.steps if t.steps is not None else t.epochs * max(1, len(train.labels) // batch_size)
    sched = t.schedule
    schedule = opt_lib.make_schedule(plan_lib.SchedulePlan(sched.kind, t.learning_rate, sched.warmup_steps,
                                                           sched.warmup_ratio, sched.min_lr_ratio), steps)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else hf_config.get("pad_token_id")
    if jax.process_index() == 0:  # a re-run (changed [export]) starts these afresh
        for stale in ("metrics.jsonl", "probe_metrics.json", export_lib.PROBE_HEAD):
            if os.path.exists(os.path.join(run_dir, stale)):
                os.remove(os.path.join(run_dir, stale))
        shutil.rmtree(os.path.join(run_dir, "export"), ignore_errors=True)
    _write_resolved_spec(spec, run_dir)
    write_data_stats(data.stats, run_dir)
    result = probe.run_probe(loaded, model.config, train, list(data.label_names), validation=validation,
                             run_dir=run_dir, dtype=jnp.dtype(spec.model.dtype), pad_token_id=pad_id, steps=steps,
                             batch_size=batch_size, tx=opt_lib.make_optimizer(t.optimizer, schedule),
                             seed=t.seed, log_every=t.log_every, export=True, export_dtype=spec.export.dtype,
                             tokenizer_dir=str(tok_dir) if tokenizer_hash(tok_dir) else None)
    m = result.metrics
    for split in ("train", "validation"):
        if split in m:
            r = m[split]
            echo(f"probe {split}: accuracy {r['accuracy']:.4f} (majority baseline {r['majority_accuracy']:.4f}), "
                 f"macro-F1 {r['macro_f1']:.4f} (baseline {r['majority_macro_f1']:.4f}) on {r['examples']} examples")
    if result.export:
        echo(f"exported {result.export['kind']} ({result.export['architecture']}) to {result.export['dir']}"
             + (f"; note: {m['export_note']}" if m.get("export_note") else ""))
    if jax.process_index() == 0:  # the trained head as ftc holds it: what `ftc export --verify` checks against
        from safetensors.numpy import save_file

        save_file({k: np.ascontiguousarray(v, np.float32) for k, v in result.head.items()},
                  os.path.join(run_dir, export_lib.PROBE_HEAD))
    if spec.export.verify and result.export:
        check = export_lib.verify_probe_export(run_dir, result.export["dir"])
        echo("verify: " + check.summary())
        if not check.ok:
            raise export_lib.VerifyFailedError(f"{result.export['dir']}: {check.summary()}")
    return {"run_dir": run_dir, "step": steps, "total_steps": steps, "metrics": m,
            "export": result.export["dir"] if result.export else None}
