"""hf: Hugging Face `datasets`, offline only (like models: ftc never downloads).

    hf:NAME[:SPLIT]            a dataset in the local HF datasets cache (`HF_DATASETS_CACHE`),
    hf:NAME:CONFIG:SPLIT       as `datasets.load_dataset(NAME, CONFIG, split=SPLIT)` left it; the
                               split defaults to "train"
    path/to/dir                a directory written by `Dataset.save_to_disk` (state.json +
                               dataset_info.json + *.arrow); for a DatasetDict, its split's
                               directory (path/to/dir/train)

Rows are named `hf:NAME:SPLIT[i]` / `path[i]` (0-based). The `datasets` package is an extra
(`pip install 'ftc[datasets]'`); without it these sources say so.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from typing import Any

from ftc.backends.jax.data.read import BadRow, DataError
from ftc.backends.jax.data.sources import Source, file_stat
from ftc.backends.jax.data.sources.parquet import text_values
from ftc.spec.run_rules import named_source_problem

PREFIX = "hf:"
SAVED_FILES = ("state.json", "dataset_info.json")
_OFFLINE_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


def parse(source: str) -> tuple[str, str | None, str]:
    """`hf:NAME[:CONFIG][:SPLIT]` -> (name, config or None, split)."""
    if why := named_source_problem(source):  # the rule lint applies too
        raise DataError(f"data source {why}")
    parts = source[len(PREFIX) :].split(":")
    name, config, split = parts[0], (parts[1] if len(parts) == 3 else None), (parts[-1] if len(parts) > 1 else "train")
    return name, config, split


def is_saved_dataset(path: str) -> bool:
    return all(os.path.isfile(os.path.join(path, f)) for f in SAVED_FILES)


def _datasets(source: str):
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"data source {source!r}: reading Hugging Face datasets needs the `datasets` package: "
            "pip install 'ftc[datasets]'"
        ) from None
    return datasets


@contextlib.contextmanager
def offline(datasets):
    """No network for the duration, whatever the environment says (restored after)."""
    import huggingface_hub.constants as hub

    env = {k: os.environ.get(k) for k in _OFFLINE_ENV}
    flags = [(datasets.config, "HF_HUB_OFFLINE"), (datasets.config, "HF_DATASETS_OFFLINE"), (hub, "HF_HUB_OFFLINE")]
    saved = [(obj, attr, getattr(obj, attr)) for obj, attr in flags if hasattr(obj, attr)]
    verbosity = datasets.logging.get_verbosity()
    os.environ.update(dict.fromkeys(_OFFLINE_ENV, "1"))
    for obj, attr, _ in saved:
        setattr(obj, attr, True)
    datasets.logging.set_verbosity_error()  # "using the latest cached version ... (offline mode)" is the point
    try:
        yield
    finally:
        datasets.logging.set_verbosity(verbosity)
        for obj, attr, value in saved:
            setattr(obj, attr, value)
        for k, v in env.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def _load(source: str):
    datasets = _datasets(source)
    with offline(datasets):
        if not source.startswith(PREFIX):
            try:
                return datasets.load_from_disk(source)
            except Exception as e:  # noqa: BLE001 - datasets raises many kinds for a damaged directory
                raise DataError(f"data source {source!r}: cannot load it with datasets.load_from_disk: {e}") from e
        name, config, split = parse(source)
        try:
            return datasets.load_dataset(name, config, split=split)
        except ValueError as e:  # an unknown split or config of a cached dataset: datasets lists them
            raise DataError(f"data source {source!r}: {e}") from e
        except (ConnectionError, FileNotFoundError) as e:
            cache = datasets.config.HF_DATASETS_CACHE
            raise DataError(
                f"data source {source!r}: {name!r} is not in the local Hugging Face datasets cache ({cache}). "
                f"ftc never downloads: load it once where there is network "
                f"(`python -c \"import datasets; datasets.load_dataset('{name}')\"` with HF_DATASETS_CACHE pointing "
                "at the cache this machine uses), or save_to_disk it and name that directory"
            ) from e


def records(source: str, data_dir: str | None = None) -> Iterator[tuple[str, Any]]:
    dataset = _load(source)
    if not hasattr(dataset, "features"):  # a DatasetDict: resolve() only lets a Dataset directory through
        raise DataError(f"data source {source!r}: holds several splits ({', '.join(dataset)}); name one")
    for i, row in enumerate(dataset):
        try:
            yield f"{source}[{i}]", text_values(row)
        except BadRow as bad:  # a binary column's bytes that are not UTF-8: this row's problem
            yield f"{source}[{i}]", bad


def fingerprint(source: str) -> tuple:
    if source.startswith(PREFIX):
        return (source,)  # the cache keeps one prepared version per fingerprint
    with open(os.path.join(source, "state.json"), encoding="utf-8") as f:
        state = json.load(f)
    return (file_stat(os.path.join(source, "state.json")), state.get("_fingerprint"))


SOURCE = Source(
    name="hf",
    claims=lambda entry: entry.startswith(PREFIX) or is_saved_dataset(entry),
    records=records,
    fingerprint=fingerprint,
    prefix=PREFIX,
    reads_directory=is_saved_dataset,
)
