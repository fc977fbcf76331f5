"""bench.real_data runs end to end: ftc and the three TRL stacks train the quickstart's work (its
spec and ChatterBot data) on a tiny random Llama with an offline ChatML tokenizer for 2 steps, in
one invocation, and report every figure the table prints.

What is comparable: the step-0 validation loss (same weights, same token ids, same assistant
masks, mean over assistant tokens, float32) must agree across all four. The first training
steps are not the same work: ftc packs rows of max_seq_len and shuffles with its seed, TRL
shuffles with its own sampler and pads to the longest row (or packs / concatenates), so their
first batches hold different sequences."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(REPO / "tests" / "support"))


def _model_dir(path: Path) -> str:
    import torch
    import transformers as tf
    from data_testlib import make_tokenizer

    torch.manual_seed(0)
    config = tf.LlamaConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=320,
        intermediate_size=64,
        max_position_embeddings=128,  # the quickstart's max_seq_len
        rms_norm_eps=1e-6,
    )
    tf.LlamaForCausalLM(config).eval().save_pretrained(path, safe_serialization=True)
    make_tokenizer().save_pretrained(path)
    return os.fspath(path)


def _run(tmp_path, stacks: str) -> tuple[dict, str]:
    out = tmp_path / "real.json"
    cmd = [sys.executable, "-m", "bench.real_data", "--model", _model_dir(tmp_path / "model")]
    cmd += ["--steps", "2", "--threads", "2", "--stacks", stacks, "--json", str(out)]
    env = dict(os.environ, PYTHONPATH=str(REPO), FTC_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    assert set(report["stacks"]) == set(stacks.split(","))
    for name, r in report["stacks"].items():
        assert "error" not in r, (name, r)
        assert r["steps"] == 2 and len(r["losses"]) == 2
        assert r["epoch_s"] > 0 and r["peak_rss_bytes"] > 0
        assert 0 < r["supervised_tokens"] <= report["supervised_tokens_epoch"]
        assert r["supervised_tokens_per_s"] == pytest.approx(r["supervised_tokens"] / r["epoch_s"])
        assert r["validation_loss"] > 0 and r["validation_loss"] != r["validation_loss_start"]
    # the same work before any step: ftc's evaluation and TRL's agree on the starting loss
    starts = [r["validation_loss_start"] for r in report["stacks"].values()]
    assert max(starts) - min(starts) <= 1e-3, starts
    assert report["start_loss_check"]["agree"]
    assert set(report["ratio"]) == set(stacks.split(",")) - {"ftc"}
    for name, ratio in report["ratio"].items():
        assert f"ftc/{name}" in proc.stdout  # the ratio rows of the printed table
        ftc, other = report["stacks"]["ftc"], report["stacks"][name]
        want = ftc["supervised_tokens_per_s"] / other["supervised_tokens_per_s"]
        assert ratio["supervised_tokens_per_s"] == pytest.approx(want)
    return report, proc.stdout


@pytest.mark.slow  # ~25 s on 2 cores: loads the real 135M model in two stacks; a benchmark's smoke test
def test_real_data_bench_ftc_and_trl_defaults_start_from_the_same_validation_loss(tmp_path):
    _run(tmp_path, "ftc,trl")


@pytest.mark.slow
def test_real_data_bench_every_stack_and_trl_padding_free_trains_the_defaults_sequences(tmp_path):
    report, _ = _run(tmp_path, "ftc,trl,trl-packing,trl-padding-free")
    stacks = report["stacks"]
    # TRL's default and padding-free batches hold the same 8 sequences (same sampler seed), padded
    # or concatenated: the same supervised tokens and the same losses
    assert stacks["trl"]["supervised_tokens"] == stacks["trl-padding-free"]["supervised_tokens"]
    assert stacks["trl"]["losses"] == pytest.approx(stacks["trl-padding-free"]["losses"], abs=1e-4)
