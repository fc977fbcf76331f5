"""Spec problems as values. Nothing here prints: the CLI decides how issues look."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Literal

Severity = Literal["error", "warning"]


@dataclasses.dataclass(frozen=True, order=True)
class SpecIssue:
    """One problem in a spec, located in the file that holds the offending text.

    `line`/`col` are 1-based; 0 means the problem has no place in a file (a `--set` override).
    `key_path` is dotted with list indices in brackets: `training.optimizer.kind`, `data.train[1]`;
    empty for problems with the file as a whole (syntax errors).
    """

    file: str
    line: int
    col: int
    key_path: str
    message: str
    severity: Severity = "error"

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}:{self.col}" if self.line else self.file
        key = f"{self.key_path}: " if self.key_path else ""
        # One line per issue: a key or a path quoted from the spec may hold a newline (or another
        # control character), which is shown escaped, as Python writes it in a string.
        return f"{where}: {self.severity}: {key}{self.message}".translate(_ESCAPED)


_ESCAPED = {c: repr(chr(c))[1:-1] for c in (*range(32), 127) if c != ord("\t")}


class SpecError(Exception):
    """A spec could not be loaded; `issues` holds every error found (and any warnings)."""

    def __init__(self, issues: Sequence[SpecIssue]):
        self.issues = tuple(issues)
        errors = [i for i in self.issues if i.severity == "error"]
        head = f"{len(errors)} error(s) in spec"
        super().__init__("\n".join([head, *(str(i) for i in errors)]))


def format_key_path(path: Sequence[str | int]) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def under(issue: SpecIssue, key_paths) -> bool:
    """Whether `issue` is about one of `key_paths` or a key inside one."""
    return any(issue.key_path == p or issue.key_path.startswith((p + ".", p + "[")) for p in key_paths)
