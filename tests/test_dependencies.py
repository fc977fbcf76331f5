"""The training install (`pip install 'ftc[train]'`) carries everything `ftc run` and `ftc export`
import. The test environment has the extras (torch, peft, ...) and they pull in packages of their
own, so a missing base requirement would pass every other test and fail only on a user's clean
machine (as jinja2 once did: chat templates need it, transformers does not require it)."""

from __future__ import annotations

import importlib.metadata as md
import json
import subprocess
import sys

import train_testlib as tl
from packaging.requirements import Requirement

# Runs `ftc run` as a train install would: every package outside those requirements is hidden
# (no module spec, no distribution metadata), so libraries that use torch when it is there take
# their torch-less path, and an undeclared dependency fails the run with ModuleNotFoundError.
RUN_AS_BASE_INSTALL = """
import importlib.machinery, json, sys
hidden_modules, hidden_dists = (set(x) for x in json.loads(sys.argv[2]))
before = set(sys.modules)
PathFinder = importlib.machinery.PathFinder

class BaseInstallOnly:
    @staticmethod
    def find_spec(name, path=None, target=None):
        return None if name.partition(".")[0] in hidden_modules else PathFinder.find_spec(name, path, target)

    @staticmethod
    def find_distributions(*args, **kwargs):
        for dist in PathFinder.find_distributions(*args, **kwargs):
            if (dist.metadata["Name"] or "").lower().replace("_", "-").replace(".", "-") not in hidden_dists:
                yield dist

    @staticmethod
    def invalidate_caches():
        PathFinder.invalidate_caches()

sys.meta_path = [BaseInstallOnly if f is PathFinder else f for f in sys.meta_path]
from ftc.cli import main
try:
    main(["run", sys.argv[1]], standalone_mode=False)
finally:
    print(json.dumps(sorted({name.split(".")[0] for name in set(sys.modules) - before})))
"""

SPEC = """ftc = 1
name = "deps"
output_dir = "{root}/runs"
[model]
base = "{root}/model"
max_seq_len = 32
dtype = "float32"
[data]
format = "chat"
train = "{root}/train.jsonl"
validation_split = 0.25
[training]
steps = 2
batch_size = 8
learning_rate = 1e-3
[logging]
progress = false
"""


def norm(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def base_requirement_closure(extras: frozenset = frozenset({"train"})) -> set[str]:
    """Distribution names (normalised) that `pip install 'ftc[train]'` installs: ftc's requirements
    with that extra, then theirs, with environment markers evaluated for this interpreter."""
    seen: set[str] = set()
    todo = [("ftc", extras)]
    while todo:
        name, extras = todo.pop()
        key = norm(name)
        if (key, extras) in seen:
            continue
        seen.add((key, extras))
        try:
            requires = md.requires(name) or []
        except md.PackageNotFoundError:
            continue
        for line in requires:
            req = Requirement(line)
            env_ok = req.marker is None or any(req.marker.evaluate({"extra": e}) for e in (extras or {""}))
            if env_ok:
                todo.append((req.name, frozenset(req.extras)))
    return {k for k, _ in seen}


def test_ftc_run_and_export_need_nothing_beyond_the_train_extra(tmp_path):
    tl.make_model_dir(tmp_path / "model")
    tl.write_chat_data(tmp_path / "train.jsonl", 16)
    spec = tmp_path / "deps.toml"
    spec.write_text(SPEC.format(root=tmp_path))
    closure = base_requirement_closure()
    assert {"jax", "transformers", "jinja2", "grain"} <= closure
    provided_by = {module: {norm(d) for d in dists} for module, dists in md.packages_distributions().items()}
    hidden_modules = sorted(
        m for m, dists in provided_by.items() if not dists & closure and m not in sys.stdlib_module_names
    )
    hidden_dists = sorted({norm(d.metadata["Name"]) for d in md.distributions()} - closure)
    assert "torch" in hidden_modules and "torch" in hidden_dists  # the test env has extras to hide

    done = subprocess.run(
        [sys.executable, "-c", RUN_AS_BASE_INSTALL, str(spec), json.dumps([hidden_modules, hidden_dists])],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "runs" / "deps" / "export" / "config.json").is_file()
    imported = set(json.loads(done.stdout.strip().splitlines()[-1]))
    assert "jinja2" in imported  # the chat template was rendered
    outside = {m: sorted(provided_by[m]) for m in imported if provided_by.get(m) and not provided_by[m] & closure}
    assert not outside, f"imported by `ftc run` but not installed by ftc[train]: {outside}"


def test_every_source_package_is_in_the_wheel():
    """A package missing from pyproject's `packages` works in the editable install the tests use
    and is absent from a built wheel (backends/jax/rl once was)."""
    import pathlib
    import tomllib

    root = pathlib.Path(__file__).resolve().parent.parent
    tool = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(tool["packages"])
    found = set()
    for name, folder in tool["package-dir"].items():
        for init in (root / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(root / folder).parts
            found.add(".".join((name, *rel)))
    assert sorted(found - listed) == [], "add these to pyproject.toml [tool.setuptools] packages"
