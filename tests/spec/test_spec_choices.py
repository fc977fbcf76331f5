"""spec/choices.py: method kinds, objectives and formats, and what each allows, are the schema's;
`ftc init`, the CLI's choices and the semantic checks read them there."""

from __future__ import annotations

import copy

import click
import pytest

from ftc.cli import main
from ftc.spec import choices, schema_walk, validate
from ftc.spec.starter import starter_spec

SCHEMA = schema_walk.schema()


def test_every_kind_and_objective_has_its_facts_and_they_name_only_known_values():
    kinds = SCHEMA["properties"]["method"]["properties"]["kind"]
    assert list(kinds["x-ftc-kinds"]) == kinds["enum"]
    method_keys = SCHEMA["properties"]["method"]["properties"]
    for kind in choices.method_kinds():
        info = choices.method_info(kind)
        assert info["comment"] and info["learning_rate"] > 0, kind
        writes = choices.export_formats_for(kind)
        assert writes and set(writes) <= set(choices.export_formats()), kind
        assert choices.default("export", "format") in writes, kind  # the refusal's hint works for every kind
        for key in info.get("starter_keys", ()):
            assert kind in method_keys[key]["x-ftc-when"]["kind"], (kind, key)
        assert set(info.get("objectives", ())) <= set(choices.objectives()), kind
        assert "objectives" not in info or info["objectives_why"], kind
    objective = SCHEMA["properties"]["training"]["properties"]["objective"]
    assert list(objective["x-ftc-objectives"]) == objective["enum"]
    trained = {f for o in choices.objectives() for f in choices.data_formats_for(o)}
    # Each data format trains under at least one objective (preference data: dpo or orpo); lint
    # suggests the first listed for a format.
    assert trained == set(choices.data_formats())


def test_the_clis_choices_are_the_schemas():
    def option(command: str, name: str) -> click.Option:
        return next(p for p in main.commands[command].params if p.name == name)

    assert tuple(option("init", "method").type.choices) == choices.method_kinds()
    assert tuple(option("init", "objective").type.choices) == choices.objectives()
    assert tuple(option("export", "fmt").type.choices) == choices.export_formats()


@pytest.fixture
def toy_kind(monkeypatch):
    """The schema with one more method kind, "toy" (no keys of its own; writes hf only)."""
    schema = copy.deepcopy(SCHEMA)
    kind = schema["properties"]["method"]["properties"]["kind"]
    kind["enum"].append("toy")
    kind["x-ftc-kinds"]["toy"] = {"comment": "a toy method", "learning_rate": 3e-3, "export_formats": ["hf"]}
    monkeypatch.setattr(schema_walk, "schema", lambda: schema)
    validate._validator.cache_clear()
    yield
    validate._validator.cache_clear()


def test_a_method_kind_added_to_the_schema_reaches_the_starter_and_the_export_rule(toy_kind, tmp_path):
    text = starter_spec("s.toml", "s", "toy")
    assert 'kind = "toy"' in text and "full | lora | qlora | adapter | probe | toy: a toy method" in text
    assert "learning_rate = 3e-3" in text and 'format = "hf"' in text
    spec = tmp_path / "s.toml"
    spec.write_text(text)
    from ftc.spec import lint_file

    assert not [i for i in lint_file(spec) if i.severity == "error"]
    spec.write_text(text.replace('format = "hf"', 'format = "peft"'))
    [issue] = [i for i in lint_file(spec) if i.severity == "error"]
    assert issue.message == "export format 'peft' is for method.kind 'lora' or 'qlora', not 'toy'; use 'hf'"
