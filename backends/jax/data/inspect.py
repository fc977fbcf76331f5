"""`ftc data inspect`: what a spec's model will be trained on, before any accelerator is used.

The examples and every count come from the data pipeline itself: `datasets.tokenize_splits`
(read, clean, split, tokenise, cap lengths; the run's own function) and `datasets.lay_out` (the
run's batches and statistics). Which tokens an example shows as supervised is read from the
row the train step sees for it (the format's layout of that one example: `weights[t]` on
predicting `input_ids[t + 1]`), never re-derived from roles or templates here.

The result is plain data (`Inspection`); report/inspect_view.py renders it for the terminal and
as HTML.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np

from ftc.backends.jax import stages
from ftc.backends.jax.data import datasets, formats, pack
from ftc.backends.jax.data.tokenize import Labelled, Pair, Tokens
from ftc.backends.jax.state.init_from import read_model_config

# Markers chat templates write around turns (<|im_start|>, <start_of_turn>, [INST], <s>, ...).
TEMPLATE_MARKER = re.compile(r"<\|[^<>|\s]{1,40}\|>|<[a-z_/][a-z0-9_]{0,30}>|\[/?[A-Z_]{2,12}\]")
PROBE_CONVERSATION = ({"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"})


@dataclasses.dataclass(frozen=True)
class Example:
    where: str  # file:line of the row (and which side, for preference pairs)
    ids: tuple[int, ...]
    pieces: tuple[str, ...]  # each token's text
    weights: tuple[float, ...]  # loss weight the train step puts on predicting token i (0 for token 0)
    label: str | None = None  # classification: the class the example is trained to predict

    @property
    def supervised(self) -> int:
        return sum(w > 0 for w in self.weights)


@dataclasses.dataclass(frozen=True)
class Check:
    name: str
    level: str  # "ok" | "warn" | "info"
    message: str


@dataclasses.dataclass(frozen=True)
class Inspection:
    spec_path: str
    format: str
    layout: str  # "lm" | "preference" | "classification"
    tokenizer: str  # where it was loaded from
    max_seq_len: int
    examples: tuple[Example, ...]
    rendered: tuple[str, ...]  # each shown example's full text, as the template rendered it (decoded)
    checks: tuple[Check, ...]
    stats: dict  # DataStats.to_dict() of the layout the spec asks for
    lengths: tuple[int, ...]  # tokens per training example (each side of a pair)
    packing: dict  # what packing gives vs one example per row


def inspect_spec(spec, *, n: int = 20) -> Inspection:
    """Inspect `spec`'s training data (first `n` examples shown). Raises DataError, ValueError or
    FileNotFoundError (and ModelSourceError) as `ftc run` would for the same spec."""
    model_dir, _ = read_model_config(spec.model.base)
    tok_dir = stages.tokenizer_dir(spec, model_dir if model_dir is not None else Path(spec.model.base))
    tokenizer = stages.load_tokenizer(tok_dir)
    if spec.data.format == "prompt":
        return _inspect_prompts(spec, tokenizer, str(tok_dir), n)
    options = stages.data_options(spec)
    shuffle, packing = options.pop("shuffle"), options.pop("packing")
    tokenized = datasets.tokenize_splits(**options, tokenizer=tokenizer)
    laid = datasets.lay_out(
        tokenized,
        format=spec.data.format,
        max_seq_len=spec.model.max_seq_len,
        packing=packing,
        shuffle=shuffle,
        seed=spec.training.seed,
    )
    fmt = formats.get(spec.data.format)
    names = tokenized.label_names
    shown = [ex for item in tokenized.train_items[:n] for ex in examples_of(item, fmt.layout, spec, tokenizer, names)]
    sides = [t for item in tokenized.train_items for t in _sides(item)]
    lengths = tuple(len(t.ids) for t in sides)
    checks = [
        _supervised_share(sides, fmt.layout),
        _cleaning(laid.stats, spec),
        *_end_of_turn(sides, tokenizer, fmt.layout),
        _double_bos(sides, tokenizer),
        _pad_is_eos(tokenizer),
        *_template_markers(tokenizer, spec.data.format),
    ]
    return Inspection(
        spec_path=spec.source,
        format=spec.data.format,
        layout=fmt.layout.name,
        tokenizer=str(tok_dir),
        max_seq_len=spec.model.max_seq_len,
        examples=tuple(shown),
        rendered=tuple(tokenizer.decode(list(ex.ids), skip_special_tokens=False) for ex in shown),
        checks=tuple(c for c in checks if c is not None),
        stats=laid.stats.to_dict(),
        lengths=lengths,
        packing=packing_effect(sides, spec.model.max_seq_len, fmt.layout, bool(packing)),
    )


def _inspect_prompts(spec, tokenizer, tok_dir: str, n: int) -> Inspection:
    """Prompt rows (GRPO) as the run reads them (rl.loop.prompt_data: its cleaning, and its refusals
    of a prompt with no room to generate or no answer a reward needs). Nothing of a prompt is
    trained: through the SFT pipeline every row was dropped as 'no_target', a misleading refusal."""
    from ftc.backends.jax.rl.loop import prompt_data, rl_keys

    data, k = prompt_data(spec, tokenizer), rl_keys(spec)
    sides = [
        Tokens(where, np.asarray(ids, np.int32), np.zeros(len(ids), np.float32))
        for where, ids in zip(data.where, data.ids)
    ]
    shown = [Example(t.where, tuple(map(int, t.ids)), pieces(tokenizer, t.ids), (0.0,) * len(t.ids)) for t in sides[:n]]
    st = data.stats
    dropped = ", ".join(f"{count} {why}" for why, count in st.dropped.items()) or "none"
    cleaning = f"prompt rows: {st.rows_read} kept as {st.prompts}; dropped: {dropped}"
    if st.bad_rows_skipped:
        cleaning += (
            f"; {st.bad_rows_skipped} malformed rows skipped (data.on_bad_row = 'skip'), first {st.bad_row_examples[0]}"
        )
    checks = [
        Check(
            "supervised",
            "info",
            f"{st.prompts:,} prompts ({st.with_answer:,} with an answer): nothing of a prompt is trained; "
            f"{k.objective.upper()} trains on completions sampled from them (up to {k.max_new_tokens} tokens)",
        ),
        Check("cleaning", "warn" if st.bad_rows_skipped else "ok", cleaning),
        _double_bos(sides, tokenizer),
        _pad_is_eos(tokenizer),
        *_template_markers(tokenizer, spec.data.format),
    ]
    tokens = sum(len(t.ids) for t in sides)
    return Inspection(
        spec_path=spec.source,
        format=spec.data.format,
        layout="rollout",
        tokenizer=tok_dir,
        max_seq_len=spec.model.max_seq_len,
        examples=tuple(shown),
        rendered=tuple(tokenizer.decode(list(ex.ids), skip_special_tokens=False) for ex in shown),
        checks=tuple(c for c in checks if c is not None),
        stats=st.to_dict(),
        lengths=tuple(len(t.ids) for t in sides),
        packing={
            "spec_packs": False,
            "can_pack": False,
            "sequences": len(sides),
            "unpacked_rows": len(sides),
            "unpacked_efficiency": tokens / max(1, len(sides) * spec.model.max_seq_len),
            "note": f"prompts are never packed: each is a row, with room for {k.max_new_tokens} sampled tokens",
        },
    )


def _sides(item) -> list:
    return [item.chosen, item.rejected] if isinstance(item, Pair) else [item]


def examples_of(item, layout: pack.Layout, spec, tokenizer, label_names) -> list[Example]:
    """The example(s) of one tokenised item, weighted as the train step sees them: the layout's
    row for this item alone (unpacked), whose `weights[t]` weighs predicting token t + 1."""
    row = layout.lay_out([item], spec.model.max_seq_len, False).arrays
    if isinstance(item, Labelled):
        label = label_names[item.label] if label_names else str(item.label)
        return [
            Example(item.where, tuple(map(int, item.ids)), pieces(tokenizer, item.ids), (0.0,) * len(item.ids), label)
        ]
    rows = [("", row)] if isinstance(item, Tokens) else [(" (chosen)", row["chosen"]), (" (rejected)", row["rejected"])]
    out = []
    for (suffix, arrays), side in zip(rows, _sides(item)):
        n = len(side.ids)
        targets, weights = arrays["targets"][0, : n - 1], arrays["weights"][0, : n - 1]
        if not np.array_equal(targets, side.ids[1:]):  # the layout's shift convention changed under us
            raise AssertionError(f"{item.where}: the layout's targets are not the example's next tokens")
        out.append(
            Example(
                item.where + suffix,
                tuple(map(int, side.ids)),
                pieces(tokenizer, side.ids),
                (0.0, *map(float, weights)),
            )
        )
    return out


def pieces(tokenizer, ids) -> tuple[str, ...]:
    """Each token's text, decoded in context so a character split over several byte-level tokens
    shows once (on its last token) instead of as replacement characters."""
    ids = [int(i) for i in ids]
    out = []
    for i in range(len(ids)):
        lo = max(0, i - 4)
        before = tokenizer.decode(ids[lo:i], skip_special_tokens=False) if i > lo else ""
        upto = tokenizer.decode(ids[lo : i + 1], skip_special_tokens=False)
        out.append(upto[len(before) :] if upto.startswith(before) else tokenizer.decode([ids[i]]))
    return tuple(out)


def packing_effect(sides, max_seq_len: int, layout: pack.Layout, packing: bool) -> dict:
    """Rows and the share of positions holding tokens, packed (first-fit, as the run packs) and one
    example per row; for layouts that cannot pack, only the latter."""
    need = [len(t.ids) - 1 if isinstance(t, Tokens) else len(t.ids) for t in sides]
    tokens = sum(need)
    out = {"spec_packs": packing and layout.packs, "can_pack": layout.packs, "sequences": len(need)}
    out["unpacked_rows"] = len(need)
    out["unpacked_efficiency"] = tokens / max(1, len(need) * max_seq_len)
    if layout.packs and need:
        rows = len(pack.first_fit(need, max_seq_len))
        out["packed_rows"] = rows
        out["packed_efficiency"] = tokens / (rows * max_seq_len)
    return out


# ------------------------------------------------------------------ checks


def _supervised_share(sides, layout) -> Check:
    if layout.name == "classification":
        return Check("supervised", "info", f"{len(sides)} examples, each trained on its label (no token targets)")
    targets = sum(len(t.ids) - 1 for t in sides)
    supervised = sum(int(np.count_nonzero(t.weights[1:])) for t in sides)
    share = supervised / max(1, targets)
    level = "warn" if share == 0 or share > 0.98 else "ok"
    return Check(
        "supervised",
        level,
        f"{share:.1%} of next-token targets are supervised ({supervised:,} of {targets:,} in {len(sides):,} "
        "sequences)" + ("; nothing is trained" if share == 0 else ""),
    )


def _cleaning(stats, spec) -> Check:
    c = stats.train_clean
    dropped = ", ".join(f"{n} {reason}" for reason, n in c.dropped if n) or "none"
    text = f"train rows: {c.seen} kept as {c.kept}; dropped: {dropped}"
    if c.truncated:
        text += (
            f"; {c.truncated} truncated to max_seq_len = {spec.model.max_seq_len} "
            f"(data.clean.overlong = {spec.data.clean.overlong!r}): their ends are not trained"
        )
    v = stats.validation_clean
    if v is not None:
        dropped = ", ".join(f"{n} {reason}" for reason, n in v.dropped if n) or "none"
        text += f"; validation rows ({stats.validation_from}): {v.seen} kept as {v.kept}; dropped: {dropped}"
        text += f", {v.truncated} truncated" if v.truncated else ""
    if c.split:
        text += (
            f"; {c.split} split into pieces of max_seq_len = {spec.model.max_seq_len} (data.clean.overlong = 'split')"
        )
    if stats.bad_rows_skipped:
        first = stats.bad_row_examples[0]
        text += f"; {stats.bad_rows_skipped} malformed rows skipped (data.on_bad_row = 'skip'), first {first}"
    truncated = c.truncated or (v is not None and v.truncated)
    return Check("cleaning", "warn" if truncated or stats.bad_rows_skipped else "ok", text)


def _end_ids(tokenizer) -> dict[int, str]:
    ids = {int(i): t for t, i in zip(tokenizer.all_special_tokens, tokenizer.all_special_ids)}
    for token in getattr(tokenizer, "added_tokens_decoder", {}).values():
        if getattr(token, "special", False):
            ids.setdefault(int(tokenizer.convert_tokens_to_ids(token.content)), token.content)
    return ids


def _end_of_turn(sides, tokenizer, layout) -> list[Check]:
    """Whether each supervised run of tokens ends with EOS or a special end-of-turn token: if not,
    the model is never taught to stop."""
    if layout.name == "classification":
        return []
    ends = _end_ids(tokenizer)
    runs = ended = 0
    seen: dict[str, int] = {}
    for t in sides:
        w = np.asarray(t.weights) > 0
        w[0] = False  # never a target
        edges = np.flatnonzero(w & ~np.append(w[1:], False))  # last token of each supervised run
        runs += len(edges)
        for i in edges:
            token = ends.get(int(t.ids[i]))
            if token is not None:
                ended += 1
                seen[token] = seen.get(token, 0) + 1
    if not runs:
        return []
    which = ", ".join(f"{tok} ({n})" for tok, n in seen.items())
    if ended == runs:
        return [Check("end of turn", "ok", f"every supervised span ({runs:,}) ends with a stop token: {which}")]
    return [
        Check(
            "end of turn",
            "warn",
            f"{runs - ended:,} of {runs:,} supervised spans do not end with EOS or an end-of-turn token"
            + (f" (the others end with {which})" if which else "")
            + ": the model may not learn to stop (truncated rows, or a template that puts the stop token "
            "outside the turn)",
        )
    ]


def _double_bos(sides, tokenizer) -> Check | None:
    bos = tokenizer.bos_token_id
    if bos is None:
        return Check("double BOS", "info", "the tokenizer has no BOS token")
    doubled = [t.where for t in sides if len(t.ids) > 1 and t.ids[0] == bos and t.ids[1] == bos]
    if doubled:
        return Check(
            "double BOS",
            "warn",
            f"{len(doubled)} sequences start with BOS twice (e.g. {doubled[0]}): the template writes one and the "
            "tokenizer adds another",
        )
    return Check("double BOS", "ok", f"no sequence starts with BOS ({tokenizer.bos_token}) twice")


def _pad_is_eos(tokenizer) -> Check:
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    if pad is not None and pad == eos:
        return Check(
            "pad == eos",
            "info",
            f"pad and EOS are the same token ({tokenizer.eos_token}, id {eos}); ftc masks padding by segment, "
            "not by token id, so EOS is still trained (see 'end of turn')",
        )
    return Check("pad == eos", "ok", f"pad ({tokenizer.pad_token}) and EOS ({tokenizer.eos_token}) differ")


def _template_markers(tokenizer, format: str) -> list[Check]:
    """Turn markers the chat template writes that the vocabulary does not hold as one token: they
    are trained as several ordinary pieces and the model may never produce them."""
    if format not in ("chat", "preference", "prompt") or not getattr(tokenizer, "chat_template", None):
        return []
    try:
        text = tokenizer.apply_chat_template(list(PROBE_CONVERSATION), tokenize=False)
    except Exception as e:  # a template that refuses the probe conversation: nothing to check here
        return [Check("template tokens", "info", f"not checked: the template refused a user/assistant pair ({e})")]
    markers = sorted(set(TEMPLATE_MARKER.findall(text)))
    split = [m for m in markers if len(tokenizer(m, add_special_tokens=False)["input_ids"]) != 1]
    if split:
        return [
            Check(
                "template tokens",
                "warn",
                f"the chat template writes {', '.join(split)}, not in the vocabulary as one token: add it as a "
                "special token (and resize the embeddings) or use a template of this tokenizer",
            )
        ]
    shown = ", ".join(markers) if markers else "none found"
    return [Check("template tokens", "ok", f"every marker the chat template writes is one token ({shown})")]
