"""What a spec names that is not on this machine yet: data files, model directories, packages, and
Hugging Face ids missing from the local HF cache. Lint reports these as warnings (the spec can be
reviewed before the data lands); `ftc run` would fail on them. Standard library only: the
lint-only install has no huggingface_hub, so the cache layout is read here directly.
"""

from __future__ import annotations

import glob
import os

from ftc.spec.paths import NAMED_DATA_PREFIXES, PACKAGE_PREFIX, is_hub_id, package_problem

MODEL_KEYS = ("base", "tokenizer", "init_from")
SAVED_DATASET = ("state.json", "dataset_info.json")  # backends/jax/data/sources/hf_datasets.py SAVED_FILES


def value_at(data, path: tuple):
    """The value at a key path (keys and list indices), or None where there is none."""
    for part in path:
        if isinstance(data, dict) and part in data:
            data = data[part]
        elif isinstance(data, list) and isinstance(part, int) and part < len(data):
            data = data[part]
        else:
            return None
    return data


def shown_path(path: str) -> str:
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def missing(s: dict) -> list[tuple[tuple, str]]:
    """(key path, message) for every local file, package or cached model the resolved spec `s`
    names that is not here."""
    problems = []
    train = value_at(s, ("data", "train"))
    sources = (
        [(("data", "train"), train)]
        if isinstance(train, str)
        else [(("data", "train", i), v) for i, v in enumerate(train) if isinstance(v, str)]
        if isinstance(train, list)
        else []
    )
    validation = value_at(s, ("data", "validation"))
    if isinstance(validation, str):
        sources.append((("data", "validation"), validation))
    for path, value in sources:
        if not value.strip() or value.startswith(NAMED_DATA_PREFIXES):  # empty: the schema says so
            continue
        # as data/sources/__init__.py `resolve` reads a glob: recursive ("**"), files and datasets only
        if glob.has_magic(value) and not any(map(_readable, glob.glob(value, recursive=True))):
            problems.append((path, f"no file matches {shown_path(value)}"))
        elif not glob.has_magic(value) and not os.path.exists(value):
            problems.append((path, f"file not found: {shown_path(value)}"))
        elif os.path.isdir(value) and not all(os.path.isfile(os.path.join(value, f)) for f in SAVED_DATASET):
            # data/sources/__init__.py `resolve` reads a directory only as one save_to_disk wrote
            what = "is a directory, but not one `datasets`' save_to_disk wrote (state.json + dataset_info.json)"
            problems.append((path, f"{shown_path(value)} {what}; name its files or a glob (dir/*.jsonl)"))
    for key in MODEL_KEYS:
        value = value_at(s, ("model", key))
        if not isinstance(value, str) or not value.strip():
            continue
        if value.startswith(PACKAGE_PREFIX):
            problem = package_problem(value)
        elif is_hub_id(value):
            problem = hf_cache_problem(value)
        else:
            problem = None if os.path.exists(value) else f"not found: {shown_path(value)}"
        if problem:
            problems.append((("model", key), problem))
    return problems


def _readable(path: str) -> bool:
    return os.path.isfile(path) or all(os.path.isfile(os.path.join(path, f)) for f in SAVED_DATASET)


def hf_hub_cache() -> str:
    """The Hugging Face hub cache as huggingface_hub finds it: HF_HUB_CACHE, else HF_HOME/hub,
    else $XDG_CACHE_HOME/huggingface/hub, else ~/.cache/huggingface/hub."""
    if os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE"):
        return os.path.expanduser(os.environ.get("HF_HUB_CACHE") or os.environ["HUGGINGFACE_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return os.path.join(os.path.expanduser(home), "hub")


def hf_cache_problem(model_id: str) -> str | None:
    """Why the HF id `org/name[@revision][/file.gguf]` cannot load offline, or None if it can."""
    repo, _, rest = model_id.partition("@")
    revision, filename = None, None
    if rest:
        revision, _, filename = rest.partition("/")
    elif model_id.lower().endswith(".gguf"):
        org, name, filename = model_id.split("/", 2)
        repo = f"{org}/{name}"
    cache = hf_hub_cache()
    snapshot = _snapshot(os.path.join(cache, "models--" + repo.replace("/", "--")), revision or "main")
    wanted = filename or "config.json"
    if snapshot is not None and os.path.exists(os.path.join(snapshot, wanted)):
        return None
    command = " ".join(["hf download", repo, filename or "", f"--revision {revision}" if revision else ""])
    command = " ".join(command.split())
    what = f"file {filename!r} of " if filename else ""
    at = f" at revision {revision!r}" if revision else ""
    return (
        f"{what}Hugging Face model {repo!r}{at} is not in the local HF cache ({shown_path(cache)}) and ftc never "
        f"downloads: fetch it with `{command}`, or an offline base (`ftc init` lists them, e.g. package:NAME/path)"
    )


def _snapshot(repo_dir: str, revision: str) -> str | None:
    """The snapshot directory a revision (branch, tag or commit) points at in a cached repo."""
    ref = os.path.join(repo_dir, "refs", revision)
    if os.path.isfile(ref):
        with open(ref, encoding="utf-8") as f:
            revision = f.read().strip()
    snapshot = os.path.join(repo_dir, "snapshots", revision)
    return snapshot if os.path.isdir(snapshot) else None
