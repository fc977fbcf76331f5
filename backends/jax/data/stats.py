"""What a run's data is, as data: the shape of each batch array and the statistics of reading,
cleaning, splitting and packing (printed at the start of a run, written to data_stats.json)."""

from __future__ import annotations

import dataclasses

import numpy as np

from ftc.backends.jax.data import clean as data_clean


@dataclasses.dataclass(frozen=True)
class ArraySpec:
    """Shape and dtype of one batch array (a leaf: `jax.ShapeDtypeStruct(s.shape, s.dtype)`)."""

    shape: tuple[int, ...]
    dtype: np.dtype


@dataclasses.dataclass(frozen=True)
class DataStats:
    format: str
    train_files: tuple[str, ...]
    validation_files: tuple[str, ...]
    rows_read: int  # train rows read well-formed (validation file: below)
    bad_rows_skipped: int  # malformed rows left out (on_bad_row="skip"), train + validation
    bad_row_examples: tuple[str, ...]  # the first few of those, "file:line: problem"
    train_clean: data_clean.CleanReport
    validation_clean: data_clean.CleanReport | None
    validation_from: str  # "file", "split" or "none"
    train_sequences: int
    train_rows: int  # rows after packing (= sequences when not packed)
    validation_sequences: int
    validation_rows: int
    packing: bool  # whether sequences were packed
    packing_efficiency: float  # share of train positions holding real tokens
    validation_packing_efficiency: float
    supervised_tokens: int  # train positions with weight > 0 (examples for classification)
    label_names: tuple[str, ...] | None

    def summary(self) -> str:
        lines = [
            f"data: {self.format}, {len(self.train_files)} train source(s), {self.rows_read} rows read"
            + (f", {self.bad_rows_skipped} malformed rows skipped" if self.bad_rows_skipped else "")
        ]
        lines.append(f"  train clean: {self.train_clean.summary()}")
        if self.validation_clean is not None:
            lines.append(f"  validation ({self.validation_from}) clean: {self.validation_clean.summary()}")
        lines.append(
            f"  train: {self.train_sequences} sequences in {self.train_rows} rows, "
            f"{self.supervised_tokens} supervised, "
            + (
                f"packing efficiency {self.packing_efficiency:.1%}"
                if self.packing
                else f"not packed, {self.packing_efficiency:.1%} of positions are tokens"
            )
        )
        if self.validation_from != "none":
            lines.append(f"  validation: {self.validation_sequences} sequences in {self.validation_rows} rows")
        if self.label_names is not None:
            lines.append(f"  labels ({len(self.label_names)}): {', '.join(self.label_names)}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        for key in ("train_clean", "validation_clean"):
            report = getattr(self, key)
            out[key] = (
                None
                if report is None
                else {
                    "seen": report.seen,
                    "kept": report.kept,
                    "truncated": report.truncated,
                    "split": report.split,
                    "dropped": report.dropped_by_reason,
                }
            )
        return out
