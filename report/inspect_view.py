"""`ftc data inspect`'s output: the terminal text (ANSI colours, or brackets without a terminal)
and the self-contained HTML page, from an Inspection (backends/jax/data/inspect.py) as data."""

from __future__ import annotations

import html
import statistics
from typing import Any

from ftc.report import charts, page

OPEN, CLOSE = "⟦", "⟧"  # supervised spans when colours are off
LEVEL_STYLE = {"ok": dict(fg="green"), "warn": dict(fg="yellow", bold=True), "info": dict(fg="cyan")}


def _visible(piece: str) -> str:
    return piece.replace("\n", "↵\n").replace("\t", "→")


def _safe(piece: str) -> str:
    """Control characters of the data shown, not obeyed: an ESC sequence in a row recoloured or
    cleared the terminal instead of being seen (newlines and tabs are the text's own layout)."""
    return "".join(f"\\x{ord(c):02x}" if (ord(c) < 32 and c not in "\n\t") or ord(c) == 127 else c for c in piece)


def token_text(example, colour: bool) -> str:
    """The example's text with supervised tokens marked: a green background (alternating shade so
    token boundaries show) with colour, ⟦...⟧ around each supervised span without."""
    import click

    out = []
    inside = False
    for i, (piece, w) in enumerate(zip(example.pieces, example.weights)):
        piece = _safe(piece)
        trained = w > 0
        if colour:
            if trained:
                out.append(click.style(_visible(piece), fg="black", bg="green" if i % 2 else "bright_green"))
            else:
                out.append(click.style(piece, dim=True))
            continue
        if trained and not inside:
            out.append(OPEN)
        if not trained and inside:
            out.append(CLOSE)
        inside = trained
        out.append(piece)
    if inside and not colour:
        out.append(CLOSE)
    return "".join(out)


def length_summary(lengths) -> dict:
    if not lengths:
        return {}
    ordered = sorted(lengths)
    return {
        "min": ordered[0],
        "median": statistics.median(ordered),
        "p95": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))],
        "max": ordered[-1],
    }


