"""The ftc side of the benchmark, in its own process: the model loaded from the same Hugging Face
directory (hf_checkpoint.load_model), the optimizer from optimizer.make_optimizer, and the jitted
train step from train/step.py build_steps on a 1-device mesh -- the pieces `ftc run` assembles.

    python -m bench.ftc_worker JOB.json RESULT.json

The train step is lowered and compiled ahead of time from the abstract state, in a thread while the
weights load (train/ahead.py, as `ftc run` does); `compile_s` is what is left of that compile once
the state is built, and that same executable runs every step.
"""

from __future__ import annotations

import time

_T_START = time.perf_counter()

import dataclasses  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common  # noqa: E402


def _method(job: common.Job, family, arch, module):
    """(module, base params -> the method's params, trainable path predicate) for the job's method."""
    if job.method == "full":
        return module, lambda params: params, lambda path: True
    import jax

    from ftc.backends.jax.methods import lora

    c = job.config
    # PEFT's LoraConfig(r, lora_alpha, target_modules="all-linear", lora_dropout=0) on the torch side.
    config = lora.LoraConfig(
        rank=c.lora_rank, alpha=float(c.lora_alpha), dropout=0.0, rslora=False, targets=lora.ALL_LINEAR
    )
    quant = lora.QuantConfig(block_size=c.quant_block_size, double_quant=False) if job.method == "qlora" else None
    model = lora.adapt(family, arch, module, config, quant=quant)
    return model, lambda params: lora.init_params(model, params, jax.random.key(0)), lora.is_trainable


@dataclasses.dataclass
class Program:
    """ftc's training program for a job, ready to step: the AOT-compiled train step, its state,
    and a host batch for step i (the same token array the PyTorch worker reads)."""

    compiled: Any
    state: Any
    put_batch: Callable[[int], dict]
    trainable_params: int
    device: Any
    timings: dict  # import_s, load_s (the compile running beside it), compile_s (what is left of it)
    rss_after_import: int
    versions: dict
    memory: dict  # rss_after_load_bytes, peak_rss_after_load_bytes, peak_rss_after_compile_bytes


def build(job: common.Job) -> Program:
    t0 = time.perf_counter()
    import flax
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np

    from ftc.backends.jax.io import hf_checkpoint
    from ftc.backends.jax.models import family_for, shapes
    from ftc.backends.jax.train import ahead
    from ftc.backends.jax.train import mesh as mesh_lib
    from ftc.backends.jax.train import optimizer as opt_lib
    from ftc.backends.jax.train import step as ts
    from ftc.compiler import plan as plan_lib
    from ftc.compiler import sharding_rules

    c = job.config
    device = jax.devices()[0]
    if c.device == "gpu" and device.platform != "gpu":
        raise RuntimeError(f"config asks for a GPU but jax's first device is {device} (install jax[cuda12])")
    versions = {"jax": jax.__version__, "flax": flax.__version__}
    if job.compile_cache:  # as `ftc run` starts: JAX's persistent cache under $FTC_CACHE/jax
        os.environ["FTC_CACHE"] = job.compile_cache
        from ftc.backends.jax.train.compile_cache import use_compilation_cache

        use_compilation_cache()
    timings = {"import_s": time.perf_counter() - t0}
    rss_after_import = common.rss_bytes()

    # ---- load: the program from config.json alone, its train step compiling in a thread (as in
    # `ftc run`: train/ahead.py) while the weights load and the method and optimizer state are made
    t0 = time.perf_counter()
    hf_config = hf_checkpoint.read_hf_config(job.model_dir)
    family = family_for(hf_config)
    arch = family.config_from_hf(hf_config)
    if job.remat != "none":
        arch = dataclasses.replace(arch, remat=job.remat)
    module, method_params, trainable = _method(job, family, arch, family.build(arch, jnp.dtype(c.dtype)))
    boxed = shapes.abstract_boxed_params(module)
    params_abs = jax.tree.map(  # the loaded tree's dtypes: float32, the method's own storage kept
        lambda s: jax.ShapeDtypeStruct(s.shape, jnp.float32 if jnp.issubdtype(s.dtype, jnp.floating) else s.dtype),
        nn.unbox(boxed),
    )
    mesh = mesh_lib.make_mesh(1, 1, 1, devices=[device])
    infos = shapes.param_infos(boxed)
    mesh_shape = {"data": 1, "fsdp": 1, "tensor": 1}
    partitions = {i.path: sharding_rules.param_partition(i.axes, i.shape, mesh_shape)[0] for i in infos}
    mask = opt_lib.trainable_mask(params_abs, trainable)
    schedule = opt_lib.make_schedule(plan_lib.SchedulePlan("constant", c.learning_rate, 0, None, 0.0), job.steps)
    tx = opt_lib.make_optimizer(
        plan_lib.OptimizerPlan("adamw", 0.0, 0.9, 0.999, 1e-8, None, c.grad_clip),
        schedule,
        {i.path: i.axes for i in infos},
    )
    state_abs = ts.abstract_state(params_abs, tx, mask)
    state_sh = ts.state_shardings(mesh, state_abs, partitions)
    steps = ts.build_steps(module, tx, schedule, mask, mesh, state_sh, accum_steps=1)
    B, T = c.batch, c.seq_len
    batch_dtypes = {
        "input_ids": np.int32,
        "targets": np.int32,
        "weights": np.float32,
        "segment_ids": np.int32,
        "positions": np.int32,
    }
    compiling = ahead.start(
        steps.train,
        jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), state_abs, state_sh),
        {k: jax.ShapeDtypeStruct((1, B, T), d, sharding=steps.train_batch_sharding) for k, d in batch_dtypes.items()},
    )

    loaded = hf_checkpoint.load_model(job.model_dir, dtype=jnp.float32)
    params = method_params(loaded.params)
    init = jax.jit(lambda p: ts.init_state(p, tx, mask, 0), out_shardings=state_sh, donate_argnums=(0,))
    state = jax.block_until_ready(init(params))
    del params, loaded
    tokens = np.load(job.tokens_path)
    fixed = {
        "weights": np.ones((B, T), np.float32),
        "segment_ids": np.ones((B, T), np.int32),
        "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)),
    }

    def put_batch(i: int) -> dict:
        ids = tokens[i % len(tokens)]
        return steps.put_train_batch({"input_ids": ids[:, :-1], "targets": ids[:, 1:], **fixed})

    timings["load_s"] = time.perf_counter() - t0
    memory = {"rss_after_load_bytes": common.rss_bytes(), "peak_rss_after_load_bytes": common.peak_rss_bytes()}

    # ---- compile (trace + lower + XLA compile): what is left of it once the state is built
    t0 = time.perf_counter()
    compiled = ahead.result(compiling)
    if compiled is None:  # compiling ahead failed: compile here, where the error shows
        compiled = steps.train.lower(state, put_batch(0)).compile()
    timings["compile_s"] = time.perf_counter() - t0
    memory["peak_rss_after_compile_bytes"] = common.peak_rss_bytes()
    memory["state_bytes"] = sum(int(x.nbytes) for x in jax.tree.leaves(state))
    trainable = opt_lib.split_params(state["params"], mask)[0]
    n_trainable = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(trainable))
    return Program(compiled, state, put_batch, n_trainable, device, timings, rss_after_import, versions, memory)


