"""A Hugging Face hub cache laid out as `hf download` leaves it (refs/<rev> -> snapshots/<commit>/),
with only the files a check reads: lint looks for config.json (or the named .gguf) offline."""

from __future__ import annotations

import hashlib
from pathlib import Path


def cache_model(cache: Path, repo: str, revision: str = "main", files=("config.json",)) -> Path:
    """Put `repo` at `revision` into the hub cache at `cache`; returns its snapshot directory."""
    repo_dir = Path(cache) / ("models--" + repo.replace("/", "--"))
    commit = hashlib.sha1(f"{repo}@{revision}".encode()).hexdigest()
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / revision).write_text(commit)
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    for name in files:
        (snapshot / name).write_text("{}")
    return snapshot
