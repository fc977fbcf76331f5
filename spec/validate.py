"""Schema and semantic checks over a merged spec dict, producing located issues; and defaults.

A Locator maps a key path to the (file, line, col) its text came from, so every issue points
into the file (a base spec, an override) that holds the offending key.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import re

import jsonschema
import jsonschema.validators

from ftc.spec import choices, local_files, rl, run_rules, schema_walk, targets
from ftc.spec.errors import SpecIssue, format_key_path, under
from ftc.spec.local_files import value_at as _get
from ftc.spec.overrides import did_you_mean, home_hint

MAX_INT32 = 2**31 - 1
MISSING = "required key {!r} is missing"


def is_missing_key(issue: SpecIssue) -> bool:
    return issue.message.startswith("required key ") and issue.message.endswith(" is missing")


@dataclasses.dataclass(frozen=True)
class Locator:
    locs: dict  # key path -> (file, line, col)
    default: tuple  # where problems with no key of their own go: (spec file, 1, 1)

    def __call__(self, path: tuple) -> tuple:
        """Where `path` was written, or its nearest written ancestor."""
        while path:
            if path in self.locs:
                return self.locs[path]
            path = path[:-1]
        return self.default

    def has(self, path: tuple) -> bool:
        return path in self.locs


Where = Locator  # what the check functions take


def check(data: dict, where: Where) -> tuple[dict, list[SpecIssue]]:
    """All issues in `data`, and `data` with defaults filled (meaningful only without errors)."""
    schema = schema_issues(data, where)
    filled = fill_defaults(schema_walk.integral_ints(data))
    applies = applicability_issues(filled, where)
    rules = semantic_issues(filled, where)
    for rule_set in (targets.issues, rl.issues, run_rules.issues):
        rules += [_issue(where, path, message, severity) for path, message, severity in rule_set(filled)]
    # One line per key: "applies only when ...; remove it" over what is wrong with its value, the
    # schema's line over a rule's (which ran on a value the schema refuses), and a path with a NUL
    # that line alone (the others, "not found: ...", would print the NUL).
    nul = [i for i in rules if i.message == run_rules.NUL_MESSAGE]
    drop = {i.key_path for i in applies + nul}
    schema = [i for i in schema if not under(i, drop)]
    rules = [i for i in rules if i in nul or not under(i, drop | {i.key_path for i in schema})]
    return filled, schema + applies + rules


# ---- schema -------------------------------------------------------------------------------


def _ecma_pattern(validator, pattern, instance, schema):
    # JSON Schema patterns are ECMA-262 regexes, whose `$` ends the string; Python's `$` also
    # matches before a final newline, which let name = "tiny\n" (a run directory named so) pass.
    anchored = pattern[:-1] + r"\Z" if pattern.endswith("$") and not pattern.endswith(r"\$") else pattern
    if validator.is_type(instance, "string") and not re.search(anchored, instance):
        yield jsonschema.ValidationError(f"{instance!r} does not match {pattern!r}")


@functools.cache
def _validator():
    strict = jsonschema.validators.extend(jsonschema.Draft202012Validator, {"pattern": _ecma_pattern})
    return strict(schema_walk.schema())


def schema_issues(data: dict, where: Where) -> list[SpecIssue]:
    issues = _non_finite_issues(data, (), where)
    errors = list(_validator().iter_errors(data))
    # One line per value: an infinite one is "expected a finite number" (not also its type and
    # bounds); one outside an enum the line naming the choices (not also its type); one of the wrong
    # type that line (not also a bound: grpo_group_size = 1.5 is not also "must be >= 2").
    infinite = {i.key_path for i in issues}
    listed = {tuple(e.absolute_path) for e in errors if e.validator in ("enum", "const")}
    typed = {tuple(e.absolute_path) for e in errors if e.validator == "type"}
    for error in errors:
        path = tuple(error.absolute_path)
        first = ("enum", "const") if path in listed else ("type",) if path in typed else None
        if format_key_path(path) not in infinite and (first is None or error.validator in first):
            issues += _convert(error, path, where)
    return issues


def _non_finite_issues(value, path: tuple, where: Where) -> list[SpecIssue]:
    # TOML has nan and inf; JSON Schema bounds never reject them (every comparison is false).
    if isinstance(value, float) and not math.isfinite(value):
        return [_issue(where, path, f"expected a finite number, got {value}")]
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    return [i for key, child in items for i in _non_finite_issues(child, path + (key,), where)]


def _issue(where: Where, path: tuple, message: str, severity: str = "error") -> SpecIssue:
    file, line, col = where(path)
    return SpecIssue(file, line, col, format_key_path(path), message, severity)


def _convert(error, path: tuple, where: Where) -> list[SpecIssue]:
    kind, expected, value, node = error.validator, error.validator_value, error.instance, error.schema
    if kind == "additionalProperties":
        known = [k for k in node.get("properties", {}) if k != "$schema"]
        return [
            _issue(where, path + (key,), f"unknown key {key!r}{_hint(path, key, known)}")
            for key in value
            if key not in node.get("properties", {})
        ]
    if kind == "required":
        return [_issue(where, path + (key,), MISSING.format(key)) for key in expected if key not in value]
    if kind == "not" and "required" in expected:
        first, second = expected["required"]
        return [_issue(where, path + (second,), f"set either {first!r} or {second!r}, not both")]
    if kind == "not" and "const" in expected:
        return [_issue(where, path, f"must not be {_show(expected['const'])}")]
    if kind == "type":
        return [_issue(where, path, f"expected {_type_words(expected)}, got {_describe(value)}")]
    if kind == "enum":
        choices = ", ".join(_show(c) for c in expected)
        return [_issue(where, path, f"expected one of {choices}; got {_show(value)}{_suggest(value, expected)}")]
    if kind == "const":
        return [_issue(where, path, f"expected {_show(expected)}, got {_show(value)}{_suggest(value, [expected])}")]
    if kind in _BOUNDS:
        return [_issue(where, path, f"must be {_BOUNDS[kind]} {_show(expected)}, got {_show(value)}")]
    if kind == "minLength":
        return [
            _issue(where, path, "must not be empty" if expected == 1 else f"must be at least {expected} characters")
        ]
    if kind == "maxLength":
        return [_issue(where, path, f"must be at most {expected} characters, got {len(value)}")]
    if kind == "minItems":
        return [
            _issue(where, path, f"must have at least {expected} item{'s' if expected > 1 else ''}, got {len(value)}")
        ]
    if kind == "uniqueItems":
        dupes = sorted({_show(v) for i, v in enumerate(value) if v in value[:i]})
        return [_issue(where, path, f"items must be unique; repeated: {', '.join(dupes)}")]
    if kind == "pattern":
        return [
            _issue(
                where, path, f"{_show(value)} does not match {expected!r}: {node.get('description', '')}".rstrip(": ")
            )
        ]
    if kind in ("anyOf", "oneOf"):
        # Report the branch of the value's own type (a list with a bad element points at the
        # element); with no such branch, say which types would do.
        types = _json_types(value)
        for branch_index, branch in enumerate(expected):
            if set(schema_walk.types_of(branch)) & types:
                sub = [e for e in error.context if e.schema_path and e.schema_path[0] == branch_index]
                if sub:
                    return [i for e in sub for i in _convert(e, tuple(e.absolute_path), where)]
        return [_issue(where, path, f"expected {_type_words(schema_walk.types_of(node))}, got {_describe(value)}")]
    return [_issue(where, path, error.message)]


_BOUNDS = {"minimum": ">=", "maximum": "<=", "exclusiveMinimum": ">", "exclusiveMaximum": "<"}
_TYPE_WORD = {
    "integer": "an integer",
    "number": "a number",
    "boolean": "true or false",
    "string": "a string",
    "array": "a list",
    "object": "a table",
    "null": "null",
}


def _type_words(types) -> str:
    types = [types] if isinstance(types, str) else list(types)
    return " or ".join(_TYPE_WORD.get(t, t) for t in types)


def _json_types(value) -> set:
    if isinstance(value, bool):
        return {"boolean"}
    if isinstance(value, int):
        return {"integer", "number"}
    if isinstance(value, float):
        return {"number"} | ({"integer"} if value.is_integer() else set())
    return {{str: "string", list: "array", dict: "object"}.get(type(value), "other")}


def _describe(value) -> str:
    if isinstance(value, bool):
        return f"boolean {_show(value)}"
    if isinstance(value, int):
        return f"integer {value}"
    if isinstance(value, float):
        return f"number {value!r}"
    if isinstance(value, str):
        return f"string {_show(value)}"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a table"
    if value is None:
        return "null"
    return f"{type(value).__name__} {value}"  # TOML dates and times


def _show(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value)
    return str(value)


def _suggest(value, choices) -> str:
    return did_you_mean(value, [c for c in choices if isinstance(c, str)]) if isinstance(value, str) else ""


def _hint(path: tuple, key: str, known: list) -> str:
    hint = did_you_mean(key, known)
    if hint:
        return hint
    home = home_hint(key, path)
    if home:
        return home
    if len(known) <= 12:
        return f"; expected one of {', '.join(known)}"
    return ""


# ---- defaults -----------------------------------------------------------------------------


def fill_defaults(data: dict, node: dict | None = None, prefix: tuple = ()) -> dict:
    """`data` with every applicable default filled in (a copy; `data` is not changed)."""
    node = schema_walk.schema() if node is None else node
    out = dict(data)
    props = node.get("properties", {})
    pairs = schema_walk.exclusive_pairs(node)

    def wanted(key, child):
        excluded = any(key in pair and any(o in out for o in pair if o != key) for pair in pairs)
        return key not in out and "default" in child and not excluded

    # Unconditional defaults first, so that conditions (`x-ftc-when`) see e.g. method.kind.
    for key, child in props.items():
        if wanted(key, child) and "x-ftc-when" not in child:
            out[key] = copy.deepcopy(child["default"])
    for key, child in props.items():
        if wanted(key, child) and "x-ftc-when" in child and schema_walk.applies(child, out):
            out[key] = copy.deepcopy(child["default"])
    for key, child in props.items():
        source = child.get("x-ftc-default-from")
        if source and key not in out and source in out:
            out[key] = copy.deepcopy(out[source])
    for key, child in props.items():
        if child.get("type") == "object" and isinstance(out.get(key), dict):
            out[key] = fill_defaults(out[key], child, prefix + (key,))
    if prefix == ("mesh",) and "fsdp" not in data and any(out.get(a) == -1 for a in ("data", "tensor", "expert")):
        out["fsdp"] = 1  # -1 elsewhere takes the remaining devices; only one axis may
    return out


# ---- keys that do not apply ----------------------------------------------------------------


def applicability_issues(filled: dict, where: Where) -> list[SpecIssue]:
    issues = []
    for path, node in schema_walk.object_paths().items():
        obj = _get(filled, path)
        if not isinstance(obj, dict):
            continue
        props = node.get("properties", {})
        for key in obj:
            child = props.get(key)
            when = child.get("x-ftc-when") if child else None
            if not when or schema_walk.applies(child, obj):
                continue
            if any(obj.get(k) not in props[k].get("enum", [obj.get(k)]) for k in when):
                continue  # the condition's own value is invalid and reported already
            need = " and ".join(
                f"{format_key_path(path + (k,))} is {' or '.join(map(_show, allowed))}" for k, allowed in when.items()
            )
            have = ", ".join(
                f"{format_key_path(path + (k,))} is {_show(obj.get(k))}"
                for k, allowed in when.items()
                if obj.get(k) not in allowed
            )
            issues.append(_issue(where, path + (key,), f"applies only when {need} (here {have}); remove it"))
    return issues


# ---- semantic checks ----------------------------------------------------------------------


def semantic_issues(s: dict, where: Where) -> list[SpecIssue]:
    issues: list[SpecIssue] = []

    def add(path, message, severity="error"):
        issues.append(_issue(where, path, message, severity))

    def get(path, types):
        value = _get(s, path)
        if isinstance(value, bool) and bool not in types:
            return None
        return value if isinstance(value, types) else None

    batch, micro = get(("training", "batch_size"), (int,)), get(("training", "micro_batch_size"), (int,))
    if batch and micro and batch % micro:
        add(("training", "micro_batch_size"), f"batch_size ({batch}) must be a multiple of micro_batch_size ({micro})")

    objective = get(("training", "objective"), (str,))
    fmt = get(("data", "format"), (str,))
    method = get(("method", "kind"), (str,))
    # What each method kind, objective and export format allows: the schema's annotations (choices.py).
    only = choices.method_info(method).get("objectives") if method else None
    if only and (fmt not in (None, *_formats_of(only)) or objective not in (None, *only)):
        add(
            ("method", "kind"),
            f"{choices.method_info(method)['objectives_why']}: it needs data.format = "
            f"{' or '.join(map(repr, _formats_of(only)))} and training.objective = {' or '.join(map(repr, only))} "
            f"(here {fmt!r} and {objective!r})",
        )
    elif (
        objective in choices.objectives()
        and fmt in choices.data_formats()
        and fmt not in choices.data_formats_for(objective)
    ):
        wanted = " or ".join(map(repr, choices.data_formats_for(objective)))
        right = next(o for o in choices.objectives() if fmt in choices.data_formats_for(o))
        # Point at what the user wrote: a defaulted objective has no text of its own.
        path = ("training", "objective") if where.has(("training", "objective")) else ("data", "format")
        add(
            path,
            f"objective {objective!r} needs data.format {wanted}, but data.format is {fmt!r} "
            f"(for {fmt!r} data use training.objective = {right!r})",
        )

    export = get(("export", "format"), (str,))
    if (
        export in choices.export_formats()
        and method in choices.method_kinds()
        and export not in choices.export_formats_for(method)
    ):
        writers = [k for k in choices.method_kinds() if export in choices.export_formats_for(k)]
        add(
            ("export", "format"),
            f"export format {export!r} is for method.kind "
            f"{' or '.join(map(repr, writers))}, not {method!r}; use {choices.default('export', 'format')!r}",
        )

    mesh = get(("mesh",), (dict,)) or {}
    rest = [a for a in ("data", "fsdp", "tensor", "expert") if mesh.get(a) == -1]
    for axis in rest[1:]:
        add(("mesh", axis), f"at most one mesh axis may be -1 (the rest of the devices); {' and '.join(rest)} are")

    eval_every = get(("training", "eval_every"), (int,))
    if eval_every and not get(("data", "validation"), (str,)) and not get(("data", "validation_split"), (int, float)):
        add(
            ("training", "eval_every"), "evaluation needs validation data: set data.validation or data.validation_split"
        )

    steps, warmup = get(("training", "steps"), (int,)), get(("training", "schedule", "warmup_steps"), (int,))
    if steps and warmup and warmup > steps:
        add(("training", "schedule", "warmup_steps"), f"warmup_steps ({warmup}) exceeds training.steps ({steps})")

    # One batch is an int32-indexed array of batch_size x max_seq_len tokens.
    seq = get(("model", "max_seq_len"), (int,))
    if batch and seq and max(batch, seq) <= MAX_INT32 < batch * seq:
        add(("training", "batch_size"), f"batch_size x model.max_seq_len is {batch * seq:,} tokens, over {MAX_INT32:,}")

    issues += [_issue(where, path, message, "warning") for path, message in local_files.missing(s)]
    return issues


def _formats_of(objectives) -> tuple[str, ...]:
    return tuple(f for o in objectives for f in choices.data_formats_for(o))
