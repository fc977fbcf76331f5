"""parquet: a `.parquet` file, one row per table row (read with pyarrow, a row group at a time).

Rows are named `path[i]` (0-based, as pandas and pyarrow number them). Columns become the row's
keys: a list<struct<role, content>> column reads as a list of message objects, null as null,
binary as UTF-8 text. A file pyarrow cannot open is a DataError naming it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from ftc.backends.jax.data.read import BadRow, DataError
from ftc.backends.jax.data.sources import Source, file_stat

SUFFIXES = (".parquet", ".pq")
BATCH_ROWS = 4096


def records(path: str, data_dir: str | None = None) -> Iterator[tuple[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    def cannot(e: Exception, at: str) -> DataError:
        return DataError(f"data source {path!r}: cannot read it as Parquet{at} ({type(e).__name__}: {e})")

    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=BATCH_ROWS)
    except (pa.ArrowException, OSError) as e:
        raise cannot(e, "") from e
    i = 0
    while True:  # a batch at a time: a damaged row group further on is found when reached
        try:
            batch = next(batches, None)
        except (pa.ArrowException, OSError) as e:
            raise cannot(e, f" past row {i}" if i else "") from e
        if batch is None:
            return
        for row in batch.to_pylist():
            try:
                yield f"{path}[{i}]", text_values(row)
            except BadRow as bad:
                yield f"{path}[{i}]", bad
            i += 1


def text_values(value: Any, nested: bool = False) -> Any:
    """Binary columns hold text as bytes; rows are checked as JSON values. A struct's field is
    null in every element that lacks it (a message without "weight", "name", "tool_calls"): a
    column cannot tell absent from null, so null fields inside a struct are left out, as JSON
    would have written the message. A top-level column's null stays (the format names it)."""
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as e:
            raise BadRow(f"a binary value is not UTF-8 text ({e.reason} at byte {e.start})") from None
    if isinstance(value, dict):
        return {k: text_values(v, True) for k, v in value.items() if not (nested and v is None)}
    if isinstance(value, (list, tuple)):
        return [text_values(v, True) for v in value]
    return value


SOURCE = Source(
    name="parquet",
    claims=lambda entry: entry.lower().endswith(SUFFIXES),
    records=records,
    fingerprint=file_stat,
)
