"""Data sources: where rows come from, one module per kind, each defining `SOURCE = Source(...)`.

A source string in `data.train` / `data.validation` is a path, a glob, or a named source
(`tfds:...`, `hf:...`). Paths and globs are expanded first (resolve); each resulting entry is
read by the first registered source kind that claims it, in SOURCE_MODULES order, so the
catch-all (jsonl: any other file) comes last. Adding a source kind is a module here and one
line in SOURCE_MODULES; a name without a leading dot is an absolute module name.

Sources yield raw rows (JSON-like values); the row's shape is the format's business
(data/formats/). They never decide what a row means.
"""

from __future__ import annotations

import bz2
import dataclasses
import glob
import gzip
import importlib
import lzma
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

SOURCE_MODULES = {
    "tfds": ".tfds",
    "hf": ".hf_datasets",
    "parquet": ".parquet",
    "json": ".json_array",
    "csv": ".delimited",
    "jsonl": ".jsonl",
}

# Compressed files are read through: `rows.jsonl.gz` is a JSONL file, `rows.csv.xz` a CSV file.
COMPRESSED = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
# The errors a damaged or mislabelled compressed file raises while it is read.
DECOMPRESS_ERRORS = (OSError, EOFError, lzma.LZMAError)


@dataclasses.dataclass(frozen=True)
class Source:
    name: str
    # Whether this kind reads `entry` (a named source as written, or one existing file or directory).
    claims: Callable[[str], bool]
    # (entry, tfds_data_dir) -> (where, raw row or read.BadRow) in order; where names the row
    # ("path:line", "path[i]", "tfds:name:split[i]"). A source that cannot be opened raises DataError.
    records: Callable[[str, str | None], Iterator[tuple[str, Any]]]
    # What changes when the data does (in-process cache key of datasets.py).
    fingerprint: Callable[[str], tuple]
    # Named sources (`tfds:`, `hf:`) are not paths: never globbed, resolved or stat'ed.
    prefix: str | None = None
    # A directory this kind reads as one source (a `datasets.save_to_disk` directory).
    reads_directory: Callable[[str], bool] = lambda path: False


def names() -> tuple[str, ...]:
    return tuple(SOURCE_MODULES)


def get(name: str) -> Source:
    if name not in SOURCE_MODULES:
        raise ValueError(f"data source kind {name!r} is not one of {', '.join(SOURCE_MODULES)}")
    return importlib.import_module(SOURCE_MODULES[name], __name__).SOURCE


def prefixes() -> tuple[str, ...]:
    return tuple(s.prefix for s in map(get, names()) if s.prefix)


def source_for(entry: str) -> Source:
    """The source kind that reads `entry` (one element of `resolve`'s result)."""
    for name in names():
        source = get(name)
        if source.claims(entry):
            return source
    raise ValueError(f"no data source kind reads {entry!r}")  # unreachable: jsonl claims any file


def base_name(path: str) -> str:
    """The lower-cased file name without a compression suffix: what says which kind reads it."""
    name = os.path.basename(path).lower()
    for suffix in COMPRESSED:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def open_bytes(path: str):
    """The file's bytes, decompressed when its name ends in .gz, .bz2 or .xz."""
    opener = COMPRESSED.get(os.path.splitext(path.lower())[1], open)
    return opener(path, "rb")


def file_stat(path: str) -> tuple:
    st = os.stat(path)
    return (os.path.abspath(path), st.st_size, st.st_mtime_ns)


def resolve(sources: str | Sequence[str], error: Callable[[str], Exception]) -> list[str]:
    """Files (sorted within each glob), dataset directories and named sources, in order.
    `error(message)` builds the exception raised for a source that names nothing readable."""
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    out = []
    for source in sources:
        source = os.fspath(source)
        if source.startswith(prefixes()):
            out.append(source)
            continue
        path = os.path.expanduser(source)
        if glob.has_magic(path):
            matches = sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p) or _dataset_dir(p))
            if not matches:
                raise error(f"data source {source!r}: no files match this glob")
            out.extend(matches)
        elif os.path.isfile(path) or _dataset_dir(path):
            out.append(path)
        elif os.path.isdir(path):
            raise error(
                f"data source {source!r}: a directory, but not one written by `datasets`' save_to_disk "
                "(state.json + dataset_info.json + *.arrow); name its files or a glob (dir/*.jsonl) instead"
                + _splits_hint(path)
            )
        else:
            raise error(f"data source {source!r}: no such file")
    if not out:
        raise error("no data sources given")
    return out


def _dataset_dir(path: str) -> bool:
    return os.path.isdir(path) and any(get(name).reads_directory(path) for name in names())


def _splits_hint(path: str) -> str:
    """A DatasetDict's directory holds one directory per split: say which to name."""
    splits = sorted(d for d in os.listdir(path) if _dataset_dir(os.path.join(path, d)))
    if not splits:
        return ""
    return f"; it holds the splits {', '.join(splits)}: name one, e.g. {os.path.join(path, splits[0])!r}"
