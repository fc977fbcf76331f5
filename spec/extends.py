"""`extends`: a spec builds on other spec files, merged deep, with every key remembering the
file (and line) it came from so that errors point into the file that holds the text.

Order: the bases in the order listed (each already merged with its own bases), then the file
itself. Tables merge key by key; any other value, lists included, replaces what was there.
"""

from __future__ import annotations

import dataclasses
import os

from ftc.spec import schema_walk
from ftc.spec.errors import SpecIssue, format_key_path
from ftc.spec.load import SUFFIXES, Document, read_document
from ftc.spec.paths import resolve_paths

Loc = tuple  # (file name as shown, line, col)
MAX_CHAIN = 64  # files in one extends chain, the spec itself included


@dataclasses.dataclass(frozen=True)
class Merged:
    data: dict  # merged, paths resolved, without `extends`
    locs: dict  # key path -> Loc, for every key present in data
    files: tuple  # absolute paths of the files merged in, bases first, the spec itself last
    issues: tuple


def load_with_extends(name: str) -> Merged:
    """Read the spec at `name` (as the user named it) and everything it extends."""
    issues: list[SpecIssue] = []
    data, locs, files = _load(name, (), issues, {})
    return Merged(data, locs, tuple(files), tuple(issues))


def _load(name: str, stack: tuple, issues: list, memo: dict, via: SpecIssue | None = None) -> tuple[dict, dict, list]:
    """Each file is read and merged once per load (`memo`, by absolute path): bases shared by
    several specs of a chain (diamonds) were read once per path to them, 2**n times for n levels of
    two bases each (16 levels: 13 s). Nothing downstream mutates a merged result, so sharing is safe."""
    here = os.path.abspath(name)
    if here not in memo:
        memo[here] = _read(name, stack, issues, memo, via)
    data, locs, files = memo[here]
    return data, locs, list(files)


def _read(name: str, stack: tuple, issues: list, memo: dict, via: SpecIssue | None) -> tuple[dict, dict, list]:
    """`via`: where the spec that extends this one names it (an issue with no message yet)."""
    doc, doc_issues = read_document(name)
    issues.extend(doc_issues)
    if doc is None:
        return {}, {}, []
    known = schema_walk.schema()["properties"]
    if via is not None and doc.data and not any(k in known for k in doc.data):
        keys = ", ".join(sorted(doc.data)[:4]) + (", ..." if len(doc.data) > 4 else "")
        issues.append(dataclasses.replace(via, message=f"{name} is not an ftc spec (no spec key among {keys})"))
        return {}, {}, []
    here = os.path.abspath(name)
    data, locs, files = {}, {}, []
    for path, base in _bases(doc, issues):
        # "~/specs/base.toml" is the home directory's, as a path-valued key's "~" is (paths.py).
        base_name = os.path.normpath(os.path.join(os.path.dirname(name), os.path.expanduser(base)))
        line, col = doc.where(path)
        key = format_key_path(path)
        target = os.path.abspath(base_name)
        if target in stack + (here,):
            chain = " -> ".join(os.path.basename(f) for f in stack + (here, target))
            issues.append(SpecIssue(name, line, col, key, f"extends cycle: {chain}"))
            continue
        if len(stack) + 1 >= MAX_CHAIN:  # each level recurses here: Python's stack ends near 900 files
            message = f"extends chains more than {MAX_CHAIN} files; a spec builds on a few"
            issues.append(SpecIssue(name, line, col, key, message))
            continue
        if not os.path.isfile(target):
            what = "is a directory" if os.path.isdir(target) else "not found"
            issues.append(SpecIssue(name, line, col, key, f"extended file {what}: {base_name}"))
            continue
        suffix = os.path.splitext(target)[1].lower()
        if suffix not in SUFFIXES:
            message = f"{base_name} is not a spec: a spec is a .toml or .json file"
            issues.append(SpecIssue(name, line, col, key, message))
            continue
        via = SpecIssue(name, line, col, key, "")
        base_data, base_locs, base_files = _load(base_name, stack + (here,), issues, memo, via)
        data, locs = merge(data, locs, base_data, base_locs)
        files += [f for f in base_files if f not in files]
    own = {k: v for k, v in doc.data.items() if k != "extends"}
    own = resolve_paths(own, os.path.dirname(here))
    own_locs = {p: (name, *pos) for p, pos in doc.positions.items() if p[0] != "extends"}
    data, locs = merge(data, locs, own, own_locs)
    files.append(here)
    return data, locs, files


def _bases(doc: Document, issues: list) -> list[tuple[tuple, str]]:
    """(key path, relative file) for each entry of the document's `extends`."""
    value = doc.data.get("extends")
    if value is None:
        return []
    if isinstance(value, str) and value:
        return [(("extends",), value)]
    if isinstance(value, list) and value:
        for i, v in enumerate(value):  # a bad entry is its own error; the others still load
            if not (isinstance(v, str) and v):
                line, col = doc.where(("extends", i))
                issues.append(SpecIssue(doc.name, line, col, f"extends[{i}]", f"expected a file path, got {v!r}"))
        return [(("extends", i), v) for i, v in enumerate(value) if isinstance(v, str) and v]
    line, col = doc.where(("extends",))
    issues.append(
        SpecIssue(
            doc.name, line, col, "extends", f"expected a file path or a non-empty list of file paths, got {value!r}"
        )
    )
    return []


def merge(base: dict, base_locs: dict, top: dict, top_locs: dict, prefix: tuple = ()) -> tuple[dict, dict]:
    """Deep-merge `top` over `base`, carrying key locations along. Of a pair of exclusive keys
    (training.steps / training.epochs, ...), the one `top` sets replaces the other in `base`:
    `--set training.steps=2` on a spec with epochs means steps. One layer setting both stays an
    error for validation to report."""
    out, locs = dict(base), dict(base_locs)
    node = schema_walk.node_at(prefix) if all(isinstance(p, str) for p in prefix) else None
    for a, b in schema_walk.exclusive_pairs(node or {}):
        for mine, other in ((a, b), (b, a)):
            if mine in top and other not in top and other in out:
                del out[other]
                gone = prefix + (other,)
                locs = {p: l for p, l in locs.items() if p[: len(gone)] != gone}
    for key, value in top.items():
        path = prefix + (key,)
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key], locs = merge(out[key], locs, value, {}, path)
        else:
            out[key] = value
            # The replaced value's sub-keys (a list's elements, a table's keys) are gone.
            locs = {p: l for p, l in locs.items() if p[: len(path)] != path or p == path}
    if not prefix:
        locs.update(top_locs)
    return out, locs
