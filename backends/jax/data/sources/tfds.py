"""tfds: `tfds:name/config:split` (or `tfds:name:split`), a prepared TensorFlow Datasets dataset
read through `tfds.data_source` (array_record files; TensorFlow is never imported, nothing is
downloaded). Rows are named `tfds:name/config:split[i]`; bytes become strings, numpy values lists.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from ftc.backends.jax.data.read import BadRow, DataError
from ftc.backends.jax.data.sources import Source
from ftc.spec.run_rules import named_source_problem

PREFIX = "tfds:"


def parse(source: str) -> tuple[str, str]:
    """`tfds:name/config:split` -> ("name/config", "split")."""
    if why := named_source_problem(source):  # the rule lint applies too
        raise DataError(f"data source {why}")
    name, _, split = source[len(PREFIX) :].rpartition(":")
    return name, split


def records(source: str, data_dir: str | None = None) -> Iterator[tuple[str, Any]]:
    import tensorflow_datasets as tfds  # lazy: JSONL users never pay for it

    name, split = parse(source)
    try:
        data = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception as e:  # tfds raises many kinds for a missing/unprepared dataset
        # Its first line only: a name tfds does not know is followed by every dataset it does (~270 lines).
        first = next((line for line in str(e).splitlines() if line.strip()), "")
        raise DataError(
            f"data source {source!r}: cannot open it through tfds.data_source "
            f"(prepared with file_format='array_record'?): {type(e).__name__}: {first}"
        ) from e
    for i in range(len(data)):
        try:
            yield f"{source}[{i}]", plain(data[i])
        except UnicodeDecodeError as e:  # one row's bad bytes are that row's problem
            yield f"{source}[{i}]", BadRow(f"a bytes feature is not UTF-8 text ({e.reason} at byte {e.start})")


def plain(value: Any) -> Any:
    """tfds features come back as bytes and numpy; rows are checked as JSON values."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        return plain(value.tolist())
    return value


# Prepared tfds datasets are immutable by version: the name is the fingerprint.
SOURCE = Source(
    name="tfds",
    claims=lambda entry: entry.startswith(PREFIX),
    records=records,
    fingerprint=lambda source: (source,),
    prefix=PREFIX,
)
