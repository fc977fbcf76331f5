"""Key positions found by re-scanning TOML and JSON text (tomllib and json give none)."""

import pathlib
import tomllib

from ftc.spec.positions import json_positions, toml_positions


def _line_col_of(text: str, needle: str, nth: int = 0) -> tuple[int, int]:
    offset = -1
    for _ in range(nth + 1):
        offset = text.index(needle, offset + 1)
    line = text.count("\n", 0, offset) + 1
    return line, offset - (text.rfind("\n", 0, offset) + 1) + 1


TOML = '''# a comment with key = "value" and [table]
name = "x"   # trailing
notes = """
[not_a_table]
fake = 1 """
literal = \'\'\'
also = "not a key" \'\'\'
quotes = """ends with quotes"""""
"quoted.key" = 1
dotted.inner . leaf = 2

[training]
schedule = { kind = "cosine", nested = { a = 1 } }
targets = [
  "q_proj",   # first
  'v_proj',
  [1, 2],
]
"esc\\"aped" = "a]b"

[[runs]]
id = 1
[runs.opts]
k = 1
[[runs]]
id = 2
'''


def test_toml_positions_skip_strings_and_comments_and_follow_tables():
    assert tomllib.loads(TOML)  # the scanner assumes text tomllib accepts
    pos = toml_positions(TOML)
    assert pos[("name",)] == (2, 1)
    assert ("not_a_table",) not in pos and ("fake",) not in pos and ("also",) not in pos
    assert pos[("quoted.key",)] == _line_col_of(TOML, '"quoted.key"')
    assert pos[("dotted",)] == _line_col_of(TOML, "dotted")
    assert pos[("dotted", "inner", "leaf")] == _line_col_of(TOML, "leaf")
    assert pos[("training",)] == _line_col_of(TOML, "[training]")
    assert pos[("training", "schedule", "kind")] == _line_col_of(TOML, "kind")
    assert pos[("training", "schedule", "nested", "a")] == _line_col_of(TOML, "a = 1")
    assert pos[("training", "targets", 0)] == _line_col_of(TOML, '"q_proj"')
    assert pos[("training", "targets", 1)] == _line_col_of(TOML, "'v_proj'")
    assert pos[("training", "targets", 2, 1)] == _line_col_of(TOML, "2]")
    assert pos[("training", 'esc"aped')] == _line_col_of(TOML, '"esc')
    assert pos[("runs", 0, "id")] == _line_col_of(TOML, "id = 1")
    assert pos[("runs", 0, "opts", "k")] == _line_col_of(TOML, "k = 1")
    assert pos[("runs", 1, "id")] == _line_col_of(TOML, "id = 2")


def test_toml_positions_with_crlf_line_endings():
    text = 'name = "x"\r\n\r\n[model]\r\n  base = "a/b"\r\n'
    assert toml_positions(text)[("model", "base")] == (4, 3)


def test_json_positions_for_nested_keys_list_elements_and_escapes():
    text = '{\n  "a\\"b": 1,\n  "model": {"base": "x", "list": [10, {"k": null}]},\n  "x": -1.5e3\n}'
    pos, problems = json_positions(text)
    assert pos[('a"b',)] == (2, 3)
    assert pos[("model", "base")] == _line_col_of(text, '"base"')
    assert pos[("model", "list", 0)] == _line_col_of(text, "10")
    assert pos[("model", "list", 1, "k")] == _line_col_of(text, '"k"')
    assert pos[("x",)] == (4, 3)
    assert problems == []


def test_json_scanner_reports_duplicate_keys_where_they_are():
    text = '{"a": 1,\n "a": NaN}'
    _, problems = json_positions(text)
    assert problems == [(("a",), (2, 2), "duplicate key (JSON keeps only the last one)")]


def test_every_key_of_mutated_toml_that_tomllib_accepts_is_found_where_it_is_written():
    # Random single-character edits of a spec: whenever tomllib still accepts the text, every
    # key and list element must have a position, and a key's position must start its text.
    import random

    examples = pathlib.Path(__file__).parents[2] / "examples"
    sources = [TOML] + [p.read_text() for p in sorted(examples.glob("*.toml"))]
    rng = random.Random(0)
    pieces = list("\"'[]{}=#.,\n \t\\ab1-_") + ['"""', "'''", "\r\n"]
    checked = 0
    for _ in range(3000):
        text = rng.choice(sources)
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(len(text) + 1)
            text = text[:i] + rng.choice(pieces) + text[i:] if rng.random() < 0.5 else text[:i] + text[i + 2 :]
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError:
            continue
        checked += 1
        pos = toml_positions(text)
        lines = text.replace("\r\n", "\n").split("\n")
        stack = [((), data)]
        while stack:
            path, value = stack.pop()
            items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
            for key, child in items:
                assert path + (key,) in pos, (path + (key,), text)
                if isinstance(key, str):
                    line, col = pos[path + (key,)]
                    assert lines[line - 1][col - 1 :].startswith((key, '"', "'", "[")), (key, text)
                stack.append((path + (key,), child))
    assert checked > 500
