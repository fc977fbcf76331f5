"""The README's quickstart, as a new user runs it: its install-and-run command in a fresh clone and
a fresh venv, then its load line against the export. The validation losses are the README's."""

import json
import re

import fresh_install
import pytest

pytestmark = pytest.mark.slow


def quickstart_blocks() -> list[str]:
    """The ```bash blocks of the README's Quickstart section, in order."""
    text = (fresh_install.REPO / "README.md").read_text()
    section = text.split("\n## Quickstart", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)```", section, flags=re.S)


def readme_losses() -> list[float]:
    text = (fresh_install.REPO / "README.md").read_text()
    row = re.search(r"validation loss \(perplexity\) at step 0 / 15 / 30 \| (.*?) \|", text).group(1)
    return [float(part.split()[0]) for part in row.split(" / ")]


def test_the_quickstart_installs_runs_and_its_export_loads_as_the_readme_says(tmp_path):
    # The section's blocks: install-and-run, the load line, then `ftc chat` (interactive; its own tests).
    blocks = quickstart_blocks()
    install_and_run = next(b for b in blocks if "ftc run examples/quickstart.toml" in b)
    load = next(b for b in blocks if "from_pretrained" in b)
    repo = fresh_install.clone(tmp_path / "ftc")
    env = {"FTC_CACHE": str(tmp_path / "ftc-cache")}  # the first run on a machine: converts the GGUF
    done = fresh_install.run(install_and_run, repo, timeout=3600, env=env)
    (tmp_path / "run.log").write_text(done.stdout + "\n--- stderr ---\n" + done.stderr)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]

    rows = [json.loads(line) for line in (repo / "runs" / "quickstart" / "metrics.jsonl").read_text().splitlines()]
    validation = [r["loss"] for r in rows if r["split"] == "validation"]
    assert [round(loss, 4) for loss in validation] == readme_losses()
    assert (repo / "runs" / "quickstart" / "data_stats.json").is_file()

    answer = fresh_install.run(load, repo, timeout=600, env=env)
    assert answer.returncode == 0, answer.stderr[-3000:]
    assert "Great Gatsby" in answer.stdout, answer.stdout
