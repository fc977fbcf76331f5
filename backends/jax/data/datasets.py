"""The data entry point: files in, fixed-shape per-process numpy batches out.

    datasets = build_datasets(format="chat", train="data/train.jsonl", tokenizer=tok,
                              max_seq_len=2048, batch_size=64, seed=0, ...)   # every [data] key
    it = datasets.train_iterator()            # endless; it.get_state() / it.set_state(state)
    batch = next(it)                          # nested dict of numpy arrays, see below
    for batch in datasets.validation_batches(): ...

read (data_read) -> clean rows (data_clean) -> split off validation -> tokenise (data_tokenize)
-> cap lengths (data_clean) -> shuffle with the seed, pack (data_pack) -> grain (data_loader).
Everything up to the packed arrays is cached in-process by a fingerprint of the inputs (files'
paths, sizes and mtimes, the tokenizer's vocabulary and template, every option that changes the
arrays), so calling build_datasets again (plan, then run) does not tokenise again.

What differs between formats is each format's `Format` (data/formats/); the batch layout is
the format's `layout` (pack.py), and `Datasets.kind` names it.

Batches (per process: B = batch_size / process_count rows, T = max_seq_len):
  kind "lm" (chat, completion, text):
    input_ids   int32   [B, T]   tokens fed to the model
    targets     int32   [B, T]   next token: targets[b, t] = input_ids[b, t + 1] inside a segment
    weights     float32 [B, T]   loss weight on predicting targets[b, t]; 0 on padding, at the
                                 last token of every segment, and on unsupervised tokens
    segment_ids int32   [B, T]   1..k per packed sequence, 0 = padding
    positions   int32   [B, T]   0.. restarting at every segment
    (see data_pack for the shift convention). Loss = sum(weights * nll) / sum(weights), summed
    over the whole global batch before dividing.
  kind "preference" (preference; never packed):
    chosen   {the five lm keys above, [B, T]}
    rejected {the five lm keys above, [B, T]}
    weights  float32 [B]     1 for a real pair, 0 for a padding row (mask the DPO loss with it)
  kind "classification" (classification; never packed):
    input_ids, segment_ids (1 on tokens, 0 padding), positions   int32 [B, T]
    labels   int32   [B]     index into Datasets.label_names
    weights  float32 [B]     1 for a real example, 0 for a padding row
An epoch is `steps_per_epoch` global batches; the last is topped up with all-zero rows (weight 0)
so no row is ever dropped. Shuffling is per epoch from the seed; the processes' shares of a global
batch are disjoint and together the same global batch for any process count (data_loader).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from ftc.backends.jax.data import clean as data_clean
from ftc.backends.jax.data import formats
from ftc.backends.jax.data import loader as data_loader
from ftc.backends.jax.data import pack as data_pack
from ftc.backends.jax.data import read as data_read
from ftc.backends.jax.data import sources as data_sources
from ftc.backends.jax.data import tokenize as data_tokenize
from ftc.backends.jax.data.read import DataError
from ftc.backends.jax.data.stats import ArraySpec, DataStats

_CACHE: dict[str, Prepared] = {}
_CACHE_SIZE = 4

__all__ = ["build_datasets", "Datasets", "DataStats", "ArraySpec", "DataError"]


@dataclasses.dataclass(frozen=True, eq=False)
class Datasets:
    kind: str  # the format's layout: "lm" | "preference" | "classification"
    seq_len: int  # T
    batch_size: int  # global rows per step
    per_process_batch_size: int  # B = batch_size / process_count
    process_index: int
    process_count: int
    seed: int
    shuffle: bool
    steps_per_epoch: int  # global batches per epoch (last one topped up with empty rows)
    validation_steps: int  # 0 when there is no validation data
    label_names: tuple[str, ...] | None
    stats: DataStats
    train_rows: dict  # all rows, [N, ...] numpy (every process holds the index)
    validation_rows: dict | None

    def train_dataset(self):
        """The grain MapDataset of this process's batches (endless)."""
        return data_loader.train_dataset(
            self.train_rows,
            batch_size=self.batch_size,
            seed=self.seed,
            shuffle=self.shuffle,
            process_index=self.process_index,
            process_count=self.process_count,
        )

    def train_iterator(self, state: dict | None = None):
        """A checkpointable iterator: `get_state()` -> small dict, `set_state(state)` resumes exactly."""
        return data_loader.iterate(self.train_dataset(), state)

    def validation_batches(self, batch_size: int | None = None) -> Iterator[dict]:
        """This process's share of every validation batch, in order (`validation_steps` of them
        at the default `batch_size`; a run evaluates in micro-batches to bound memory)."""
        if self.validation_rows is None:
            return iter(())
        return iter(
            data_loader.eval_dataset(
                self.validation_rows,
                batch_size=batch_size or self.batch_size,
                process_index=self.process_index,
                process_count=self.process_count,
            )
        )

    def batch_spec(self) -> dict:
        """The per-process batch as a tree of ArraySpec (same nesting as a batch)."""

        def spec(tree):
            if isinstance(tree, dict):
                return {k: spec(v) for k, v in tree.items()}
            return ArraySpec((self.per_process_batch_size,) + tuple(tree.shape[1:]), tree.dtype)

        return spec(self.train_rows)


