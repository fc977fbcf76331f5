"""Spec loading, defaults and validation. Imports no jax, flax, torch or transformers.

    spec = load_spec("specs/support-bot.toml", overrides=["training.learning_rate=1e-4"])
    spec.training.optimizer.kind, spec.method.rank, spec.data.train_sources, spec.to_dict()

Pipeline: read each file (load.py) and what it extends (extends.py), paths resolved relative to
the file naming them (paths.py); apply `--set` overrides (overrides.py); check against the schema
and the semantic rules, filling defaults (validate.py); build the frozen Spec (model.py).
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from ftc.spec.errors import SpecError, SpecIssue
from ftc.spec.model import (
    CheckpointSpec,
    CleanSpec,
    DataSpec,
    ExportSpec,
    LoggingSpec,
    MeshSpec,
    MethodSpec,
    ModelSpec,
    OptimizerSpec,
    ScheduleSpec,
    Spec,
    TrainingSpec,
)

__all__ = [
    "load_spec",
    "lint_file",
    "spec_from_dict",
    "Spec",
    "SpecError",
    "SpecIssue",
    "ModelSpec",
    "DataSpec",
    "CleanSpec",
    "MethodSpec",
    "TrainingSpec",
    "ScheduleSpec",
    "OptimizerSpec",
    "MeshSpec",
    "CheckpointSpec",
    "ExportSpec",
    "LoggingSpec",
]


def load_spec(path: str | os.PathLike, overrides: Iterable[str] = ()) -> Spec:
    """The Spec in the file at `path` (TOML or JSON), with what it extends, `overrides`
    ("key.path=value" strings) and defaults applied. Raises SpecError listing every error;
    warnings (e.g. a data file not there yet) are on `spec.warnings`."""
    spec, issues = _load(os.fspath(path), tuple(overrides))
    if spec is None:
        raise SpecError(issues)
    return spec


def lint_file(path: str | os.PathLike, overrides: Iterable[str] = ()) -> list[SpecIssue]:
    """Every issue (errors and warnings) in the spec at `path`; empty when it is clean."""
    return _load(os.fspath(path), tuple(overrides))[1]


def spec_from_dict(data: dict, base_dir: str | os.PathLike = ".", overrides: Iterable[str] = ()) -> Spec:
    """A Spec from an in-memory dict (e.g. a loaded spec.resolved.json, or a test's spec), with
    relative paths taken relative to `base_dir`. Raises SpecError like load_spec."""
    from ftc.spec import paths

    name = "<dict>"
    if "extends" in data:
        raise SpecError([SpecIssue(name, 0, 0, "extends", "extends needs a spec file; use load_spec")])
    resolved = paths.resolve_paths(data, os.path.abspath(os.fspath(base_dir)))
    spec, issues = _finish(resolved, {}, name, "", (), tuple(overrides), [])
    if spec is None:
        raise SpecError(issues)
    return spec


def _load(name: str, overrides: tuple) -> tuple[Spec | None, list[SpecIssue]]:
    from ftc.spec.extends import load_with_extends

    merged = load_with_extends(name)
    if not merged.files:  # the file itself could not be read or parsed
        return None, list(merged.issues)
    source = merged.files[-1]
    spec, issues = _finish(merged.data, merged.locs, name, source, merged.files[:-1], overrides, list(merged.issues))
    if any(i.severity == "error" and (i.key_path.startswith("extends") or i.file != name) for i in merged.issues):
        # A base that did not load may hold what the spec leaves to it: "required key 'model' is
        # missing" beside "extended file not found" sent the reader after keys that are not missing.
        from ftc.spec.validate import is_missing_key

        issues = [i for i in issues if not is_missing_key(i)]
    return spec, issues


def _finish(data, locs, name, source, extends, overrides, issues) -> tuple[Spec | None, list[SpecIssue]]:
    from ftc.spec import model, validate
    from ftc.spec import overrides as _overrides

    parsed, override_issues = _overrides.parse_overrides(overrides)
    issues += override_issues
    data, locs = _overrides.apply_overrides(data, locs, parsed)
    filled, check_issues = validate.check(data, validate.Locator(locs, (name, 1, 1)))
    issues = sorted(set(issues + check_issues), key=_order)
    if any(i.severity == "error" for i in issues):
        return None, issues
    warnings = tuple(issues)
    return model.build(model.Spec, filled, source=source, extends=tuple(extends), warnings=warnings), issues


def _order(issue: SpecIssue):
    return (issue.line == 0, issue.file, issue.line, issue.col, issue.key_path, issue.message)
