"""train/ahead.py in `ftc run`: the train step is compiled in a thread while the weights load, and
its first call in the loop reuses that executable: the step compiles once, not again at its first
call (compiles counted by jax's compile events, per function), and trains bitwise the same."""

from __future__ import annotations

import json
import threading

import pytest
import train_testlib as tl
from compile_counts import compiles_seen
from data_testlib import write_jsonl

from ftc.backends.jax import pipeline as run_lib
from ftc.backends.jax.train import ahead as ahead_lib
from ftc.spec import spec_from_dict


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("ahead")
    tl.make_model_dir(root / "model")
    tl.write_chat_data(root / "train.jsonl", 24)
    words = "the quick brown fox jumps over lazy dog".split()
    pairs = [
        {
            "prompt": [{"role": "user", "content": f"{i} {words[i % 8]}?"}],
            "chosen": [{"role": "assistant", "content": " ".join(words[: 1 + i % 5])}],
            "rejected": [{"role": "assistant", "content": " ".join(words[i % 3 :])}],
        }
        for i in range(16)
    ]
    write_jsonl(root / "pairs.jsonl", pairs)
    return root


def spec_dict(root, name: str, **changes) -> dict:
    spec = {
        "ftc": 1,
        "name": name,
        "output_dir": str(root / "runs"),
        "model": {"base": str(root / "model"), "max_seq_len": 32, "dtype": "float32"},
        "data": {"format": "chat", "train": str(root / "train.jsonl")},
        "training": {"steps": 2, "batch_size": 8, "micro_batch_size": 4, "learning_rate": 1e-3},
        "mesh": {"fsdp": 4, "tensor": 2},
        "checkpoint": {"every": 100},
        "logging": {"progress": False},
    }
    for section, values in changes.items():
        spec[section] = {**spec.get(section, {}), **values}
    return spec


CASES = {
    "sft-packed": {},
    "sft-padded-lora": {"data": {"packing": False}, "method": {"kind": "lora", "rank": 4}},
    "dpo": {"data": {"format": "preference"}, "training": {"objective": "dpo"}},
}


def compiles_during_run(spec) -> list[tuple[str, str]]:
    """(function name, thread name) of every XLA compile while `spec` runs."""
    for thread in threading.enumerate():  # a run that failed earlier in this process may still compile
        if thread.name == ahead_lib.THREAD_NAME:
            thread.join()
    with compiles_seen() as seen:
        run_lib.run(spec, echo=lambda s: None)
    return seen


@pytest.mark.parametrize("case", sorted(CASES))
def test_train_step_is_compiled_ahead_once_and_its_first_call_compiles_nothing(root, case, monkeypatch):
    changes = json.loads(json.dumps(CASES[case]))
    if case == "dpo":
        changes["data"]["train"] = str(root / "pairs.jsonl")
    ahead_spec = spec_from_dict(spec_dict(root, f"{case}-ahead", **changes))
    ahead = compiles_during_run(ahead_spec)
    train = [thread for name, thread in ahead if "train_step" in name]
    assert train == [ahead_lib.THREAD_NAME], ahead

    monkeypatch.setattr(run_lib, "_compile_ahead", lambda *a: None)  # as before: compiled at its first call
    plain_spec = spec_from_dict(spec_dict(root, f"{case}-plain", **changes))
    plain = compiles_during_run(plain_spec)
    assert [thread for name, thread in plain if "train_step" in name] == ["MainThread"], plain
    want = tl.checkpoint_params(plain_spec.run_dir)
    got = tl.checkpoint_params(ahead_spec.run_dir)
    assert got.keys() == want.keys()
    for key, value in got.items():  # the same program trained the same way
        assert value.tobytes() == want[key].tobytes(), key


SLOW_COMPILE = """
import sys, time
from ftc.backends.jax.train import ahead
from ftc.console import main  # the `ftc` console script

class Slow:  # the train step, its compile held back: still compiling when the run stops
    def __init__(self, jitted):
        self.jitted = jitted
    def lower(self, *args):
        print("compiling", flush=True)
        time.sleep(float(delay))
        return self.jitted.lower(*args)

start = ahead.start
ahead.start = lambda jitted, *args: start(Slow(jitted), *args)
delay, sys.argv = sys.argv[2], ["ftc", "run", sys.argv[1]]
main()
"""