@dataclasses.dataclass(frozen=True)
class Prepared:
    train: data_pack.Packed
    validation: data_pack.Packed | None
    stats: DataStats


def build_datasets(
    *,
    format: str,
    train: str | Sequence[str],
    tokenizer: Any,
    max_seq_len: int,
    batch_size: int,
    validation: str | Sequence[str] | None,
    validation_split: float | None,
    packing: bool | None,
    train_on: str | None,
    shuffle: bool,
    clean: dict,
    on_bad_row: str,
    labels: Sequence[str] | None,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    tfds_data_dir: str | None = None,
) -> Datasets:
    """Datasets for one run (see module docstring). Raises DataError for data the options refuse.

    The keyword arguments named like [data] keys take the resolved Spec's values (its defaults are
    the schema's): `clean` has every data.clean key; `packing`, `train_on` and `labels` are None
    where they do not apply to the format, `validation_split` None or 0 for no split."""
    fmt = formats.get(format)
    fmt.check_train_on(train_on)
    unknown = set(clean) - set(data_clean.CLEAN_KEYS)
    if unknown:
        raise ValueError(f"unknown data.clean keys {sorted(unknown)}; expected {sorted(data_clean.CLEAN_KEYS)}")
    missing = set(data_clean.CLEAN_KEYS) - set(clean)
    if missing:
        raise ValueError(f"missing data.clean keys {sorted(missing)}; the resolved spec has every one")
    validation_split = validation_split or 0.0
    if validation is not None and validation_split:
        raise ValueError("give data.validation or data.validation_split, not both")
    if not 0.0 <= validation_split < 1.0:
        raise ValueError(f"validation_split {validation_split} must be in [0, 1)")
    if max_seq_len < 2:
        raise ValueError(f"max_seq_len {max_seq_len} must be at least 2")
    options = dict(
        format=format,
        train=train,
        validation=validation,
        validation_split=validation_split,
        max_seq_len=max_seq_len,
        packing=packing,
        train_on=train_on,
        shuffle=shuffle,
        clean=clean,
        on_bad_row=on_bad_row,
        labels=labels,
        seed=seed,
        tfds_data_dir=tfds_data_dir,
    )
    key = _fingerprint(options, tokenizer)
    prepared = _CACHE.get(key)
    if prepared is None:
        prepared = _prepare(tokenizer=tokenizer, **options)
        _CACHE[key] = prepared
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.pop(next(iter(_CACHE)))
    per_process = data_loader._per_process(batch_size, process_index, process_count)
    val = prepared.validation
    return Datasets(
        kind=fmt.layout.name,
        seq_len=max_seq_len,
        batch_size=batch_size,
        per_process_batch_size=per_process,
        process_index=process_index,
        process_count=process_count,
        seed=seed,
        shuffle=shuffle,
        steps_per_epoch=data_loader.steps_per_epoch(prepared.train.rows, batch_size),
        validation_steps=data_loader.steps_per_epoch(val.rows, batch_size) if val else 0,
        label_names=prepared.stats.label_names,
        stats=prepared.stats,
        train_rows=prepared.train.arrays,
        validation_rows=val.arrays if val else None,
    )


