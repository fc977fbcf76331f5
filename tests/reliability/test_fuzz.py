"""Property-based fuzzing (Hypothesis): `ftc lint` never raises on any TOML or JSON document (drawn
from the schema and then broken, shaped like a spec with any values, or any text or bytes), and
the data reader never raises on any JSONL row: a bad row is reported by file:line.

Each property runs twice: a bounded, derandomised run in the fast suite (a fixed seed, a few
seconds), and a long one under `pytest -m slow`.
"""

from __future__ import annotations

import copy
import json
import re
import string
import tempfile
from pathlib import Path

import pytest
import tomli_w
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis_jsonschema import from_schema

from ftc.backends.jax.data import formats
from ftc.backends.jax.data.read import DataError, read_rows
from ftc.spec import Spec, SpecError, SpecIssue, lint_file, load_spec, schema_walk

FAST = settings(
    max_examples=60, derandomize=True, deadline=None, database=None, suppress_health_check=list(HealthCheck)
)
SLOW = settings(
    max_examples=2000, derandomize=False, deadline=None, database=None, suppress_health_check=list(HealthCheck)
)

# Any JSON value: text with lone surrogates, integers far past int64, non-finite floats.
ANY_TEXT = st.text(st.characters(exclude_categories=()), max_size=12) | st.sampled_from(["", " ", "a.jsonl", "*"])
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(10**40), max_value=10**40)
    | st.floats()
    | ANY_TEXT
)
ANY_JSON = st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(ANY_TEXT, inner, max_size=4), max_leaves=10
)


def spec_like() -> st.SearchStrategy:
    """Dicts with the schema's own keys (and some others) at every level, holding any values."""
    schema = schema_walk.schema()

    def table(node: dict, depth: int) -> st.SearchStrategy:
        props = node.get("properties", {})
        keys = st.sampled_from(sorted(props)) | ANY_TEXT if props else ANY_TEXT

        def value_for(key):
            child = props.get(key) or {}
            if child.get("type") == "object" and depth < 3:
                return table(child, depth + 1) | ANY_JSON
            examples = [e for e in child.get("examples", []) + child.get("enum", [])]
            return st.sampled_from(examples) | ANY_JSON if examples else ANY_JSON

        return st.lists(keys.flatmap(lambda k: st.tuples(st.just(k), value_for(k))), max_size=6).map(dict)

    return table(schema, 0)


def broken(doc: dict) -> st.SearchStrategy:
    """`doc` with a few of its values (at any depth) replaced by any JSON value."""
    return broken_with(doc, ANY_JSON)


def broken_with(doc: dict, values: st.SearchStrategy) -> st.SearchStrategy:
    """`doc` with a few of its values (at any depth) replaced by values drawn from `values`."""
    paths = []

    def walk(node, path):
        if isinstance(node, dict):
            for k, v in node.items():
                paths.append(path + (k,))
                walk(v, path + (k,))

    walk(doc, ())
    if not paths:
        return st.just(doc)

    def apply(changes):
        out = json.loads(json.dumps(doc))
        for path, value in changes:
            node = out
            for k in path[:-1]:
                node = node.get(k) if isinstance(node, dict) else None
            if isinstance(node, dict):
                node[path[-1]] = value
        return out

    return st.lists(st.tuples(st.sampled_from(paths), values), max_size=3).map(apply)


# A copy: hypothesis-jsonschema canonicalises the schema it is given in place (additionalProperties:
# false becomes not: {} inside $defs), which changed ftc's own validation messages for later tests.
SPEC_DOCS = from_schema(copy.deepcopy(schema_walk.schema())).flatmap(broken) | spec_like()

# Text Python's own parsers choke on: nesting past the recursion limit, integers past 4300 digits.
HOSTILE = (
    st.integers(1, 3000).map(lambda n: "[" * n + "]" * n)
    | st.integers(1, 3000).map(lambda n: '{"a": ' * n + "1" + "}" * n)
    | st.integers(1, 3000).map(lambda n: "{a = " * n + "1" + "}" * n)
    | st.integers(4000, 6000).map(lambda n: "9" * n)
)
PLACEHOLDER = "@@hostile@@"


def with_hostile(doc: dict, fragment: str, suffix: str) -> str:
    """`doc` as text, its first placeholder string (or a new key) replaced by `fragment`."""
    text = json.dumps(doc) if suffix == ".json" else tomli_w.dumps(as_toml(doc))
    quoted = f'"{PLACEHOLDER}"'
    if quoted not in text:
        text = text.replace("{", "{" + f"{quoted}: {quoted},", 1) if suffix == ".json" else f"x = {quoted}\n{text}"
    return text.replace(quoted, fragment, 1)


HOSTILE_SPECS = st.builds(
    lambda doc, fragment, suffix: (with_hostile(doc, fragment, suffix), suffix),
    SPEC_DOCS.flatmap(lambda d: broken_with(d, st.just(PLACEHOLDER))),
    HOSTILE,
    st.sampled_from([".toml", ".json"]),
)


