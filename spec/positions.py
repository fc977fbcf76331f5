"""Where each key sits in a spec file's text.

tomllib and json give values but no positions, so these scanners walk the source a second time
(after the real parser has accepted it, so they may assume it is well-formed) and map every key
path to the 1-based (line, col) of its key; list elements map to the start of the element.
A path is a tuple of keys and list indices: ("training", "optimizer", "kind"), ("data", "train", 1).
"""

from __future__ import annotations

import bisect
import json.decoder
import re
import tomllib

Path = tuple  # tuple[str | int, ...]
Positions = dict  # dict[Path, tuple[int, int]]

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_TOML_SCALAR_END = re.compile(r"[,\]}#\n]")
_JSON_SCALAR = re.compile(r"-?(?:Infinity|\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)|true|false|null|NaN")


class _Lines:
    def __init__(self, text: str):
        self.starts = [0] + [m.end() for m in re.finditer("\n", text)]

    def at(self, offset: int) -> tuple[int, int]:
        line = bisect.bisect_right(self.starts, offset)
        return line, offset - self.starts[line - 1] + 1


def toml_positions(text: str) -> Positions:
    """Key positions in TOML text that tomllib has already parsed without error."""
    return _TomlScanner(text).scan()


def json_positions(text: str) -> tuple[Positions, list[tuple[Path, tuple[int, int], str]]]:
    """Key positions in JSON text that json has already parsed, and (path, position, problem)
    for duplicate keys, which Python's json accepts silently (NaN and Infinity, which it also
    accepts, are reported by the spec checks like TOML's nan and inf)."""
    scanner = _JsonScanner(text)
    scanner.value(scanner.skip(0), ())
    return scanner.positions, scanner.problems


class _TomlScanner:
    def __init__(self, text: str):
        self.s = text.replace("\r\n", "\n")
        self.lines = _Lines(self.s)
        self.positions: Positions = {}
        self.aot_count: dict[Path, int] = {}

    def mark(self, path: Path, offset: int) -> None:
        self.positions.setdefault(path, self.lines.at(offset))

    def skip_ws(self, i: int, newlines: bool = False) -> int:
        s = self.s
        while i < len(s):
            c = s[i]
            if c in " \t" or (newlines and c == "\n"):
                i += 1
            elif c == "#" and newlines:
                i = s.find("\n", i)
                i = len(s) if i < 0 else i
            else:
                break
        return i

    def scan(self) -> Positions:
        s, i, table = self.s, 0, ()
        while True:
            i = self.skip_ws(i, newlines=True)
            if i >= len(s):
                return self.positions
            if s.startswith("[[", i):
                start = i
                parts, i = self.key(self.skip_ws(i + 2))
                i = s.index("]]", i) + 2
                path = self.with_aot_indices(parts)
                index = self.aot_count.get(path, 0)
                self.aot_count[path] = index + 1
                self.mark(path, start)
                table = path + (index,)
                self.mark(table, start)
            elif s[i] == "[":
                start = i
                parts, i = self.key(self.skip_ws(i + 1))
                i = s.index("]", i) + 1
                table = self.with_aot_indices(parts)
                for n in range(1, len(table) + 1):
                    self.mark(table[:n], start)
            else:
                i = self.keyval(i, table)

    def with_aot_indices(self, parts: list[str]) -> Path:
        # `[a.b]` after `[[a]]` names a table inside the last element of array a.
        path: Path = ()
        for n, part in enumerate(parts):
            path += (part,)
            if n < len(parts) - 1 and path in self.aot_count:
                path += (self.aot_count[path] - 1,)
        return path

    def keyval(self, i: int, table: Path) -> int:
        key_offsets = []
        parts, i = self.key(i, key_offsets)
        for n, offset in enumerate(key_offsets):
            self.mark(table + tuple(parts[: n + 1]), offset)
        i = self.skip_ws(i)
        assert self.s[i] == "=", (i, self.s[i - 20 : i + 20])
        return self.value(self.skip_ws(i + 1), table + tuple(parts))

    def key(self, i: int, offsets: list[int] | None = None) -> tuple[list[str], int]:
        """A dotted key starting at i; offsets of each part are appended to `offsets`."""
        s, parts = self.s, []
        while True:
            i = self.skip_ws(i)
            if offsets is not None:
                offsets.append(i)
            if s[i] in "\"'":
                end = self.string_end(i)
                parts.append(tomllib.loads(f"k = {s[i:end]}")["k"])
                i = end
            else:
                m = _BARE_KEY.match(s, i)
                parts.append(m.group())
                i = m.end()
            i = self.skip_ws(i)
            if i < len(s) and s[i] == ".":
                i += 1
                continue
            return parts, i

    def value(self, i: int, path: Path) -> int:
        s = self.s
        c = s[i]
        if c == "{":
            i = self.skip_ws(i + 1)
            while s[i] != "}":
                i = self.keyval(i, path)
                i = self.skip_ws(i)
                if s[i] == ",":
                    i = self.skip_ws(i + 1)
            return i + 1
        if c == "[":
            i, index = self.skip_ws(i + 1, newlines=True), 0
            while s[i] != "]":
                self.mark(path + (index,), i)
                i = self.value(i, path + (index,))
                i = self.skip_ws(i, newlines=True)
                if s[i] == ",":
                    i = self.skip_ws(i + 1, newlines=True)
                index += 1
            return i + 1
        if c in "\"'":
            return self.string_end(i)
        m = _TOML_SCALAR_END.search(s, i)
        return m.start() if m else len(s)

    def string_end(self, i: int) -> int:
        s = self.s
        quote = s[i]
        if s.startswith(quote * 3, i):
            j = i + 3
            while True:
                if quote == '"' and s[j] == "\\":
                    j += 2
                elif s[j] == quote:
                    # Up to two quotes may stand just before the closing three: `""""` ends the string.
                    n = 0
                    while j + n < len(s) and s[j + n] == quote:
                        n += 1
                    if n >= 3:
                        return j + n
                    j += n
                else:
                    j += 1
        j = i + 1
        while s[j] != quote:
            j += 2 if (quote == '"' and s[j] == "\\") else 1
        return j + 1


class _JsonScanner:
    def __init__(self, text: str):
        self.s = text
        self.lines = _Lines(text)
        self.positions: Positions = {}
        self.problems: list = []

    def skip(self, i: int) -> int:
        while i < len(self.s) and self.s[i] in " \t\r\n":
            i += 1
        return i

    def value(self, i: int, path: Path) -> int:
        s = self.s
        c = s[i]
        if c == "{":
            i, seen = self.skip(i + 1), set()
            while s[i] != "}":
                key, end = json.decoder.scanstring(s, i + 1)
                child = path + (key,)
                if key in seen:
                    self.problems.append((child, self.lines.at(i), "duplicate key (JSON keeps only the last one)"))
                else:
                    seen.add(key)
                    self.positions[child] = self.lines.at(i)
                i = self.skip(end)
                i = self.value(self.skip(i + 1), child)  # past ':'
                i = self.skip(i)
                if s[i] == ",":
                    i = self.skip(i + 1)
            return i + 1
        if c == "[":
            i, index = self.skip(i + 1), 0
            while s[i] != "]":
                self.positions[path + (index,)] = self.lines.at(i)
                i = self.skip(self.value(i, path + (index,)))
                if s[i] == ",":
                    i = self.skip(i + 1)
                index += 1
            return i + 1
        if c == '"':
            return json.decoder.scanstring(s, i + 1)[1]
        return _JSON_SCALAR.match(s, i).end()