def histogram_lines(lengths, max_seq_len: int, bins: int = 10, width: int = 40) -> list[str]:
    if not lengths:
        return []
    low, top = min(lengths), max(lengths)
    step = max(1, -(-(top - low + 1) // bins))
    counts = [0] * bins
    for n in lengths:
        counts[min(bins - 1, (n - low) // step)] += 1
    peak = max(counts)
    lines = []
    for b, count in enumerate(counts):
        lo, hi = low + b * step, low + b * step + step - 1
        if lo > top:
            break
        mark = "  <- max_seq_len" if lo <= max_seq_len <= hi else ""
        lines.append(f"  {lo:>6}-{hi:<6} {'#' * round(width * count / peak):<{width}} {count}{mark}")
    return lines


def packing_line(p: dict, max_seq_len: int) -> str:
    unpacked = f"one per row: {p['unpacked_rows']:,} rows ({p['unpacked_efficiency']:.1%} of positions hold tokens)"
    head = f"{p['sequences']:,} sequences of up to {max_seq_len} tokens"
    if "note" in p:  # prompts (GRPO): rows are prompts plus what is sampled from them
        return f"{head}: {p['note']}"
    if "packed_rows" not in p:
        return f"{head}: {unpacked}; this format is never packed"
    gain = p["unpacked_rows"] / max(1, p["packed_rows"])
    now = "the spec packs" if p["spec_packs"] else "the spec does not pack (data.packing = true to pack)"
    more = f": {gain:.1f}x fewer rows, so fewer steps per epoch" if gain >= 1.05 else ": little to gain"
    return f"{head}: packed, {p['packed_rows']:,} rows ({p['packed_efficiency']:.1%} full); {unpacked}{more}; {now}"


def terminal(ins, *, colour: bool) -> str:
    import click

    lines = [
        f"data: {ins.format} ({ins.layout} batches), tokenizer {ins.tokenizer}, max_seq_len {ins.max_seq_len}",
        "",
        f"examples: the first {len(ins.examples)} training sequences in reading order; "
        + (
            "supervised tokens (what the train step weights) in green"
            if colour
            else f"supervised tokens in {OPEN}{CLOSE}"
        ),
    ]
    for ex in ins.examples:
        head = f"── {ex.where} · {len(ex.ids)} tokens, {ex.supervised} supervised" + (
            f" · label {ex.label!r}" if ex.label else ""
        )
        lines += ["", click.style(head, bold=True) if colour else head, token_text(ex, colour)]
    s = length_summary(ins.lengths)
    lines += [
        "",
        f"lengths (tokens per sequence): min {s.get('min')}, median {s.get('median')}, "
        f"p95 {s.get('p95')}, max {s.get('max')}",
    ]
    lines += histogram_lines(ins.lengths, ins.max_seq_len)
    lines += ["", "packing: " + packing_line(ins.packing, ins.max_seq_len), "", "checks:"]
    for c in ins.checks:
        level = click.style(f"{c.level:<5}", **LEVEL_STYLE.get(c.level, {})) if colour else f"{c.level:<5}"
        lines.append(f"  {level} {c.name:<16} {c.message}")
    return "\n".join(lines)


# ------------------------------------------------------------------ HTML

CSS = """
.tok{white-space:pre-wrap;font:12.5px/1.7 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;background:#fafbfc;
border:1px solid #d0d7de;border-radius:6px;padding:8px;word-break:break-all}
.tok span{border-radius:2px}.tok .u{color:#6e7781}.tok .u.o{background:#eef1f4}
.tok .s{background:#aceebb;color:#0a3d1a}.tok .s.o{background:#7ee2a0}
.lvl-ok{color:#1a7f37;font-weight:600}.lvl-warn{color:#9a6700;font-weight:700}.lvl-info{color:#0969da;font-weight:600}
"""


def _token_spans(ex) -> str:
    out = []
    for i, (tid, piece, w) in enumerate(zip(ex.ids, ex.pieces, ex.weights)):
        cls = ("s" if w > 0 else "u") + (" o" if i % 2 else "")
        shown = html.escape(piece.replace("\n", "↵\n") if w > 0 else piece)
        out.append(f'<span class="{cls}" title="token {i}: id {tid}, weight {w:g}">{shown}</span>')
    return "".join(out)


def html_page(ins) -> str:
    e = page.esc
    checks = page.table(
        ("check", "", "finding"),
        [(e(c.name), f'<span class="lvl-{e(c.level)}">{e(c.level)}</span>', e(c.message)) for c in ins.checks],
    )
    s = length_summary(ins.lengths)
    hist = charts.length_histogram(ins.lengths, ins.max_seq_len) if ins.lengths else None
    figure = (
        f'<div class=grid><figure class="chart" data-chart="lengths"><img alt="Tokens per example" '
        f'src="{page.data_uri(hist)}"></figure></div>'
        if hist
        else ""
    )
    examples = []
    for ex, text in zip(ins.examples, ins.rendered):
        label = f" · label <b>{e(ex.label)}</b>" if ex.label else ""
        examples.append(
            f"<h3>{e(ex.where)}</h3><p class=muted>{len(ex.ids)} tokens, {ex.supervised} supervised{label}</p>"
            f'<div class="tok">{_token_spans(ex)}</div>'
            f"<details><summary>as the template rendered it</summary><pre>{e(text)}</pre></details>"
        )
    stats: dict[str, Any] = {k: v for k, v in ins.stats.items() if k != "bad_row_examples"}
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f"<title>ftc data inspect: {e(ins.spec_path)}</title>"
        f"<style>{page.CSS}{CSS}</style></head><body><header><h1>ftc data inspect</h1><p>{e(ins.spec_path)} · "
        f"{e(ins.format)} · tokenizer {e(ins.tokenizer)} · max_seq_len {ins.max_seq_len}</p></header><main>"
        f"<h2>Checks</h2>{checks}"
        f"<h2>Lengths</h2><p>min {s.get('min')}, median {s.get('median')}, p95 {s.get('p95')}, max {s.get('max')} "
        f"tokens over {len(ins.lengths):,} sequences</p>{figure}"
        f"<h2>Packing</h2><p>{e(packing_line(ins.packing, ins.max_seq_len))}</p>"
        f"<h2>Examples</h2><p>The first {len(ins.examples)} training sequences in reading order. "
        '<span class="tok" style="padding:1px 4px"><span class="s">green</span></span>: tokens the train step '
        "weights (predicted from the tokens before them); grey: context only. Hover a token for its id and weight.</p>"
        f"{''.join(examples)}<h2>Data statistics</h2>{page.key_values(stats)}</main></body></html>\n"
    )
