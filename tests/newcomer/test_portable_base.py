"""Exports name their base so that another machine can load them: a PEFT adapter trained on a
GGUF shipped in a Python package (`package:`) records that name, not this machine's ftc cache
path, and loads on a machine with another cache given only the adapter directory; a GGUF whose
metadata names its Hugging Face original is recorded by that id; `--base-name` overrides both."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import train_testlib as tl
from click.testing import CliRunner
from gguf_testlib import tiny_llama, tiny_tokenizer, write_llama_gguf

from ftc.backends.jax import pipeline
from ftc.backends.jax.io import export as export_lib
from ftc.cli import main
from ftc.spec import load_spec, spec_from_dict

SPEC = """ftc = 1
name = "portable"
output_dir = "{root}/runs"
[model]
base = "package:tinyllm/tiny.gguf"
max_seq_len = 48
dtype = "float32"
[data]
format = "chat"
train = "{root}/train.jsonl"
[method]
kind = "lora"
rank = 4
alpha = 16
[training]
steps = 3
batch_size = 8
learning_rate = 3e-2
[export]
format = "peft"
dtype = "float32"
verify = true
[logging]
progress = false
tensorboard = false
"""
IDS = [[5, 17, 42, 7, 99, 3, 250, 11]]
# The serving machine: only the adapter directory and the base's name; its own, empty ftc cache.
SERVE = """
import json, sys
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
adapter, line = sys.argv[1:]  # the adapter directory and the load line `ftc export` printed
assert json.load(open(adapter + "/adapter_config.json"))["base_model_name_or_path"] in line
if line.startswith("from "):
    imports, line = line.split("; ", 1)
    exec(imports)
model = eval(line)
with torch.no_grad():
    print(json.dumps(model.eval()(torch.tensor(IDS)).logits.tolist()))
""".replace("IDS", repr(IDS))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A LoRA run whose base is `package:tinyllm/tiny.gguf`, a package that ships a tiny Llama GGUF
    (without HF metadata), trained with this machine's ftc cache at cache-here/."""
    root = tmp_path_factory.mktemp("portable")
    tokenizer = tiny_tokenizer()
    package = root / "site" / "tinyllm"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    write_llama_gguf(tiny_llama(tokenizer.get_vocab_size(), tie=True), tokenizer, package / "tiny.gguf")
    tl.write_chat_data(root / "train.jsonl", 16)
    (root / "spec.toml").write_text(SPEC.format(root=root))
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(root / "site"))
        mp.setenv("FTC_CACHE", str(root / "cache-here"))
        log = []
        pipeline.run(load_spec(root / "spec.toml"), echo=log.append)
    return root, "\n".join(log)


def test_a_peft_adapter_on_a_package_gguf_loads_on_another_machine_from_its_directory(trained):
    root, log = trained
    export = root / "runs" / "portable" / "export"
    config = json.loads((export / "adapter_config.json").read_text())
    manifest = json.loads((export / "ftc_export.json").read_text())
    assert config["base_model_name_or_path"] == "package:tinyllm/tiny.gguf"
    assert manifest["base"] == manifest["base_model_name_or_path"] == "package:tinyllm/tiny.gguf"
    assert str(root / "cache-here") not in json.dumps(config)
    [line] = [x.split("load with: ")[1] for x in log.splitlines() if "load with: " in x]
    assert "resolve_model_source('package:tinyllm/tiny.gguf')" in line
    assert [x for x in log.splitlines() if x.startswith("verify: ")], log

    def serve(adapter: Path, cache: Path) -> np.ndarray:
        env = {"PATH": "/usr/bin:/bin", "FTC_CACHE": str(cache), "PYTHONPATH": str(root / "site"), "HOME": str(root)}
        done = subprocess.run(
            [sys.executable, "-c", SERVE, str(adapter), line.replace(str(export), str(adapter))],
            capture_output=True,
            text=True,
            timeout=600,
            cwd=root,
            env=env,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        return np.array(json.loads(done.stdout.strip().splitlines()[-1]))

    here = serve(export, root / "cache-here")
    # The other machine: a copy of the adapter directory, no run directory, an empty ftc cache.
    shutil.copytree(export, root / "elsewhere" / "adapter")
    shutil.move(root / "runs", root / "runs-away")
    try:
        there = serve(root / "elsewhere" / "adapter", root / "cache-there")
    finally:
        shutil.move(root / "runs-away", root / "runs")
    assert list((root / "cache-there" / "gguf").iterdir())  # the base was converted again, over there
    np.testing.assert_array_equal(here, there)


def test_a_gguf_that_names_its_hf_original_is_recorded_by_that_id(tmp_path):
    tokenizer = tiny_tokenizer()
    path = tmp_path / "m.gguf"
    url = {"general.source.repo_url": "https://huggingface.co/someorg/Tiny-Llama-1M"}
    write_llama_gguf(tiny_llama(tokenizer.get_vocab_size(), tie=True), tokenizer, path, strings=url)
    spec = spec_from_dict({"name": "x", "model": {"base": str(path)}, "data": {"format": "chat", "train": "tfds:a:b"}})
    name, base_dir, note = export_lib.base_source(spec, tmp_path / "converted")
    assert (name, base_dir) == ("someorg/Tiny-Llama-1M", tmp_path / "converted")
    assert "a GGUF of someorg/Tiny-Llama-1M (its metadata)" in note
    plain = tmp_path / "plain.gguf"
    write_llama_gguf(tiny_llama(tokenizer.get_vocab_size(), tie=True), tokenizer, plain)
    spec = spec_from_dict({"name": "x", "model": {"base": str(plain)}, "data": {"format": "chat", "train": "tfds:a:b"}})
    assert export_lib.base_source(spec, tmp_path / "converted")[0] == str(plain)  # the path, as the spec has it


@pytest.mark.parametrize(
    "metadata, name",
    [
        ({"general.source.huggingface.repository": "org/model-x"}, "org/model-x"),
        ({"general.source.url": "https://huggingface.co/org/model-x/tree/main"}, "org/model-x"),
        ({"general.repo_url": "hf.co/org/model-x"}, "org/model-x"),
        ({"general.source.url": "https://github.com/org/model-x"}, None),
        ({"general.name": "Smollm2 135M 8k Lc100K Mix1 Ep2", "general.organization": "HuggingFaceTB"}, None),
    ],
)
def test_the_hf_name_comes_only_from_keys_that_name_a_hugging_face_repository(metadata, name):
    from ftc.backends.jax.io import gguf_config

    assert gguf_config.hf_name(metadata) == name


def test_base_name_overrides_what_peft_records(trained, monkeypatch):
    root, _ = trained
    monkeypatch.syspath_prepend(str(root / "site"))
    monkeypatch.setenv("FTC_CACHE", str(root / "cache-here"))
    out = root / "served"
    args = ["export", str(root / "runs" / "portable"), "--out", str(out), "--no-verify"]
    result = CliRunner().invoke(main, args + ["--base-name", "someorg/SmolLM2-135M"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "someorg/SmolLM2-135M"
    manifest = json.loads((out / "ftc_export.json").read_text())
    assert (
        manifest["base"] == "package:tinyllm/tiny.gguf" and manifest["base_note"] == "--base-name someorg/SmolLM2-135M"
    )
    assert "AutoModelForCausalLM.from_pretrained('someorg/SmolLM2-135M')" in result.output
