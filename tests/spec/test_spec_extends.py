"""`extends`: deep merge in order, paths relative to the file naming them, errors in the base."""

import pytest

from ftc.spec import SpecError, lint_file, load_spec

BASE = """
name = "base"
[model]
base = "o/m"
max_seq_len = 1024
[data]
format = "chat"
train = "data/train.jsonl"
[data.clean]
roles = ["system", "user", "assistant", "tool"]
overlong = "drop"
[training]
batch_size = 32
schedule = { kind = "linear", warmup_steps = 10 }
"""


@pytest.fixture
def tree(tmp_path):
    (tmp_path / "shared" / "data").mkdir(parents=True)
    (tmp_path / "shared" / "data" / "train.jsonl").write_text("{}\n")
    (tmp_path / "shared" / "base.toml").write_text(BASE)
    (tmp_path / "team").mkdir()
    return tmp_path


def test_tables_merge_key_by_key_lists_replace_and_the_child_wins(tree):
    (tree / "team" / "child.toml").write_text(
        'extends = "../shared/base.toml"\nname = "child"\n[data.clean]\nroles = ["user", "assistant"]\n'
        "[training]\nlearning_rate = 1e-4\nschedule = { warmup_steps = 5 }\n"
    )
    spec = load_spec(tree / "team" / "child.toml")
    assert spec.name == "child" and spec.model.max_seq_len == 1024
    assert spec.data.clean.roles == ("user", "assistant") and spec.data.clean.overlong == "drop"
    assert spec.training.batch_size == 32 and spec.training.learning_rate == 1e-4
    assert spec.training.schedule.kind == "linear" and spec.training.schedule.warmup_steps == 5
    # data.train was written in the base: relative to the base, not to the child.
    assert spec.data.train == str(tree / "shared" / "data" / "train.jsonl")
    assert spec.extends == (str(tree / "shared" / "base.toml"),)
    assert spec.warnings == ()


def test_several_bases_merge_in_order_and_can_be_json(tree):
    (tree / "shared" / "lora.json").write_text('{"method": {"kind": "lora", "rank": 4}, "training": {"batch_size": 8}}')
    (tree / "team" / "child.toml").write_text(
        'extends = ["../shared/base.toml", "../shared/lora.json"]\nname = "child"\n[method]\nalpha = 8\n'
    )
    spec = load_spec(tree / "team" / "child.toml")
    assert (spec.method.kind, spec.method.rank, spec.method.alpha) == ("lora", 4, 8.0)
    assert spec.training.batch_size == 8
    assert spec.extends == (str(tree / "shared" / "base.toml"), str(tree / "shared" / "lora.json"))


def test_chains_resolve_each_extends_relative_to_its_own_file(tree):
    (tree / "shared" / "mid.toml").write_text('extends = "base.toml"\n[training]\nepochs = 4\n')
    (tree / "team" / "child.toml").write_text('extends = "../shared/mid.toml"\nname = "child"\n')
    spec = load_spec(tree / "team" / "child.toml")
    assert spec.training.epochs == 4 and spec.training.batch_size == 32
    assert spec.extends == (str(tree / "shared" / "base.toml"), str(tree / "shared" / "mid.toml"))


