"""A tiny model, chat data and a spec for the reliability tests' runs (4 steps, a checkpoint
every 2), built once per session."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import train_testlib as tl

SPEC = """ftc = 1
name = "{name}"
output_dir = "{output_dir}"
[model]
base = "{root}/model"
max_seq_len = 32
dtype = "float32"
[data]
format = "chat"
train = "{root}/train.jsonl"
[training]
steps = {steps}
batch_size = 8
micro_batch_size = 8
learning_rate = 1e-3
log_every = 1
[checkpoint]
every = 2
keep = 10
[export]
dtype = "float32"
[logging]
progress = false
tensorboard = false
"""


class Tiny:
    def __init__(self, root: Path):
        self.root = root

    def spec(self, where: Path, name: str = "tiny", steps: int = 4) -> Path:
        """A spec writing its run to `where`/runs/`name`."""
        path = where / f"{name}.toml"
        path.write_text(SPEC.format(name=name, output_dir=where / "runs", root=self.root, steps=steps))
        return path


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Tiny:
    root = tmp_path_factory.mktemp("reliability")
    tl.make_model_dir(root / "model")
    tl.write_chat_data(root / "train.jsonl", 32)
    return Tiny(root)


@pytest.fixture(scope="session")
def finished_run(tiny, tmp_path_factory) -> Path:
    """A run of the tiny spec to its end (checkpoints 2 and 4, export/), never changed: copy it."""
    from ftc.backends.jax import pipeline
    from ftc.spec import load_spec

    where = tmp_path_factory.mktemp("finished")
    spec = load_spec(tiny.spec(where))
    pipeline.run(spec, echo=lambda s: None)
    return Path(spec.run_dir)


@pytest.fixture
def run_copy(finished_run, tmp_path) -> Path:
    """A copy of the finished run that a test may damage."""
    copy = tmp_path / "runs" / finished_run.name
    shutil.copytree(finished_run, copy, symlinks=True)
    return copy
