"""Read one spec file (TOML or JSON) into a dict plus the position of every key in it."""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import re
import tomllib

from ftc.spec import positions as _positions
from ftc.spec.errors import SpecIssue, format_key_path

SUFFIXES = (".toml", ".json")
# No spec key nests more than a few tables or lists deep; far deeper text is refused before it
# reaches the parsers and scanners, which recurse once per level.
MAX_DEPTH = 64
# Python refuses to read integers longer than this (int_max_str_digits); no spec value comes near.
_LONG_INTEGER = re.compile(r"[-+]?[0-9][0-9_]{4299,}")
_QUOTES = "\"'"
_PART = r"""(?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*')"""
_DOTTED = rf"({_PART}(?:\s*\.\s*{_PART})*)"
_HEADER = re.compile(rf"\[\[?\s*{_DOTTED}\s*\]")  # a TOML table header, or a key before its '='
_KEY = re.compile(rf"{_DOTTED}\s*=")
_SURROGATE = re.compile("[\ud800-\udfff]")
_SURROGATE_MESSAGE = "a \\u escape of half a surrogate pair (\\uD800-\\uDFFF alone), which is no character"
_DECLARED = re.compile(r"Cannot declare \((.*)\) twice")
_TOML_AT = re.compile(r"\s*\(at line (\d+), column (\d+)\)$|\s*\(at end of document\)$")


@dataclasses.dataclass(frozen=True)
class Document:
    """One parsed spec file. `name` is the path as shown in messages; `positions` maps key paths
    (tuples of keys and list indices) to 1-based (line, col)."""

    name: str
    data: dict
    positions: dict

    def where(self, path: tuple) -> tuple[int, int]:
        """Position of `path`, or of its nearest ancestor that has one, or (1, 1)."""
        while path:
            if path in self.positions:
                return self.positions[path]
            path = path[:-1]
        return (1, 1)


def read_document(name: str) -> tuple[Document | None, list[SpecIssue]]:
    """Parse the file at `name`. Returns (None, issues) when it cannot be read or parsed."""
    suffix = os.path.splitext(name)[1].lower()
    if suffix not in SUFFIXES:
        return None, [
            SpecIssue(name, 0, 0, "", f"a spec is a .toml or .json file, not {suffix or 'a file without suffix'!r}")
        ]
    try:
        with open(name, "rb") as f:
            text = f.read().decode("utf-8-sig")
    except FileNotFoundError:
        return None, [SpecIssue(name, 0, 0, "", "file not found")]
    except IsADirectoryError:
        return None, [SpecIssue(name, 0, 0, "", "is a directory, not a spec file")]
    except UnicodeDecodeError as e:
        data = open(name, "rb").read()
        if data.startswith((b"\xff\xfe", b"\xfe\xff")):  # what Windows tools write as "Unicode"
            return None, [
                SpecIssue(name, 1, 1, "", "UTF-16 text (it starts with a UTF-16 byte-order mark); save it as UTF-8")
            ]
        return None, [SpecIssue(name, text_line_of_offset(data, e.start), 1, "", f"not UTF-8 text: {e.reason}")]
    except OSError as e:
        return None, [SpecIssue(name, 0, 0, "", f"cannot read: {e.strerror}")]
    return parse_text(name, text, suffix)


def parse_text(name: str, text: str, suffix: str) -> tuple[Document | None, list[SpecIssue]]:
    deep = nesting_too_deep(text, toml=suffix == ".toml")
    if deep is not None:
        line, col = _line_col(text, deep)
        return None, [
            SpecIssue(name, line, col, "", f"nested more than {MAX_DEPTH} levels deep; a spec nests a few at most")
        ]
    try:
        if suffix == ".toml":
            return _parse_toml(name, text)
        return _parse_json(name, text)
    except (RecursionError, ValueError) as e:  # not a syntax error: a limit of Python's parsers
        long = _LONG_INTEGER.search(text)
        if isinstance(e, ValueError) and long is not None:
            line, col = _line_col(text, long.start())
            digits = sum(c.isdigit() for c in long.group())
            message = f"an integer of {digits} digits; no spec value needs more than a few"
            return None, [SpecIssue(name, line, col, "", message)]
        return None, [SpecIssue(name, 1, 1, "", f"cannot read it: {type(e).__name__}: {str(e)[:200]}")]