def run(job: common.Job) -> dict:
    p = build(job)
    losses, times = [], []
    state = p.state
    p.state = None  # donated by the first step
    usage: dict[str, list] = {}  # step_cpu_s, step_sys_s, step_minor_faults
    # The peak of the steps alone (compiling XLA:CPU's code can peak higher than a step): what
    # the steps add to the resident process is their buffers beyond the (resident) train state.
    common.trim_heap()
    rss_before_steps = common.rss_bytes()
    peak_reset = common.reset_peak_rss()
    for i in range(job.steps):
        t0, u0 = time.perf_counter(), common.usage()
        state, metrics = p.compiled(state, p.put_batch(i))
        losses.append(float(metrics["loss"]))  # waits for the step
        times.append(time.perf_counter() - t0)
        for k, v in common.step_usage(u0, common.usage()).items():
            usage.setdefault(k, []).append(v)

    out = {
        "stack": "ftc",
        "method": job.method,
        "versions": p.versions,
        "trainable_params": p.trainable_params,
        **p.timings,
        "first_step_s": times[0],
        "step_times_s": times,
        **usage,
        "losses": losses,
        "rss_after_import_bytes": p.rss_after_import,
        **p.memory,
        "peak_rss_bytes": max(common.peak_rss_bytes(), p.memory["peak_rss_after_compile_bytes"]),
        "rss_before_steps_bytes": rss_before_steps,
        **({"peak_rss_steps_bytes": common.peak_rss_bytes()} if peak_reset else {}),
        "xla_memory": _memory_analysis(p.compiled),
        "device_name": getattr(p.device, "device_kind", str(p.device)),
        "optimizer": "optax.adamw (optimizer.make_optimizer)",
    }
    stats = p.device.memory_stats() if job.config.device == "gpu" else None
    if stats:
        out["peak_device_bytes"] = int(stats.get("peak_bytes_in_use", 0))
    cost = p.compiled.cost_analysis()
    if isinstance(cost, list):  # older jax returned one dict per computation
        cost = cost[0] if cost else None
    if cost and "flops" in cost:
        out["xla_flops_per_step"] = float(cost["flops"])
    return out


def _memory_analysis(compiled) -> dict:
    """XLA's buffer sizes for the executable the steps ran (bytes per device; `peak` as
    compiled_memory.CompiledMemory counts it)."""
    m = compiled.memory_analysis()
    if m is None:
        return {}
    out = {
        "argument": int(m.argument_size_in_bytes),
        "output": int(m.output_size_in_bytes),
        "alias": int(m.alias_size_in_bytes),
        "temp": int(m.temp_size_in_bytes),
        "generated_code": int(m.generated_code_size_in_bytes),
    }
    out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    return out


def main(argv: list[str]) -> int:
    job_path, result_path = argv
    with open(job_path) as f:
        job = common.Job.from_json(f.read())
    result = run(job)
    result.update(common.steady_state(result, job.warmup))
    result["process_s"] = time.perf_counter() - _T_START
    common.write_json(result_path, result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
