"""Multi-process `ftc run` (backends/jax/distributed.py): two processes of 4 CPU devices each,
joined by jax.distributed over gloo, train the same spec as one process with 8 devices and get
the same run: the same losses, the same final parameters, resumable, exported once."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import train_testlib as tl
from test_run import final_params

from ftc.backends.jax import pipeline as run_lib
from ftc.backends.jax.train import distributed as dist
from ftc.spec import load_spec

SPEC = """ftc = 1
name = "{name}"
output_dir = "{root}/runs"
[model]
base = "{root}/model"
max_seq_len = 48
dtype = "float32"
[data]
format = "chat"
train = "{root}/train.jsonl"
validation = "{root}/valid.jsonl"
[training]
steps = 6
batch_size = 8
micro_batch_size = 4
learning_rate = 1e-3
log_every = 1
eval_every = 3
schedule = {{ kind = "constant" }}  # so that stopping early (training.steps=3) leaves the learning rates alone
[mesh]
fsdp = 4
tensor = 2
[checkpoint]
every = 3
[logging]
progress = false
"""

CLI = "import sys; from ftc.cli import main; sys.exit(main())"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(spec_path, n: int, *extra: str) -> list[subprocess.CompletedProcess]:
    """`ftc run` in n processes of 8/n CPU devices each, joined at a fresh local port."""
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={8 // n}")
    port = free_port()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                CLI,
                "run",
                str(spec_path),
                "--coordinator",
                f"127.0.0.1:{port}",
                "--num-processes",
                str(n),
                "--process-id",
                str(i),
                *extra,
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(n)
    ]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=600)
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return out


def losses(run_dir) -> dict[tuple[str, int], float]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {(r["split"], r["step"]): r["loss"] for r in map(json.loads, f)}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("multiprocess")
    tl.make_model_dir(root / "model")
    tl.write_chat_data(root / "train.jsonl", 48)
    tl.write_chat_data(root / "valid.jsonl", 6, seed=1)
    for name in ("one", "two"):
        (root / f"{name}.toml").write_text(SPEC.format(name=name, root=root))
    return root


@pytest.fixture(scope="module")
def one_process(root):
    spec = load_spec(str(root / "one.toml"))
    run_lib.run(spec, echo=lambda s: None)  # this test process: 8 devices (conftest)
    return spec.run_dir


def test_two_processes_train_the_same_run_as_one_and_resume(root, one_process):
    # First half in two processes, stopped at step 3 (training.steps is a resumable key) ...
    first = launch(root / "two.toml", 2, "--set", "training.steps=3")
    assert [p.returncode for p in first] == [0, 0], first[0].stderr[-2000:] + first[1].stderr[-2000:]
    # process 0 alone reports (gloo's own connection lines aside)
    assert "validation loss" in first[0].stdout and "done: step 3" in first[0].stdout
    assert "validation loss" not in first[1].stdout and "done:" not in first[1].stdout
    # ... then resumed to the end, again in two processes: checkpoint and data position restore.
    second = launch(root / "two.toml", 2)
    assert [p.returncode for p in second] == [0, 0], second[0].stderr[-2000:] + second[1].stderr[-2000:]
    assert "resumed from step 3" in second[0].stdout

    two_dir = str(root / "runs" / "two")
    want, got = losses(one_process), losses(two_dir)
    assert set(got) == set(want)  # train 1..6, validation 0, 3, 6: nothing lost or repeated at the resume
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-6), key

    one, two = final_params(one_process), final_params(two_dir)
    assert one.keys() == two.keys()
    for k in one:
        # Sums split over two processes round in another order (and the CPU linear's backward picks
        # its transpose by the shard's shape): one element of 4,096 moved 1.4e-6 after AdamW.
        np.testing.assert_allclose(two[k], one[k], rtol=0, atol=3e-6, err_msg=k)
    exported = os.listdir(os.path.join(two_dir, "export"))
    assert "config.json" in exported and "model.safetensors" in exported


def test_an_incomplete_launch_is_refused_before_waiting_on_anyone(root):
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            CLI,
            "run",
            str(root / "two.toml"),
            "--coordinator",
            "127.0.0.1:1",
            "--num-processes",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "needs --coordinator, --num-processes and --process-id together (missing --process-id)" in done.stderr


@pytest.mark.parametrize(
    "launch_, message",
    [
        (dist.Launch(coordinator="node0", num_processes=2, process_id=0), "expected HOST:PORT of process 0"),
        (
            dist.Launch(coordinator="node0:8476", num_processes=2, process_id=2),
            "--process-id 2 is not in [0, --num-processes 2)",
        ),
        (dist.Launch(num_processes=2, process_id=0), "missing --coordinator"),
    ],
)
def test_launch_problems_name_the_option(launch_, message):
    assert message in launch_.problem()
    with pytest.raises(ValueError, match="HOST:PORT|not in|missing"):
        dist.initialize(launch_)


def test_a_single_process_launch_needs_nothing():
    assert not dist.Launch().multi_process and dist.Launch().problem() is None
    dist.initialize(dist.Launch())  # no-op: no coordinator, nothing waits
    assert dist.Launch(auto=True).multi_process and dist.Launch(auto=True).problem() is None
