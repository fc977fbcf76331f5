"""Valid specs in TOML and JSON load to the same frozen, typed, default-filled Spec."""

import dataclasses
import json
import os

import pytest

from ftc.spec import Spec, SpecError, lint_file, load_spec, spec_from_dict

TOML = """
ftc = 1
name = "support-bot"

[model]
base = "HuggingFaceTB/SmolLM2-135M-Instruct"
max_seq_len = 512

[data]
format = "chat"
train = ["data/a.jsonl", "data/*.part.jsonl"]
validation = "data/valid.jsonl"

[method]
kind = "lora"
rank = 8
targets = ["q_proj", "v_proj"]

[training]
epochs = 3
batch_size = 64
micro_batch_size = 8
learning_rate = 2e-4
schedule = { kind = "cosine", warmup_ratio = 0.03 }
optimizer = { kind = "adamw", weight_decay = 0.01 }
eval_every = 200

[checkpoint]
every = 500
async = false
"""


def _write_spec_dir(tmp_path):
    data = tmp_path / "specs" / "data"
    data.mkdir(parents=True)
    for name in ("a.jsonl", "b.part.jsonl", "valid.jsonl"):
        (data / name).write_text("{}\n")
    (tmp_path / "specs" / "bot.toml").write_text(TOML)
    return tmp_path / "specs"


def test_toml_spec_loads_typed_and_frozen_with_defaults_filled(tmp_path):
    spec = load_spec(_write_spec_dir(tmp_path) / "bot.toml")
    assert isinstance(spec, Spec) and spec.warnings == ()
    assert spec.name == "support-bot" and spec.ftc == 1 and spec.output_dir == "runs"
    assert spec.run_dir == os.path.join("runs", "support-bot")
    assert spec.model.base == "HuggingFaceTB/SmolLM2-135M-Instruct"  # an HF id stays an id
    assert (spec.model.dtype, spec.model.param_dtype, spec.model.max_seq_len) == ("bfloat16", "float32", 512)
    assert spec.method.kind == "lora" and spec.method.rank == 8 and spec.method.alpha == 32.0
    assert spec.method.targets == ("q_proj", "v_proj") and spec.method.rslora is False
    assert spec.method.placement is None and spec.method.pooling is None  # not lora keys
    assert spec.training.optimizer.kind == "adamw" and spec.training.optimizer.beta2 == 0.999
    assert spec.training.optimizer.momentum is None and spec.training.optimizer.weight_decay == 0.01
    assert spec.training.schedule.kind == "cosine" and spec.training.schedule.warmup_steps is None
    assert spec.training.epochs == 3 and spec.training.steps is None
    assert spec.training.grad_accum_steps == 8 and spec.training.dpo_beta is None
    assert isinstance(spec.training.learning_rate, float)
    assert (spec.mesh.data, spec.mesh.fsdp, spec.mesh.tensor) == (1, -1, 1)
    assert spec.checkpoint.async_ is False and spec.checkpoint.keep == 3
    assert spec.data.packing is True and spec.data.train_on == "assistant" and spec.data.labels is None
    assert spec.data.clean.roles == ("system", "user", "assistant", "tool")
    assert spec.export.format == "hf" and spec.logging.tensorboard is True
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.training.learning_rate = 1.0


def test_paths_are_absolute_relative_to_the_spec_file_and_tfds_sources_stay(tmp_path, monkeypatch):
    specs = _write_spec_dir(tmp_path)
    monkeypatch.chdir(tmp_path)  # not the spec's folder: paths must not depend on the cwd
    spec = load_spec("specs/bot.toml", overrides=["data.validation=tfds:imdb_reviews/plain_text:test"])
    assert spec.data.train == (str(specs / "data" / "a.jsonl"), str(specs / "data" / "*.part.jsonl"))
    assert spec.data.train_sources == spec.data.train
    assert spec.data.validation == "tfds:imdb_reviews/plain_text:test"
    assert spec.source == str(specs / "bot.toml")


def test_json_spec_equals_the_same_spec_in_toml(tmp_path):
    specs = _write_spec_dir(tmp_path)
    as_toml = load_spec(specs / "bot.toml")
    (specs / "bot.json").write_text(json.dumps({"$schema": "../ftc.schema.json", **as_toml.to_dict()}))
    as_json = load_spec(specs / "bot.json")
    assert dataclasses.replace(as_json, source=as_toml.source) == as_toml