def spec_file(root, tmp_path, *, broken: bool) -> str:
    """A spec on any device count; `broken`: its base model's weights are cut short, so the run
    fails while it loads them."""
    import shutil

    spec = spec_dict(root, "slow")
    spec["output_dir"] = str(tmp_path / "runs")
    spec["mesh"] = {"fsdp": -1}  # whatever devices the process has
    spec["training"]["micro_batch_size"] = 8
    if broken:
        model = shutil.copytree(root / "model", tmp_path / "model")
        data = (model / "model.safetensors").read_bytes()
        (model / "model.safetensors").write_bytes(data[: int(len(data) * 0.6)])
        spec["model"]["base"] = str(model)
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    return str(path)


def slow_compile_run(spec: str, signum: int | None = None):
    """`ftc run SPEC` with its step's compile held back 60 s: (exit status, stderr, seconds to exit
    after the compile began, or after `signum` was sent once it had)."""
    import subprocess
    import sys
    import time

    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_COMPILE, spec, "60"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        # The compile has begun before the run fails or the signal is sent.
        assert any(line.strip() == "compiling" for line in proc.stdout), proc.stderr.read()[-2000:]
        if signum is not None:
            time.sleep(1)  # the main thread is loading the weights, or waiting for the compile
            proc.send_signal(signum)
        t0 = time.monotonic()
        proc.wait(timeout=50)
        return proc.returncode, proc.stderr.read(), time.monotonic() - t0
    finally:
        proc.kill()


def test_a_run_failing_while_its_step_compiles_says_why_and_exits_at_once(root, tmp_path):
    code, err, seconds = slow_compile_run(spec_file(root, tmp_path, broken=True))
    assert code == 1 and "model.safetensors: tensor '" in err and "Traceback" not in err, err[-2000:]
    assert seconds < 30  # not after the 60 s compile


def test_ctrl_c_while_the_step_compiles_stops_the_run_at_once(root, tmp_path):
    import signal

    code, err, seconds = slow_compile_run(spec_file(root, tmp_path, broken=False), signal.SIGINT)
    assert code == 1 and "SIGINT: stopped before training" in err and "Traceback" not in err, err[-2000:]
    assert seconds < 30


def test_a_python_process_whose_run_failed_exits_once_its_step_compiled(root, tmp_path):
    """pipeline.run called from Python (not the `ftc` command): at exit the process waits for the
    compile rather than have jax tear its backend down under it."""
    import subprocess
    import sys
    import time

    library = SLOW_COMPILE.replace(
        "main()",
        "from ftc.backends.jax import pipeline\nfrom ftc.spec import load_spec\n"
        "try:\n    pipeline.run(load_spec(sys.argv[2]), echo=lambda s: None)\n"
        "except Exception as e:\n    print('failed:', e, flush=True)",
    )
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", library, spec_file(root, tmp_path, broken=True), "5"], capture_output=True, text=True
    )
    assert proc.returncode == 0 and "failed:" in proc.stdout and "model.safetensors" in proc.stdout, proc.stderr
    assert time.monotonic() - t0 >= 5 and "Traceback" not in proc.stderr


SLOW_CLEANUP = """
import asyncio, sys
from orbax.checkpoint._src.path import temporary_paths

listing = temporary_paths.all_temporary_paths

async def slow(*args, **kwargs):  # Orbax's clean-up of a killed save's leftovers, still running at exit
    await asyncio.sleep(3)
    return await listing(*args, **kwargs)

temporary_paths.all_temporary_paths = slow
from ftc.backends.jax import pipeline
from ftc.spec import load_spec
try:
    pipeline.run(load_spec(sys.argv[1]), echo=lambda s: None)
except Exception as e:
    print('failed:', e, flush=True)
"""


def test_a_run_failing_before_its_first_save_closes_its_checkpoints_so_python_exits_cleanly(root, tmp_path):
    """The checkpoint manager's background clean-up is awaited on the failure path too: left
    running, it raised 'cannot schedule new futures after interpreter shutdown' at exit."""
    import subprocess
    import sys

    spec = spec_file(root, tmp_path, broken=True)
    proc = subprocess.run([sys.executable, "-c", SLOW_CLEANUP, spec], capture_output=True, text=True)
    assert proc.returncode == 0 and "failed:" in proc.stdout and "model.safetensors" in proc.stdout, proc.stderr
    assert "Traceback" not in proc.stderr and "interpreter shutdown" not in proc.stderr, proc.stderr[-3000:]
