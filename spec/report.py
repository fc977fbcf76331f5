"""How lint results look: text (compiler style), json, or GitHub Actions annotations."""

from __future__ import annotations

import json

from ftc.spec.errors import SpecIssue


def render(results: dict[str, list[SpecIssue]], fmt: str) -> str:
    """`results` maps each linted file (as named) to its issues."""
    return {"text": _text, "json": _json, "github": _github}[fmt](results)


def _text(results) -> str:
    lines = []
    for issues in results.values():
        lines += [str(issue) for issue in issues]
    errors = sum(i.severity == "error" for issues in results.values() for i in issues)
    warnings = sum(i.severity == "warning" for issues in results.values() for i in issues)
    bad = sum(any(i.severity == "error" for i in issues) for issues in results.values())
    summary = f"{len(results)} spec{'s' if len(results) != 1 else ''} checked: "
    summary += f"{bad} invalid, {errors} error{'s' if errors != 1 else ''}" if bad else "all valid"
    if warnings:
        summary += f", {warnings} warning{'s' if warnings != 1 else ''}"
    return "\n".join(lines + [summary])


def _json(results) -> str:
    out = {"valid": not any(i.severity == "error" for issues in results.values() for i in issues), "files": []}
    for name, issues in results.items():
        out["files"].append(
            {
                "file": name,
                "valid": not any(i.severity == "error" for i in issues),
                "issues": [
                    {
                        "file": i.file,
                        "line": i.line,
                        "col": i.col,
                        "key_path": i.key_path,
                        "severity": i.severity,
                        "message": i.message,
                    }
                    for i in issues
                ],
            }
        )
    return json.dumps(out, indent=2)


def _github(results) -> str:
    # https://docs.github.com/actions/reference/workflow-commands-for-github-actions
    lines = []
    for issues in results.values():
        for i in issues:
            props = [f"file={_escape_property(i.file)}", f"line={i.line}", f"col={i.col}"] if i.line else []
            props.append(f"title={_escape_property('ftc lint: ' + (i.key_path or i.file))}")
            message = i.message if i.line else f"{i.file}: {i.message}"
            lines.append(f"::{i.severity} {','.join(props)}::{_escape_data(message)}")
    return "\n".join(lines)


def _escape_data(text: str) -> str:
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _escape_property(text: str) -> str:
    return _escape_data(text).replace(":", "%3A").replace(",", "%2C")
