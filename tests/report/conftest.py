"""Real tiny runs to report on: the method runs shared with other tests (method_runs_testlib:
trained once per pytest process), a DPO run and a probe run."""

from __future__ import annotations

import method_runs_testlib as mr
import numpy as np
import pytest
from data_testlib import write_jsonl

DPO_SPEC = """ftc = 1
name = "dpo"
output_dir = "{root}/runs"
[model]
base = "{root}/model"
max_seq_len = 48
dtype = "float32"
[data]
format = "preference"
train = "{root}/pairs_train.jsonl"
validation = "{root}/pairs_valid.jsonl"
[method]
kind = "lora"
rank = 4
alpha = 16
[training]
objective = "dpo"
steps = 4
batch_size = 8
micro_batch_size = 8
learning_rate = 3e-2
log_every = 1
schedule = {{ kind = "constant" }}
[logging]
progress = false
tensorboard = false
"""


def pairs(n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    words = "the quick brown fox jumps over lazy dog hello there how are you".split()
    say = lambda k: " ".join(rng.choice(words, size=k))
    return [
        {
            "prompt": [{"role": "user", "content": f"{i} {say(2)}?"}],
            "chosen": [{"role": "assistant", "content": say(int(rng.integers(1, 5)))}],
            "rejected": [{"role": "assistant", "content": say(int(rng.integers(1, 5)))}],
        }
        for i in range(n)
    ]


@pytest.fixture(scope="session")
def sft_run():
    return mr.trained("full")


@pytest.fixture(scope="session")
def lora_run():
    return mr.trained("lora")


@pytest.fixture(scope="session")
def dpo_run():
    root = mr.root()
    write_jsonl(root / "pairs_train.jsonl", pairs(16, 0))
    write_jsonl(root / "pairs_valid.jsonl", pairs(8, 1))
    path = root / "dpo.toml"
    path.write_text(DPO_SPEC.format(root=root))
    return mr.run_spec(path, "lora")


@pytest.fixture(scope="session")
def probe_run():
    return mr.run_spec(mr.write_probe_spec("report-probe"), "probe")