def as_toml(value):
    """TOML has no null: drop None values (and None list items become strings)."""
    if isinstance(value, dict):
        return {k: as_toml(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [as_toml(v) if v is not None else "null" for v in value]
    return value


def check_lint(text: str | bytes, suffix: str) -> None:
    with tempfile.TemporaryDirectory() as where:
        path = Path(where) / f"spec{suffix}"
        path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
        issues = lint_file(path)
        assert all(isinstance(i, SpecIssue) and i.severity in ("error", "warning") for i in issues)
        assert all(str(i) for i in issues)
        try:
            assert isinstance(load_spec(path), Spec)
            assert not any(i.severity == "error" for i in issues)
        except SpecError as e:
            assert e.issues


def check_spec_doc(doc: dict) -> None:
    check_lint(json.dumps(doc), ".json")
    try:
        toml = tomli_w.dumps(as_toml(doc))
    except (TypeError, ValueError):  # a value TOML cannot hold (e.g. a heterogeneous shape tomli_w refuses)
        return
    check_lint(toml, ".toml")


def check_spec_text(text_and_suffix) -> None:
    check_lint(*text_and_suffix)


@FAST
@given(SPEC_DOCS)
def test_lint_never_raises_on_spec_documents(doc):
    check_spec_doc(doc)


@FAST
@given(HOSTILE_SPECS)
def test_lint_never_raises_on_specs_holding_what_pythons_parsers_refuse(text_and_suffix):
    check_spec_text(text_and_suffix)


@FAST
@given(st.text(st.sampled_from(string.printable + "[]{}\"'=#\\")) | st.binary(), st.sampled_from([".toml", ".json"]))
def test_lint_never_raises_on_any_text(text, suffix):
    check_lint(text, suffix)


@pytest.mark.slow
@SLOW
@given(SPEC_DOCS)
def test_lint_never_raises_on_spec_documents_long(doc):
    check_spec_doc(doc)


@pytest.mark.slow
@SLOW
@given(HOSTILE_SPECS)
def test_lint_never_raises_on_specs_holding_what_pythons_parsers_refuse_long(text_and_suffix):
    check_spec_text(text_and_suffix)


@pytest.mark.slow
@SLOW
@given(st.text() | st.binary(), st.sampled_from([".toml", ".json"]))
def test_lint_never_raises_on_any_text_long(text, suffix):
    check_lint(text, suffix)


# ---------------------------------------------------------------------------- data rows

ROW_KEYS = ["messages", "prompt", "completion", "text", "chosen", "rejected", "label", "role", "content", "weight"]
MESSAGE = st.dictionaries(st.sampled_from(["role", "content", "weight"]) | ANY_TEXT, ANY_JSON | ANY_TEXT, max_size=4)
ROW_LIKE = st.dictionaries(
    st.sampled_from(ROW_KEYS) | ANY_TEXT, st.lists(MESSAGE | ANY_JSON, max_size=3) | ANY_JSON, max_size=4
)
LINES = st.lists(
    ROW_LIKE.map(json.dumps).map(str.encode)
    | ANY_JSON.map(json.dumps).map(str.encode)
    | st.text().map(lambda t: t.encode("utf-8", "surrogatepass"))
    | st.binary()
    | HOSTILE.map(str.encode)
    | HOSTILE.map(lambda fragment: f'{{"text": {fragment}}}'.encode()),
    max_size=5,
)
WHERE = re.compile(r"^(?P<file>.+\.jsonl):(?P<line>\d+): ")


def check_rows(lines: list[bytes], format: str) -> None:
    with tempfile.TemporaryDirectory() as where:
        path = Path(where) / "rows.jsonl"
        path.write_bytes(b"\n".join(line.replace(b"\n", b" ").replace(b"\r", b" ") for line in lines))
        for on_bad_row in ("skip", "error"):
            try:
                result = read_rows(str(path), format=format, on_bad_row=on_bad_row)
            except DataError as e:
                assert str(path) in str(e)
                for problem in e.problems:
                    m = WHERE.match(problem)
                    assert m and m["file"] == str(path) and 1 <= int(m["line"]) <= max(len(lines), 1), problem
                continue
            assert all(WHERE.match(p) for p in result.skipped)
            assert all(WHERE.match(r.where + ": ") for r in result.rows)
            for row in result.rows:  # what is kept is text the tokenizer can take (no lone surrogates)
                json.dumps(row.data, ensure_ascii=False).encode("utf-8")


@FAST
@given(LINES, st.sampled_from(sorted(formats.FORMAT_MODULES)))
def test_the_data_reader_never_raises_and_names_each_bad_row_by_file_and_line(lines, format):
    check_rows(lines, format)


@pytest.mark.slow
@SLOW
@given(LINES, st.sampled_from(sorted(formats.FORMAT_MODULES)))
def test_the_data_reader_never_raises_long(lines, format):
    check_rows(lines, format)