def test_an_error_in_a_base_points_into_the_base_and_a_fix_in_the_child_clears_it(tree):
    (tree / "shared" / "base.toml").write_text(BASE.replace("batch_size = 32", "batch_size = 30"))
    (tree / "team" / "child.toml").write_text(
        'extends = "../shared/base.toml"\nname = "child"\n[training]\nmicro_batch_size = 4\n'
    )
    [issue] = lint_file(tree / "team" / "child.toml")
    assert issue.key_path == "training.micro_batch_size" and issue.file.endswith("team/child.toml")
    (tree / "team" / "child.toml").write_text(
        'extends = "../shared/base.toml"\nname = "child"\n[training]\nmax_steps = 4\n'
    )
    issues = lint_file(tree / "team" / "child.toml")
    assert [(i.file.rsplit("/", 2)[-2:], i.line, i.key_path) for i in issues] == [
        (["team", "child.toml"], 4, "training.max_steps")
    ]
    (tree / "shared" / "base.toml").write_text(BASE.replace("[training]", "[training]\nseed = -1"))
    (tree / "team" / "child.toml").write_text('extends = "../shared/base.toml"\nname = "child"\n')
    [issue] = lint_file(tree / "team" / "child.toml")
    assert issue.file.endswith("shared/base.toml") and issue.line == BASE.count("\n", 0, BASE.index("[training]")) + 2
    assert issue.key_path == "training.seed" and "must be >= 0" in issue.message


def test_a_spec_extending_itself_is_a_cycle(tree):
    (tree / "team" / "self.toml").write_text('extends = "self.toml"\nname = "x"\n')
    with pytest.raises(SpecError) as info:
        load_spec(tree / "team" / "self.toml")
    cycle = [i for i in info.value.issues if "cycle" in i.message]
    assert len(cycle) == 1 and cycle[0].line == 1 and cycle[0].key_path == "extends"


def test_an_extends_list_entry_that_is_missing_is_located_by_index(tree):
    (tree / "team" / "child.toml").write_text(
        'name = "child"\nextends = [\n  "../shared/base.toml",\n  "../shared/gone.toml",\n]\n'
    )
    [issue] = lint_file(tree / "team" / "child.toml")
    assert (issue.line, issue.col, issue.key_path) == (4, 3, "extends[1]")
    assert "not found" in issue.message


def test_extends_expands_a_leading_tilde_like_the_spec_paths(tree, monkeypatch):
    monkeypatch.setenv("HOME", str(tree / "shared"))
    (tree / "team" / "child.toml").write_text('extends = "~/base.toml"\nname = "child"\n')
    spec = load_spec(tree / "team" / "child.toml")
    assert spec.model.max_seq_len == 1024 and spec.data.train == str(tree / "shared" / "data" / "train.jsonl")


def test_an_extends_chain_past_64_files_is_one_error_at_the_link_that_passes_it(tree):
    """Each file of a chain is a level of recursion: about 970 files ended in a RecursionError
    blamed on a file with nothing wrong in it ("cannot read it")."""
    (tree / "chain").mkdir()
    for n in range(80):
        (tree / "chain" / f"c{n}.toml").write_text(f'extends = "c{n + 1}.toml"\n')
    (tree / "chain" / "c80.toml").write_text('extends = "../shared/base.toml"\n')
    [deep] = [i for i in lint_file(tree / "chain" / "c0.toml") if "extends" in i.message]
    assert deep.file.endswith("c63.toml") and deep.key_path == "extends"
    assert deep.message == "extends chains more than 64 files; a spec builds on a few"
    assert load_spec(tree / "chain" / "c18.toml").name == "base"  # 63 files with the base: fine


def test_a_base_shared_along_a_chain_is_read_once(tree, monkeypatch):
    """Levels of two bases each (a diamond per level) were read once per path: 2**n reads for n
    levels, 13 s for 16 levels and hours for 30."""
    from ftc.spec import extends

    (tree / "d").mkdir()
    for n in range(12):
        for side in "ab":
            (tree / "d" / f"{side}{n}.toml").write_text(f'extends = ["a{n + 1}.toml", "b{n + 1}.toml"]\n')
    for side in "ab":
        (tree / "d" / f"{side}12.toml").write_text('extends = "../shared/base.toml"\n')
    reads = []
    real = extends.read_document
    monkeypatch.setattr(extends, "read_document", lambda name: reads.append(name) or real(name))
    spec = load_spec(tree / "d" / "a0.toml")
    assert spec.name == "base" and len(spec.extends) == 25 and len(reads) == 26  # each file once