def nesting_too_deep(text: str, *, toml: bool) -> int | None:
    """The offset where brackets and braces outside strings (and TOML comments) first nest deeper
    than MAX_DEPTH, or None. A lexer of strings and comments only: it runs before any parser."""
    depth, i, n = 0, 0, len(text)
    while i < n:
        c = text[i]
        if c in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                return i
        elif c in "]}":
            depth -= 1
        elif c == "#" and toml:
            i = text.find("\n", i)
            i = n if i < 0 else i
        elif c == '"' or (c == "'" and toml):
            triple = toml and text.startswith(c * 3, i)
            quote = c * 3 if triple else c
            i += len(quote)
            while i < n and not text.startswith(quote, i):
                i += 2 if text[i] == "\\" and c == '"' else 1
            i += len(quote) - 1
        i += 1
    return None


def _line_col(text: str, offset: int) -> tuple[int, int]:
    return text.count("\n", 0, offset) + 1, offset - text.rfind("\n", 0, offset)


def _parse_toml(name: str, text: str) -> tuple[Document | None, list[SpecIssue]]:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        message = str(e)
        m = _TOML_AT.search(message)
        if m and m.group(1):
            line, col = int(m.group(1)), int(m.group(2))
        else:  # "at end of document"
            line = text.count("\n") + 1
            col = len(text) - text.rfind("\n")
        message = _TOML_AT.sub("", message)
        if message == "Cannot overwrite a value":
            message += _set_twice(text, line)
        elif m := _DECLARED.fullmatch(message):  # tomllib shows the table as a Python tuple of its keys
            message = f"table [{'.'.join(ast.literal_eval(f'({m.group(1)})'))}] is declared twice"
        return None, [SpecIssue(name, line, col, "", f"invalid TOML: {message}")]
    return Document(name, data, _positions.toml_positions(text)), []


def _set_twice(text: str, line: int) -> str:
    """Which key tomllib's "Cannot overwrite a value" is about (it names none): the key or table
    header of the statement it stopped at, the last one in the file when it reports the end."""
    lines = text.splitlines()[:line]
    statements = [s.strip() for s in lines if s.strip() and not s.strip().startswith("#")]
    if not statements:
        return ""
    m = _HEADER.match(statements[-1]) or _KEY.match(statements[-1])
    if not m:
        return ""
    key = m.group(1)
    return f": {key if key[0] in _QUOTES else repr(key)} is set twice"


def _parse_json(name: str, text: str) -> tuple[Document | None, list[SpecIssue]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        return None, [SpecIssue(name, e.lineno, e.colno, "", f"invalid JSON: {e.msg}")]
    if not isinstance(data, dict):
        return None, [SpecIssue(name, 1, 1, "", f"a spec is a JSON object, not {type(data).__name__}")]
    positions, problems = _positions.json_positions(text)
    bad = _surrogate_path(data)
    if bad is not None:  # the key path is not shown: it may hold the surrogate itself
        line, col = Document(name, data, positions).where(bad)
        return None, [SpecIssue(name, line, col, "", f"invalid JSON: {_SURROGATE_MESSAGE}")]
    issues = [
        SpecIssue(name, line, col, format_key_path(path), f"invalid JSON: {problem}")
        for path, (line, col), problem in problems
    ]
    return Document(name, data, positions), issues


def _surrogate_path(value, path: tuple = ()) -> tuple | None:
    """The key path of the first string (or key) holding a lone UTF-16 surrogate, or None. JSON's
    \\uD800 escapes decode to one; no UTF-8 text holds it, so printing it (a message quoting a path
    or a key) raised UnicodeEncodeError. TOML refuses such escapes itself."""
    if isinstance(value, str):
        return path if _SURROGATE.search(value) else None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in items:
        if isinstance(key, str) and _SURROGATE.search(key):
            return path + (key,)
        found = _surrogate_path(child, path + (key,))
        if found is not None:
            return found
    return None


def text_line_of_offset(data: bytes, offset: int) -> int:
    return data.count(b"\n", 0, offset) + 1