def test_to_dict_is_plain_json_without_inapplicable_keys_and_loads_back_equal(tmp_path):
    spec = load_spec(_write_spec_dir(tmp_path) / "bot.toml")
    resolved = json.loads(json.dumps(spec.to_dict()))
    assert "rank" in resolved["method"] and "placement" not in resolved["method"]
    assert "steps" not in resolved["training"] and resolved["checkpoint"]["async"] is False
    assert "source" not in resolved and "extends" not in resolved
    again = spec_from_dict(resolved, base_dir="/somewhere/else")
    assert dataclasses.replace(again, source=spec.source) == spec


def test_local_model_directory_is_a_path_and_missing_files_are_warnings(tmp_path):
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    (tmp_path / "s.toml").write_text(
        'name = "x"\n[model]\nbase = "models/tiny"\ninit_from = "runs/old"\n'
        '[data]\nformat = "text"\ntrain = "nope/*.jsonl"\n'
    )
    spec = load_spec(tmp_path / "s.toml")
    assert spec.model.base == str(tmp_path / "models" / "tiny")
    assert [(w.key_path, w.severity, w.line) for w in spec.warnings] == [
        ("model.init_from", "warning", 4),
        ("data.train", "warning", 7),
    ]
    assert "no file matches" in spec.warnings[1].message


