"""Shared pieces of the RL run tests (tests/rl/test_grpo_run.py, test_ppo_run.py): a tiny Llama
and five arithmetic prompt rows with answers, specs from a template, the train metrics of a run,
and the stop-between-two-updates-and-resume check."""

from __future__ import annotations

import json
import os
import signal

import numpy as np
import train_testlib as tl
from data_testlib import write_jsonl

# The start of every RL run spec here: the tiny model and the prompt rows of make_root.
SPEC_HEAD = """ftc = 1
name = "{name}"
output_dir = "{root}/runs"
[model]
base = "{root}/base"
max_seq_len = 48
dtype = "float32"
[data]
format = "prompt"
train = "{root}/prompts.jsonl"
"""


def make_root(root):
    """`root` with base/ (a tiny random Llama) and prompts.jsonl (5 rows with answers)."""
    tl.make_model_dir(root / "base")
    rows = [
        {"messages": [{"role": "user", "content": f"what is {i} plus {i}?"}], "answer": str(2 * i)} for i in range(5)
    ]
    write_jsonl(root / "prompts.jsonl", rows)
    return root


def load(root, template: str, name: str, **fields):
    """The spec `template` formatted with root, name and `fields`, written to root/<name>.toml and loaded."""
    from ftc.spec import load_spec

    path = root / f"{name}.toml"
    path.write_text(template.format(root=root, name=name, **fields))
    return load_spec(str(path))


def train_metrics(spec) -> list[dict]:
    with open(os.path.join(spec.run_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["split"] == "train"]


def stopped_and_resumed_equals_whole(make_spec, stop_after: int, steps: int, keys=("reward",)) -> dict:
    """Run `make_spec("whole")` through; run `make_spec("cut")`, SIGTERM after step `stop_after`
    (between two updates of one rollout), resume it to the end; assert every checkpointed parameter
    equal bitwise and the metrics `keys` of the steps after the stop equal. Returns the parameters."""
    from ftc.backends.jax import pipeline as run_lib

    whole = make_spec("whole")
    run_lib.run(whole, echo=lambda s: None)
    cut = make_spec("cut")
    kill = lambda step: os.kill(os.getpid(), signal.SIGTERM) if step == stop_after else None  # noqa: E731
    try:
        run_lib.run(cut, echo=lambda s: None, after_step=kill)
    except run_lib.Interrupted as e:
        assert f"saved a checkpoint at step {stop_after}" in str(e), str(e)
    else:
        raise AssertionError("the run was not interrupted")
    assert run_lib.run(cut, echo=lambda s: None)["step"] == steps
    a, b = tl.checkpoint_params(whole.run_dir), tl.checkpoint_params(cut.run_dir)
    assert a.keys() == b.keys() and len(a) > 1
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    after = lambda s: [[r["step"]] + [r[k] for k in keys] for r in train_metrics(s)][stop_after - steps :]  # noqa: E731
    assert after(cut) == after(whole)  # the rollouts (and updates) after the resume are the same
    return a


KILL_DRIVER = """
import os, signal, sys
from ftc.spec import load_spec
from ftc.backends.jax.pipeline import run
kill_at = int(sys.argv[2])
run(load_spec(sys.argv[1]), echo=lambda s: None,
    after_step=lambda step: os.kill(os.getpid(), signal.SIGKILL) if step == kill_at else None)
"""


def killed_and_resumed_equals_whole(make_spec, kill_at: int, steps: int) -> int:
    """Run `make_spec("whole")` through; run `make_spec("killed")` in a child process that SIGKILLs
    itself after step `kill_at` (no handler runs, a save may be cut off mid-write), resume it in this
    process from whatever checkpoint committed, and assert every parameter equal bitwise to the
    whole run's. Returns the step the resume started from."""
    import subprocess
    import sys

    from ftc.backends.jax import pipeline as run_lib
    from ftc.backends.jax.state import checkpoint as ckpt_lib

    whole = make_spec("whole-uncut")
    run_lib.run(whole, echo=lambda s: None)
    killed = make_spec("killed")
    driver = os.path.join(os.path.dirname(killed.source), "kill_driver.py")
    with open(driver, "w") as f:
        f.write(KILL_DRIVER)
    out = subprocess.run(
        [sys.executable, driver, killed.source, str(kill_at)], capture_output=True, text=True, timeout=600
    )
    assert out.returncode == -signal.SIGKILL, out.stderr[-3000:]
    resumed_from = ckpt_lib.latest_step(killed.run_dir)
    assert resumed_from is not None and 0 < resumed_from <= kill_at
    assert run_lib.run(killed, echo=lambda s: None)["step"] == steps
    a, b = tl.checkpoint_params(whole.run_dir), tl.checkpoint_params(killed.run_dir)
    assert a.keys() == b.keys() and len(a) > 1
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    return resumed_from
