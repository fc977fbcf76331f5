"""The pre-commit hook, as another repository uses it: pre-commit clones this repository, installs
it (`language: python`: `pip install .`, the lint-only install) and lints the specs a commit
touches, failing the commit on an invalid one."""

import os
import sys

import fresh_install

CONFIG = """repos:
  - repo: {repo}
    rev: {rev}
    hooks:
      - id: ftc-lint
"""
GOOD = 'ftc = 1\nname = "bot"\n[model]\nbase = "./model"\n[data]\nformat = "chat"\ntrain = "data/train.jsonl"\n'


def test_the_hook_installs_only_the_lint_stack_and_fails_an_invalid_spec(tmp_path):
    repo = fresh_install.clone(tmp_path / "ftc")
    git = "git -c user.name=t -c user.email=t@t -c commit.gpgsign=false"
    made = fresh_install.run(f"git init -q && git add -A && {git} commit -qm ftc", repo, timeout=120)
    assert made.returncode == 0, made.stderr
    rev = fresh_install.run("git rev-parse HEAD", repo, timeout=30).stdout.strip()

    user = tmp_path / "user"
    (user / "specs").mkdir(parents=True)
    (user / "specs" / "bot.toml").write_text(GOOD)
    (user / ".pre-commit-config.yaml").write_text(CONFIG.format(repo=repo, rev=rev))
    env = {"PRE_COMMIT_HOME": str(tmp_path / "pre-commit-home")}
    pre_commit = os.path.join(sys.prefix, "bin", "pre-commit")
    fresh_install.run(f"git init -q && git add -A && {git} commit -qm specs", user, timeout=60)

    ok = fresh_install.run(f"{pre_commit} run --all-files", user, timeout=600, env=env)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "ftc lint" in ok.stdout and "Passed" in ok.stdout
    hook_env = next((tmp_path / "pre-commit-home").glob("repo*/py_env-*"))
    site = {p.name.split("-")[0].lower() for p in hook_env.glob("lib/python*/site-packages/*.dist-info")}
    assert "ftc" in site and "jsonschema" in site and not site & {"jax", "torch", "transformers", "numpy"}, site
    assert fresh_install.site_packages_bytes(hook_env) < 50 * 2**20

    (user / "specs" / "bot.toml").write_text(GOOD.replace('format = "chat"', 'format = "chats"'))
    bad = fresh_install.run(f"{pre_commit} run --all-files", user, timeout=300, env=env)
    assert bad.returncode == 1 and "Failed" in bad.stdout
    assert "specs/bot.toml:6:1: error: data.format" in bad.stdout, bad.stdout
