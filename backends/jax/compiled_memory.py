"""`ftc plan --compile`: the run's train step compiled ahead of time for the plan's mesh, on
abstract inputs (no weights read, nothing allocated but the compiler's own memory), and XLA's
memory analysis of it per device, beside the plan's estimate (compiler/memory.py).

The step is the one `ftc run` executes (pipeline.build_objective, pipeline.plan_for,
train/program.build_program); the batch is the data format's row layout (data/pack.py) with the
plan's batch geometry. With a device count, the devices are that many CPU devices made up by
XLA (`jax_num_cpu_devices`), so a 64-device mesh can be checked on a laptop; the figures are
then XLA:CPU's buffer assignment, which follows the same sharded shapes as on an accelerator but
not its fusion decisions. jax fixes its devices when it first starts a backend: where this
process already has too few, the compile runs in a fresh Python process
(`python -m ftc.backends.jax.compiled_memory SPEC.json N` prints the JSON).

    python -m ftc.backends.jax.compiled_memory RESOLVED_SPEC.json DEVICES
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

import jax

from ftc.backends.jax import objectives
from ftc.backends.jax.methods.base import build_model
from ftc.backends.jax.objectives import contract
from ftc.backends.jax.pipeline import build_objective, plan_for
from ftc.backends.jax.state.init_from import read_model_config
from ftc.backends.jax.train import ahead
from ftc.backends.jax.train.program import build_program


class CompileError(ValueError):
    """The step cannot be compiled ahead for this spec or device count (the message says why)."""


# The most CPU devices XLA made up and compiled the tiny step on here (2,048 in 8.5 s; 4,096 and
# 16,384: "Multiprocess computations aren't implemented on the CPU backend"; 100,000: a native abort).
MAX_CPU_DEVICES = 2048


@dataclasses.dataclass(frozen=True)
class CompiledMemory:
    """XLA's memory analysis of the compiled train step, bytes per device. `alias`: output bytes
    that reuse a donated argument's buffer (the train state), counted once in `peak`."""

    platform: str
    devices: int
    argument: int
    output: int
    alias: int
    temp: int
    generated_code: int
    compile_s: float

    @property
    def peak(self) -> int:
        """What one device holds while the step runs: its inputs, its outputs not written in place
        of an input, and XLA's temporaries (activations kept for the backward pass, gradients...)."""
        return self.argument + self.output - self.alias + self.temp

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "peak": self.peak}

    @classmethod
    def from_dict(cls, d: dict) -> CompiledMemory:
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls)})


def compiled_memory(spec, device_count: int | None = None, *, spawn: bool = True) -> tuple[Any, CompiledMemory]:
    """(Plan, CompiledMemory) of `spec`'s train step on `device_count` CPU devices (None: the
    devices jax sees here). Raises CompileError (a ValueError) when that cannot be done, and the
    plan's own errors (a mesh that does not divide the devices) before compiling anything.
    `spawn`: a fresh process may compile it (not from that process itself)."""
    registered = objectives.get(spec.training.objective)
    if registered.trainer != contract.STEPS:
        fed = "rollouts" if registered.trainer == contract.ROLLOUTS else f"the {registered.trainer} runner"
        raise CompileError(
            f"--compile: training.objective={registered.name!r} is trained by {fed}, not by a train step on "
            "data batches; the plan's estimate above is all there is for it"
        )
    if device_count is not None and device_count > MAX_CPU_DEVICES:
        raise CompileError(
            f"--compile --devices {device_count}: XLA:CPU makes at most {MAX_CPU_DEVICES} devices in one process "
            "(4,096 failed inside XLA, 100,000 aborted it after 9 minutes); the per-device figures follow the "
            "mesh's shards, so compile a mesh with the same per-device shapes on fewer devices"
        )
    devices = _devices(device_count)  # first: building the model starts jax's backends
    _, hf_config = read_model_config(spec.model.base)
    model = build_model(hf_config, spec)
    if device_count is not None:  # the plan's own errors (mesh, batch split) before any compile
        plan_for(spec, hf_config, device_count, model=model)
    if devices is None and spawn:
        return _in_fresh_process(spec, device_count)
    if devices is None:
        raise CompileError(f"--compile: jax here has fewer than {device_count} CPU devices")
    objective, with_reference = build_objective(spec, model)
    plan, abstract_params = plan_for(spec, hf_config, len(devices), model=model)
    # The step count (unknown before the data is read, for epochs) only sets the schedule's constants.
    steps = plan.steps.total_steps or 1
    program = build_program(
        plan, model, abstract_params, objective, reference=with_reference, devices=devices, total_steps=steps
    )
    try:
        batch = ahead.abstract_batch(spec, plan, objective, program.steps.train_batch_sharding)
    except ahead.BatchKeysError as e:
        raise CompileError(f"--compile: {e}") from None
    t0 = time.perf_counter()
    compiled = program.steps.train.lower(program.abstract_state(), batch).compile()
    elapsed = time.perf_counter() - t0
    m = compiled.memory_analysis()
    return plan, CompiledMemory(
        platform=devices[0].platform,
        devices=len(devices),
        argument=int(m.argument_size_in_bytes),
        output=int(m.output_size_in_bytes),
        alias=int(m.alias_size_in_bytes),
        temp=int(m.temp_size_in_bytes),
        generated_code=int(m.generated_code_size_in_bytes),
        compile_s=round(elapsed, 3),
    )


def _devices(n: int | None) -> list | None:
    """The mesh's devices: jax's own (n None), or n CPU devices -- made up now if jax has not
    started a backend yet, the first n if it already has that many; None: a fresh process is needed."""
    from jax._src import xla_bridge  # jax has no public "have backends started" query

    if n is None:
        return list(jax.devices())
    if not xla_bridge.backends_are_initialized():
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", n)
    try:
        cpu = jax.devices("cpu")
    except RuntimeError:
        return None
    return list(cpu[:n]) if len(cpu) >= n else None


def _in_fresh_process(spec, n: int) -> tuple[Any, CompiledMemory]:
    from ftc.backends.jax.pipeline import plan_spec

    env = dict(os.environ, JAX_PLATFORMS="cpu")
    # An XLA_FLAGS device count would override jax_num_cpu_devices in the child.
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    env["XLA_FLAGS"] = " ".join(flags)
    with tempfile.TemporaryDirectory(prefix="ftc-compile-") as tmp:
        path = os.path.join(tmp, "spec.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(spec.to_dict(), f)
        proc = subprocess.run([sys.executable, "-m", __name__, path, str(n)], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        raise CompileError(f"--compile on {n} CPU devices failed in its own process:\n{tail}")
    memory = CompiledMemory.from_dict(json.loads(proc.stdout.strip().splitlines()[-1]))
    return plan_spec(spec, device_count=n), memory


def main(argv: list[str]) -> int:
    from ftc.spec import spec_from_dict

    spec_path, n = argv
    with open(spec_path, encoding="utf-8") as f:
        spec = spec_from_dict(json.load(f))
    _, memory = compiled_memory(spec, int(n), spawn=False)
    print(json.dumps(memory.to_dict()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