def test_a_data_directory_save_to_disk_did_not_write_is_a_warning(tmp_path):
    """The reader takes a directory only as a `datasets` save_to_disk one: `train = "data"` failed as
    the run started, after a clean lint."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.jsonl").write_text("{}\n")
    (tmp_path / "s.toml").write_text('name = "x"\n[model]\nbase = "o/m"\n[data]\nformat = "text"\ntrain = "data"\n')
    [warning] = lint_file(tmp_path / "s.toml")
    assert (warning.key_path, warning.severity, warning.line) == ("data.train", "warning", 6)
    assert "is a directory, but not one `datasets`' save_to_disk wrote" in warning.message
    assert "dir/*.jsonl" in warning.message
    for name in ("state.json", "dataset_info.json"):
        (tmp_path / "data" / name).write_text("{}")
    assert lint_file(tmp_path / "s.toml") == []


def test_gguf_and_dot_slash_values_are_local_paths_even_when_missing(tmp_path):
    spec = spec_from_dict(
        {
            "name": "x",
            "model": {"base": "./org/model", "tokenizer": "tok.gguf"},
            "data": {"format": "text", "train": "tfds:lm1b:train"},
        },
        base_dir=tmp_path,
    )
    assert spec.model.base == str(tmp_path / "org" / "model")
    assert spec.model.tokenizer == str(tmp_path / "tok.gguf")
    assert {w.key_path for w in spec.warnings} == {"model.base", "model.tokenizer"}


def test_defaults_depend_on_the_chosen_kind_and_exclusive_keys():
    base = {"name": "x", "model": {"base": "o/m"}, "data": {"format": "classification", "train": "tfds:a:train"}}
    spec = spec_from_dict(
        {
            **base,
            "method": {"kind": "probe", "head": "mlp"},
            "training": {
                "objective": "classify",
                "steps": 10,
                "batch_size": 4,
                "schedule": {"warmup_steps": 2},
                "optimizer": {"kind": "sgd"},
            },
            "mesh": {"data": -1},
        }
    )
    assert (spec.method.pooling, spec.method.head_hidden, spec.method.rank) == ("mean", 256, None)
    assert spec.data.packing is None and spec.data.train_on is None  # chat/completion keys
    assert (spec.training.steps, spec.training.epochs, spec.training.micro_batch_size) == (10, None, 4)
    assert (spec.training.schedule.warmup_steps, spec.training.schedule.warmup_ratio) == (2, None)
    assert (spec.training.optimizer.momentum, spec.training.optimizer.beta1) == (0.0, None)
    assert (spec.mesh.data, spec.mesh.fsdp, spec.mesh.tensor) == (-1, 1, 1)  # fsdp gives way to data
    dpo = spec_from_dict(
        {**base, "data": {"format": "preference", "train": "tfds:a:train"}, "training": {"objective": "dpo"}}
    )
    assert dpo.training.dpo_beta == 0.1 and dpo.training.epochs == 1 and dpo.data.packing is None


def test_every_issue_is_reported_at_once(tmp_path):
    (tmp_path / "s.toml").write_text(
        'name = "X"\n[model]\ndtype = "fp8"\n[data]\nformat = "chat"\n'
        'train = "tfds:a:train"\n[training]\nbatch_size = 0\n'
    )
    keys = [i.key_path for i in lint_file(tmp_path / "s.toml")]
    assert keys == ["name", "model.base", "model.dtype", "training.batch_size"]


def test_a_file_that_is_not_toml_or_json_is_reported(tmp_path):
    (tmp_path / "spec.yaml").write_text("name: x\n")
    [issue] = lint_file(tmp_path / "spec.yaml")
    assert "a spec is a .toml or .json file" in issue.message
    with pytest.raises(SpecError):
        load_spec(tmp_path / "spec.yaml")


@pytest.mark.parametrize("base", ["org/name", "org/name@v1.0", "org/name/model.Q4_1.gguf", "package:json/__init__.py"])
def test_hub_ids_and_package_sources_stay_as_written(tmp_path, base):
    spec = spec_from_dict(
        {"name": "x", "model": {"base": base}, "data": {"format": "text", "train": "tfds:a:b"}}, base_dir=tmp_path
    )
    assert spec.model.base == base and spec.warnings == ()


@pytest.mark.parametrize(
    "base, fragment",
    [
        ("package:no_such_pkg_ftc/m", "no installed Python package"),
        ("package:json/no_such_file", "not found in package 'json'"),
    ],
)
def test_a_package_source_that_cannot_be_found_is_a_warning(base, fragment):
    spec = spec_from_dict({"name": "x", "model": {"base": base}, "data": {"format": "text", "train": "tfds:a:b"}})
    [warning] = spec.warnings
    assert warning.key_path == "model.base" and fragment in warning.message


def test_wrong_values_anywhere_give_spec_errors_never_a_crash():
    # Any key of a valid spec replaced by a value of another type (or removed): the checks must
    # report it as a SpecError, whatever else they look at.
    import copy
    import pathlib
    import random

    examples = pathlib.Path(__file__).parents[2] / "examples"
    valid = [load_spec(examples / name).to_dict() for name in ("dpo.toml", "probe.toml", "adapter.json")]
    values = [None, 0, -1, 1.5, "x", "", True, [], [1], {}, {"a": 1}, "lora", "1e-4", float("nan")]
    rng = random.Random(0)
    for _ in range(600):
        data = copy.deepcopy(rng.choice(valid))
        for _ in range(rng.randint(1, 3)):
            paths, stack = [], [((), data)]
            while stack:
                path, node = stack.pop()
                for key, child in node.items():
                    paths.append(path + (key,))
                    if isinstance(child, dict):
                        stack.append((path + (key,), child))
            path = rng.choice(paths)
            parent = data
            for key in path[:-1]:
                parent = parent[key]
            if rng.random() < 0.2:
                del parent[path[-1]]
            else:
                parent[path[-1]] = copy.deepcopy(rng.choice(values))
        try:
            spec_from_dict(data)
        except SpecError as e:
            assert e.issues and all(i.message for i in e.issues)


def test_a_data_glob_is_matched_as_the_reader_matches_it(tmp_path):
    """Recursively ("**" found nested files the lint said were not there) and against files and
    datasets only (a glob matching only directories linted clean; the reader found nothing)."""
    (tmp_path / "rows" / "a" / "b").mkdir(parents=True)
    (tmp_path / "rows" / "a" / "b" / "x.jsonl").write_text("{}\n")
    spec = tmp_path / "s.toml"
    spec.write_text('name = "x"\n[model]\nbase = "o/m"\n[data]\nformat = "text"\ntrain = "rows/**/*.jsonl"\n')
    assert lint_file(spec) == []
    [warning] = lint_file(spec, overrides=[f"data.train={tmp_path / 'row*'}"])
    assert warning.severity == "warning" and "no file matches" in warning.message
