"""Trained runs generate with their parameters as they are (no merge): a LoRA run's greedy tokens
equal transformers' greedy `generate` on its merged export, an adapter run's equal transformers'
with the adapters hooked on, and the PEFT export (as a SOURCE) generates what the run does."""

import jax
import method_runs_testlib as mr
import pytest
import torch
import transformers
from generate_testlib import hf_greedy, prompts

from ftc.backends.jax.generate.sampler import GenerateConfig, generate
from ftc.backends.jax.generate.source import load_source
from ftc.backends.jax.io.export import export_run
from ftc.backends.torch_adapters import load_adapters

NEW = 10
PROMPTS = prompts((3, 9, 5, 14, 1, 7), seed=11)


def _ftc_greedy(source_path):
    src = load_source(str(source_path))
    config = GenerateConfig(NEW)  # no EOS: every row runs its NEW tokens in both stacks
    return [list(c.tokens) for c in generate(src.sampler(), src.params, PROMPTS, jax.random.key(0), config)]


def _hf(path, adapters=None):
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    if adapters is not None:
        load_adapters(model, adapters)
    return hf_greedy(model, PROMPTS, NEW)


@pytest.fixture(scope="module")
def base_tokens():
    return _ftc_greedy(mr.root() / "model")


def test_a_lora_run_generates_what_its_merged_export_generates_in_transformers(base_tokens):
    run = mr.trained("lora")
    ours = _ftc_greedy(run.run_dir)
    assert ours == _hf(run.run_dir / "export")  # hf format: LoRA merged into the weights
    assert ours != base_tokens  # the trained factors change what it says: the comparison has teeth


def test_a_peft_export_as_source_generates_what_its_run_generates(tmp_path):
    run = mr.trained("lora")
    export_run(run.run_dir, out=tmp_path / "peft", format="peft", verify=False, echo=lambda _: None)
    assert _ftc_greedy(tmp_path / "peft") == _ftc_greedy(run.run_dir)


def test_an_adapter_run_generates_what_transformers_generates_with_its_adapters(base_tokens):
    run = mr.trained("adapter")
    ours = _ftc_greedy(run.run_dir)
    export = run.run_dir / "export"  # hf format: the base plus ftc_adapters/
    assert ours == _hf(export, adapters=export / "ftc_adapters")
    assert _ftc_greedy(export) == ours  # the export as a SOURCE carries its adapters
    assert ours != base_tokens


def test_a_qlora_run_generates_what_its_merged_export_generates_in_transformers():
    run = mr.trained("qlora")
    assert _ftc_greedy(run.run_dir) == _hf(run.run_dir / "export")
