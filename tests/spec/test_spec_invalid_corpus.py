"""Every spec in tests/specs/invalid/ fails with exactly the errors listed in its .expect file:
one line per error, `FILE:LINE:COL KEY_PATH | MESSAGE FRAGMENT` (FILE relative to that folder,
KEY_PATH `-` when the problem is the file itself). Files under bases/ are only extended."""

import pathlib

import pytest

from ftc.spec import SpecError, lint_file, load_spec

CORPUS = pathlib.Path(__file__).parent / "specs" / "invalid"
CASES = sorted(p.name for p in CORPUS.iterdir() if p.suffix in (".toml", ".json"))


def _expected(case: str) -> list[tuple]:
    out = []
    for line in (CORPUS / case).with_suffix(".expect").read_text().splitlines():
        if not line.strip():
            continue
        where, _, fragment = line.partition(" | ")
        location, key = where.rsplit(" ", 1)
        file, row, col = location.rsplit(":", 2)
        out.append((file, int(row), int(col), "" if key == "-" else key, fragment))
    return out


def test_corpus_has_at_least_thirty_invalid_specs_in_toml_and_json():
    assert len(CASES) >= 30
    assert any(c.endswith(".json") for c in CASES) and any(c.endswith(".toml") for c in CASES)


@pytest.mark.parametrize("case", CASES)
def test_invalid_spec_reports_each_error_with_location_key_and_message(case, monkeypatch):
    monkeypatch.chdir(CORPUS)
    errors = [i for i in lint_file(case) if i.severity == "error"]
    expected = _expected(case)
    assert expected, f"{case} has no .expect lines"
    got = [(i.file, i.line, i.col, i.key_path) for i in errors]
    assert got == [e[:4] for e in expected], "\n".join(map(str, errors))
    for issue, (*_, fragment) in zip(errors, expected):
        assert fragment in issue.message, str(issue)


@pytest.mark.parametrize("case", CASES)
def test_load_spec_raises_with_the_same_errors(case, monkeypatch):
    monkeypatch.chdir(CORPUS)
    with pytest.raises(SpecError) as info:
        load_spec(case)
    errors = [i for i in info.value.issues if i.severity == "error"]
    assert [(i.file, i.line, i.key_path) for i in errors] == [e[:2] + (e[3],) for e in _expected(case)]
    assert str(errors[0]) in str(info.value)
