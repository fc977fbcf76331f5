"""The report as a person sees it: rendered by headless Chromium (Debian's `chromium`; .ci/run
installs it), screenshotted, and every chart's rectangle checked for the colours of its series.

Where each chart sits comes from the browser itself: a copy of the page with a probe script
reports each chart image's box, whether it decoded, and every resource the page fetched. The
screenshot is of the page as written (no script)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from report_testlib import figures

FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--mute-audio",
)
WIDTH = 1400
PROBE = """<script>
window.addEventListener('load', () => {
  const charts = [...document.querySelectorAll('figure.chart')].map(f => {
    const img = f.querySelector('img'); const r = img.getBoundingClientRect();
    return {chart: f.dataset.chart, x: r.left + scrollX, y: r.top + scrollY, w: r.width, h: r.height,
            complete: img.complete, natural: img.naturalWidth};
  });
  const out = {height: document.documentElement.scrollHeight, charts,
               resources: performance.getEntriesByType('resource').map(e => e.name)};
  const pre = document.createElement('pre'); pre.id = 'probe'; pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>"""


@pytest.fixture(scope="module")
def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("headless Chromium is not installed (Debian: apt-get install -y chromium; .ci/run installs it)")


def offline_prefix() -> list[str]:
    """Run the browser in a network namespace of its own (no interface but loopback), where the
    kernel allows it; else no prefix (the caller adds flags that refuse every host)."""
    unshare = shutil.which("unshare")
    if unshare and subprocess.run([unshare, "--net", "true"], capture_output=True).returncode == 0:
        return [unshare, "--net"]
    return []


def browse(chromium, page: Path, tmp: Path, *args: str, offline: bool = False, height: int = 900) -> str:
    prefix = offline_prefix() if offline else []
    refuse = (
        [] if prefix or not offline else ["--proxy-server=http://127.0.0.1:9", "--host-resolver-rules=MAP * ~NOTFOUND"]
    )
    profile = tmp / f"profile-{len(list(tmp.glob('profile-*')))}"
    done = subprocess.run(
        [*prefix, chromium, *FLAGS, *refuse, f"--user-data-dir={profile}", f"--window-size={WIDTH},{height}", *args,
         page.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def probe(chromium, page: Path, tmp: Path, *, offline: bool = False) -> dict:
    copy = tmp / f"probe-{page.name}"
    copy.write_text(page.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"), encoding="utf-8")
    dom = browse(chromium, copy, tmp, "--dump-dom", offline=offline)
    found = re.search(r'<pre id="probe">(.*?)</pre>', dom, re.S)
    assert found, "the probe script did not run"
    return json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))


def ink(image, colour: str, tolerance: int = 40) -> int:
    """Pixels of `image` within `tolerance` (per channel) of `colour` ("#rrggbb")."""
    want = tuple(int(colour[i : i + 2], 16) for i in (1, 3, 5))
    return sum(
        n for n, rgb in image.getcolors(maxcolors=1 << 24) if all(abs(a - b) <= tolerance for a, b in zip(rgb, want))
    )


def test_the_report_renders_in_chromium_and_every_chart_shows_its_data(chromium, sft_run, tmp_path):
    from PIL import Image

    page = sft_run.run_dir / "report.html"
    layout = probe(chromium, page, tmp_path)
    series = {name: f["series"] for name, f in figures(page).items()}
    assert [c["chart"] for c in layout["charts"]] == list(series)
    shot = Path(os.environ.get("FTC_REPORT_SCREENSHOT", tmp_path / "report.png"))
    browse(chromium, page, tmp_path, f"--screenshot={shot}", height=layout["height"])
    image = Image.open(shot).convert("RGB")
    assert image.size == (WIDTH, layout["height"])
    colours = image.getcolors(maxcolors=1 << 24)
    white = sum(n for n, rgb in colours if min(rgb) >= 250)
    # A blank page is one colour; this one has text, tables and charts (about 8% of it not white).
    assert len(colours) > 500 and white < 0.97 * image.size[0] * image.size[1], "the screenshot is (nearly) blank"

    for chart in layout["charts"]:
        assert chart["complete"] and chart["natural"] == 640, chart
        assert chart["w"] > 300 and chart["h"] > 150, chart
        box = (round(chart["x"]), round(chart["y"]), round(chart["x"] + chart["w"]), round(chart["y"] + chart["h"]))
        crop = image.crop(box)
        assert series[chart["chart"]], chart["chart"]
        for s in series[chart["chart"]]:
            assert s["points"] >= 1
            # A line of n points, or one marker: its colour is on screen inside the chart's box.
            assert ink(crop, s["colour"]) >= 12, (chart["chart"], s)


def test_the_report_opens_with_the_network_off(chromium, sft_run, tmp_path):
    page = sft_run.run_dir / "report.html"
    text = page.read_text(encoding="utf-8")
    linked = re.findall(r"""(?:src|href)\s*=\s*["']?(?!data:|#)([^"'\s>]+)""", text)
    assert not linked and "<script" not in text and "<link" not in text and "@import" not in text
    layout = probe(chromium, page, tmp_path, offline=True)
    assert layout["charts"] and all(c["complete"] and c["natural"] > 0 for c in layout["charts"])
    assert layout["resources"] == []  # nothing fetched: every image is inline

    # The same check sees a page that needs the network: an image from a host cannot load offline.
    needy = tmp_path / "needs-network.html"
    needy.write_text(text.replace("</main>", '<img src="http://ftc-report.invalid/x.png"></main>'), encoding="utf-8")
    failed = probe(chromium, needy, tmp_path, offline=True)
    assert failed["resources"] == ["http://ftc-report.invalid/x.png"]
