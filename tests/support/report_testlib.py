"""Reading a report page back in tests: its chart figures, their series and embedded PNGs."""

from __future__ import annotations

import base64
import json
from html.parser import HTMLParser
from pathlib import Path


class Figures(HTMLParser):
    """Every chart figure of a report page: data-chart, its series and its embedded PNG."""

    def __init__(self):
        super().__init__()
        self.figures: list[dict] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "figure" and "chart" in (a.get("class") or ""):
            self.figures.append({"chart": a.get("data-chart"), "series": json.loads(a.get("data-series") or "[]")})
        if tag == "img" and self.figures and "png" not in self.figures[-1]:
            src = a.get("src", "")
            assert src.startswith("data:image/png;base64,"), src[:40]
            self.figures[-1]["png"] = base64.b64decode(src.split(",", 1)[1])


def figures(path) -> dict[str, dict]:
    parser = Figures()
    parser.feed(Path(path).read_text(encoding="utf-8"))
    return {f["chart"]: f for f in parser.figures}
