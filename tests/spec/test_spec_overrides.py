"""`--set key=value` overrides: typed by the schema, checked like the file, and located."""

import pytest

from ftc.spec import SpecError, lint_file, load_spec

SPEC = 'name = "x"\n[model]\nbase = "o/m"\n[data]\nformat = "chat"\ntrain = "tfds:a/b:train"\n'


@pytest.fixture
def spec_file(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text(SPEC)
    return path


def test_values_are_typed_by_the_schema(spec_file):
    spec = load_spec(
        spec_file,
        overrides=[
            "training.learning_rate=1e-4",
            "training.steps=100",
            "data.packing=false",
            "method.kind=lora",
            'method.targets=["q_proj", "v_proj"]',
            'training.schedule={kind = "linear", warmup_steps = 5}',
            "name=renamed",
            "mesh.fsdp=-1",
        ],
    )
    assert spec.training.learning_rate == 1e-4 and spec.training.steps == 100 and spec.training.epochs is None
    assert spec.data.packing is False and spec.method.targets == ("q_proj", "v_proj")
    assert spec.training.schedule.kind == "linear" and spec.training.schedule.warmup_steps == 5
    assert spec.name == "renamed" and spec.mesh.fsdp == -1


def test_an_integral_float_is_an_integer_as_in_a_file(spec_file):
    """batch_size = 8.0 in a file is 8; --set training.batch_size=8.0 was 'expected an integer'."""
    spec = load_spec(spec_file, overrides=["training.batch_size=1e3", "training.micro_batch_size=8.0"])
    assert (spec.training.batch_size, spec.training.micro_batch_size) == (1000, 8)
    assert type(spec.training.batch_size) is int
    [issue] = lint_file(spec_file, overrides=["training.steps=2.5"])
    assert "expected an integer, got '2.5'" in issue.message


def test_an_override_replaces_a_value_from_the_file_and_paths_are_relative_to_the_cwd(spec_file, tmp_path, monkeypatch):
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    spec = load_spec(spec_file, overrides=["data.train=local.jsonl", "data.format=text"])
    assert spec.data.train == str(tmp_path / "elsewhere" / "local.jsonl")
    assert spec.data.format == "text" and spec.data.packing is True


@pytest.mark.parametrize(
    "override, key, fragment",
    [
        ("training.lerning_rate=1e-4", "training.lerning_rate", "did you mean 'learning_rate'"),
        ("trainig.epochs=2", "trainig.epochs", "did you mean 'training'"),
        # as in a file: a key of another table says which (--set training.schedule.warmup_ratio=...)
        ("training.warmup_ratio=0.1", "training.warmup_ratio", "it belongs in [training.schedule]"),
        ("training.steps=ten", "training.steps", "expected an integer, got 'ten'"),
        ("training.learning_rate=fast", "training.learning_rate", "expected a number, got 'fast'"),
        ("data.packing=maybe", "data.packing", "expected true or false, got 'maybe'"),
        ("training.epochs.x=1", "training.epochs.x", "training.epochs is not a table"),
        ("extends=base.toml", "extends", "cannot be overridden"),
        ("learning_rate", "", "expected KEY=VALUE"),
    ],
)
def test_a_bad_override_is_an_error_naming_the_override(spec_file, override, key, fragment):
    [issue] = lint_file(spec_file, overrides=[override])
    assert issue.file == f"--set {override}" and issue.line == 0
    assert issue.key_path == key and fragment in issue.message, str(issue)


def test_an_override_that_breaks_a_rule_is_located_at_the_override(spec_file):
    with pytest.raises(SpecError) as info:
        load_spec(spec_file, overrides=["training.micro_batch_size=3"])
    [issue] = info.value.issues
    assert issue.file == "--set training.micro_batch_size=3" and "multiple of micro_batch_size" in issue.message
    assert str(issue).startswith("--set training.micro_batch_size=3: error: training.micro_batch_size: ")


def test_setting_one_of_an_exclusive_pair_replaces_the_other(tmp_path):
    """`--set training.steps=2` on a spec that trains for epochs (or an extending file that sets
    steps) means steps: the later layer's choice replaces the earlier one. One layer that sets
    both is still an error."""
    base = tmp_path / "base.toml"
    base.write_text(SPEC + '[training]\nepochs = 3\nschedule = { kind = "cosine", warmup_ratio = 0.1 }\n')
    spec = load_spec(base, ["training.steps=2", "training.schedule.warmup_steps=1"])
    assert (spec.training.steps, spec.training.epochs) == (2, None)
    assert (spec.training.schedule.warmup_steps, spec.training.schedule.warmup_ratio) == (1, None)
    child = tmp_path / "child.toml"
    child.write_text('extends = "base.toml"\n[training]\nsteps = 5\n')
    assert load_spec(child).training.steps == 5 and load_spec(child).training.epochs is None
    both = tmp_path / "both.toml"
    both.write_text('extends = "base.toml"\n[training]\nsteps = 5\nepochs = 1\n')
    issues = lint_file(both)
    assert any(
        "set either 'epochs' or 'steps', not both" in i.message
        or "set either 'steps' or 'epochs', not both" in i.message
        for i in issues
    ), issues