@dataclasses.dataclass(frozen=True)
class Tokenized:
    """The splits read, cleaned and tokenised, in reading order: what a run lays out (`lay_out`),
    and what `ftc data inspect` shows. `train_items[i].where` names its row."""

    read: data_read.ReadResult
    skipped: tuple[str, ...]  # malformed rows left out, train and validation
    train_items: list
    train_report: data_clean.CleanReport
    validation_items: list
    validation_report: data_clean.CleanReport | None  # None: no validation
    validation_from: str  # "file", "split" or "none"
    validation_files: tuple[str, ...]
    label_names: tuple[str, ...] | None


def _prepare(*, shuffle, packing, **options) -> Prepared:
    return lay_out(
        tokenize_splits(**options),
        format=options["format"],
        max_seq_len=options["max_seq_len"],
        packing=packing,
        shuffle=shuffle,
        seed=options["seed"],
    )


def tokenize_splits(
    *,
    format,
    train,
    validation,
    validation_split,
    tokenizer,
    max_seq_len,
    train_on,
    clean,
    on_bad_row,
    labels,
    seed,
    tfds_data_dir=None,
) -> Tokenized:
    """read -> clean rows -> split off validation -> tokenise -> cap lengths (arguments: as
    `build_datasets`'s)."""
    read = data_read.read_rows(train, format=format, on_bad_row=on_bad_row, tfds_data_dir=tfds_data_dir)
    row_options = dict(
        format=format,
        dedupe=clean["dedupe"],
        drop_empty=clean["drop_empty"],
        roles=clean["roles"],
        unknown_roles=clean["unknown_roles"],
        train_on=train_on,
    )
    train_rows, train_report = data_clean.clean_rows(read.rows, **row_options)
    if not train_rows:
        bad = f"; {len(read.skipped)} malformed row(s) skipped, first {read.skipped[0]}" if read.skipped else ""
        raise DataError(
            f"{', '.join(read.files)}: no training rows left after cleaning ({train_report.summary()}{bad})"
        )

    val_rows, val_report, val_from, val_files, skipped = None, None, "none", (), list(read.skipped)
    val_items: list = []
    if validation is not None:
        val_read = data_read.read_rows(validation, format=format, on_bad_row=on_bad_row, tfds_data_dir=tfds_data_dir)
        skipped += val_read.skipped
        exclude = {data_clean.row_hash(r.data) for r in train_rows} if clean["dedupe"] else ()
        val_rows, val_report = data_clean.clean_rows(val_read.rows, exclude=exclude, **row_options)
        val_from, val_files = "file", val_read.files
    elif validation_split:
        n_val = max(1, round(validation_split * len(train_rows)))
        if n_val >= len(train_rows):
            raise DataError(f"validation_split {validation_split} leaves no training rows of {len(train_rows)}")
        order = np.random.default_rng([seed, 1]).permutation(len(train_rows))
        chosen = set(order[:n_val].tolist())
        val_rows = [r for i, r in enumerate(train_rows) if i in chosen]
        train_rows = [r for i, r in enumerate(train_rows) if i not in chosen]
        val_from = "split"

    fmt = formats.get(format)
    names = fmt.label_names(train_rows, labels) if fmt.label_names else None

    def prepare_items(rows, split="train"):
        items = data_tokenize.tokenize_rows(
            rows,
            format=format,
            tokenizer=tokenizer,
            train_on=train_on,
            label_names=names,
            progress=f"tokenizing {split}",
        )
        return data_clean.clean_lengths(items, max_seq_len=max_seq_len, overlong=clean["overlong"])

    train_items, length_report = prepare_items(train_rows)
    train_report = train_report.then(length_report)
    if not train_items:
        long = train_report.dropped_by_reason.get("overlong")
        why = f"; overlong: nothing supervised within model.max_seq_len = {max_seq_len} tokens" if long else ""
        raise DataError(
            f"{', '.join(read.files)}: no training sequences left after cleaning ({train_report.summary()}){why}"
        )
    if val_rows is not None:
        split_report = data_clean.CleanReport(len(val_rows), len(val_rows)) if val_report is None else val_report
        val_items, val_lengths = prepare_items(val_rows, "validation")
        val_report = split_report.then(val_lengths)
        if not val_items:  # a run would otherwise go on without the validation the spec asks for
            named = ", ".join(val_files) if val_files else f"validation_split = {validation_split}"
            same = " (in_train: rows also in the training data; data.clean.dedupe = false keeps them)"
            same = same if val_report.dropped_by_reason.get("in_train") else ""
            raise DataError(f"{named}: no validation sequences left after cleaning ({val_report.summary()}){same}")
    return Tokenized(
        read, tuple(skipped), train_items, train_report, val_items, val_report, val_from, tuple(val_files), names
    )


