import json
import shutil
import textwrap

import jax
import numpy as np
import pytest
from hf_decoders import make_hf_model

from ftc.backends.jax import models
from ftc.backends.jax.io import hf_checkpoint, safetensors_read
from ftc.backends.jax.models import shapes

TOY_MODULE = '''
"""toyllama: Llama under another model_type, registered the way a new family is."""
import dataclasses

from ftc.backends.jax.models import llama


def config_from_hf(hf_config):
    return llama.config_from_hf({**hf_config, "model_type": "llama"})


def hf_config(arch):
    return {**llama.hf_config(arch), "model_type": "toyllama"}


FAMILY = dataclasses.replace(llama.FAMILY, name="toyllama", model_types=("toyllama",), config_from_hf=config_from_hf,
                             hf_config=hf_config, hf_architecture="ToyLlamaForCausalLM")
'''


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A tiny Llama checkpoint, and the same files with config.json saying model_type "toyllama"."""
    llama_dir = tmp_path_factory.mktemp("llama")
    make_hf_model("llama").save_pretrained(llama_dir)
    toy_dir = tmp_path_factory.mktemp("toy")
    shutil.copytree(llama_dir, toy_dir, dirs_exist_ok=True)
    config = json.loads((toy_dir / "config.json").read_text())
    config.update(model_type="toyllama", architectures=["ToyLlamaForCausalLM"])
    (toy_dir / "config.json").write_text(json.dumps(config))
    return llama_dir, toy_dir


@pytest.fixture
def toy_family(tmp_path, monkeypatch):
    (tmp_path / "toy_llama_family.py").write_text(textwrap.dedent(TOY_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(models.FAMILY_MODULES, "toyllama", "toy_llama_family")


def test_an_unregistered_model_type_names_the_supported_ones(checkpoints):
    with pytest.raises(
        ValueError,
        match=r"unsupported architecture model_type='toyllama'.*"
        r"ftc supports model_type in: bert, gemma, gpt2, llama, mistral",
    ):
        hf_checkpoint.load_model(checkpoints[1])


def test_a_family_registered_in_its_own_module_loads_plans_and_exports(checkpoints, toy_family, tmp_path):
    llama_dir, toy_dir = checkpoints
    assert "toyllama" in models.supported_model_types()
    ours, reference = hf_checkpoint.load_model(toy_dir), hf_checkpoint.load_model(llama_dir)
    assert ours.family.name == "toyllama" and ours.family is models.family_for({"model_type": "toyllama"})
    jax.tree.map(np.testing.assert_array_equal, ours.params, reference.params)
    # Planning reads its parameters through the registry too.
    assert shapes.param_infos_for_config(ours.hf_config) == shapes.param_infos_for_config(reference.hf_config)
    out = hf_checkpoint.save_hf(tmp_path / "export", ours, dtype="float32")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "toyllama" and config["architectures"] == ["ToyLlamaForCausalLM"]
    exported, original = safetensors_read.SafetensorsCheckpoint(out), safetensors_read.SafetensorsCheckpoint(llama_dir)
    assert set(exported.where) == set(original.where)
    for name in original.where:
        np.testing.assert_array_equal(exported.get(name), original.get(name))
