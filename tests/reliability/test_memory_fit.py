"""A run whose memory estimate cannot fit the machine is refused with the estimate and what to
change, before weights load (before: max_seq_len = 200,000,000 ran until the kernel's OOM killer
ended it with SIGKILL, exit 137 and no message)."""

from __future__ import annotations

import jax
from click.testing import CliRunner

from ftc.backends.jax.memory_fit import host_memory_bytes, memory_problem
from ftc.cli import main


def test_a_run_that_cannot_fit_is_refused_with_the_estimate(tiny, tmp_path):
    sets = ["model.max_seq_len=200000000", "training.batch_size=8", "training.micro_batch_size=8"]
    args = ["run", str(tiny.spec(tmp_path))] + [a for s in sets for a in ("--set", s)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, result.output
    assert "error: the plan's memory estimate is " in result.output
    assert "more than this machine has" in result.output and "FTC_MEMORY_CHECK=0" in result.output
    assert not (tmp_path / "runs" / "tiny" / "checkpoints" / "0").exists()


def test_what_fits_is_not_refused_and_the_check_can_be_turned_off(monkeypatch):
    devices = jax.local_devices()
    assert memory_problem(1 << 20, devices) is None
    have, _ = host_memory_bytes()
    per_device = have // len(devices)  # the CPU devices of one host share its memory
    assert have and memory_problem(per_device, devices) is None  # within the estimate's error: not refused
    assert "more than this machine has" in memory_problem(2 * per_device, devices)
    monkeypatch.setenv("FTC_MEMORY_CHECK", "0")
    assert memory_problem(have * 100, devices) is None