def lay_out(t: Tokenized, *, format, max_seq_len, packing, shuffle, seed) -> Prepared:
    """Shuffle with the seed, lay out (pack) each split, and count: the arrays a run trains on."""
    train_items = t.train_items
    if shuffle:  # the order packing sees; the loader reshuffles rows every epoch
        order = np.random.default_rng([seed, 2]).permutation(len(train_items))
        train_items = [train_items[i] for i in order]

    fmt = formats.get(format)
    do_pack = bool(packing) and fmt.layout.packs
    train_packed = fmt.layout.lay_out(train_items, max_seq_len, do_pack)
    val_packed = fmt.layout.lay_out(t.validation_items, max_seq_len, do_pack) if t.validation_items else None
    stats = DataStats(
        format=format,
        train_files=t.read.files,
        validation_files=t.validation_files,
        rows_read=len(t.read.rows),
        bad_rows_skipped=len(t.skipped),
        bad_row_examples=t.skipped[:5],
        train_clean=t.train_report,
        validation_clean=t.validation_report,
        validation_from=t.validation_from,
        train_sequences=train_packed.sequences,
        train_rows=train_packed.rows,
        validation_sequences=val_packed.sequences if val_packed else 0,
        validation_rows=val_packed.rows if val_packed else 0,
        packing=do_pack,
        packing_efficiency=train_packed.efficiency,
        validation_packing_efficiency=val_packed.efficiency if val_packed else 0.0,
        supervised_tokens=train_packed.supervised,
        label_names=t.label_names,
    )
    return Prepared(train_packed, val_packed, stats)


def _fingerprint(options: dict, tokenizer: Any) -> str:
    h = hashlib.blake2b(digest_size=16)

    def feed(*parts):
        for p in parts:
            h.update(repr(p).encode("utf-8"))
            h.update(b"\0")

    feed(sorted((k, v) for k, v in options.items() if k not in ("train", "validation")))
    for group in ("train", "validation"):
        sources = options[group]
        feed(group)
        if sources is None:
            continue
        for entry in data_read.resolve_sources(sources):
            feed(data_sources.source_for(entry).fingerprint(entry))
    feed(tokenizer_fingerprint(tokenizer))
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Changes when anything that decides token ids does: vocabulary, merges, template, specials."""
    h = hashlib.blake2b(digest_size=16)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update(backend.to_str().encode("utf-8") if backend is not None else repr(tokenizer).encode("utf-8"))
    for part in (
        getattr(tokenizer, "chat_template", None),
        tokenizer.eos_token_id,
        tokenizer.bos_token_id,
        tokenizer.pad_token_id,
        sorted(getattr(tokenizer, "added_tokens_encoder", {}).items()),
    ):
        h.update(repr(part).encode("utf-8"))
    return h.hexdigest()
