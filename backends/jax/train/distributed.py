"""Multi-process runs: one `ftc run` per host (or per GPU), joined by `jax.distributed`.

Every process runs the same spec. After `initialize`, `jax.devices()` is the global device list,
the mesh spans every process, each process's data loader reads its share of every batch
(`data_loader`), and process 0 alone writes metrics, the resolved spec and the export; Orbax
checkpoints are written by all processes together. Nothing else in ftc branches on multi-process.

Launching: give every process the same coordinator address (host:port of process 0) and process
count and its own id, or let JAX read them from the cluster (TPU pods, SLURM, Open MPI,
Kubernetes) with `auto=True`. On CPU the processes exchange data through gloo.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Launch:
    """How this process joins a multi-process run; all None and auto False: a single process."""

    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    auto: bool = False

    @property
    def multi_process(self) -> bool:
        return self.auto or any(v is not None for v in (self.coordinator, self.num_processes, self.process_id))

    def problem(self) -> str | None:
        """Why this launch cannot work, before anything waits on a coordinator; None if it can."""
        if not self.multi_process or self.auto:
            return None
        given = {
            "--coordinator": self.coordinator,
            "--num-processes": self.num_processes,
            "--process-id": self.process_id,
        }
        missing = [k for k, v in given.items() if v is None]
        if missing:
            return (
                f"a multi-process run needs --coordinator, --num-processes and --process-id together "
                f"(missing {', '.join(missing)}); or --distributed to read them from the cluster"
            )
        host, _, port = self.coordinator.rpartition(":")
        if not host or not port.isdigit():
            return f"--coordinator {self.coordinator!r}: expected HOST:PORT of process 0, e.g. 10.0.0.1:8476"
        if self.num_processes < 1 or not 0 <= self.process_id < self.num_processes:
            return (
                f"--process-id {self.process_id} is not in [0, --num-processes {self.num_processes}); "
                f"give every process its own id from 0 to {self.num_processes - 1}"
            )
        return None


def initialize(launch: Launch, *, timeout_s: int = 300) -> None:
    """Join the run described by `launch` (no-op for a single process). Must run before anything
    asks JAX for devices. Raises ValueError for an impossible launch."""
    if not launch.multi_process:
        return
    problem = launch.problem()
    if problem:
        raise ValueError(problem)
    import jax

    # CPU processes need a collectives transport; the default (none) fails at the first
    # cross-process reduction. GPU and TPU clients ignore this option.
    if jax.config.jax_cpu_collectives_implementation in (None, "", "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if launch.auto:
        jax.distributed.initialize(initialization_timeout=timeout_s)
    else:
        jax.distributed.initialize(
            coordinator_address=launch.coordinator,
            num_processes=launch.num_processes,
            process_id=launch.process_id,
            initialization_timeout=timeout_s,
        )


def is_writer() -> bool:
    """Whether this process writes what a run shows and leaves (process 0)."""
    import jax

    return jax.process_index() == 0
