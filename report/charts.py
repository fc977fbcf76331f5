"""Which charts a report draws, and drawing them (matplotlib, Agg: no display needed).

Every numeric metric in metrics.jsonl gets a chart. Known metrics are grouped and titled by the
GROUPS table (one chart may hold several metrics: memory, chosen vs rejected rewards); any other
metric (a new objective's, say) gets its own chart in "Other metrics", titled by its name.
Train and validation of a metric share a chart (validation dashed, with markers); several runs
share every chart, one colour per run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import math
import re
from collections.abc import Sequence

from ftc.report.rundir import Run, number


@dataclasses.dataclass(frozen=True)
class Group:
    key: str  # the PNG's file name
    title: str
    metrics: tuple[str, ...]
    section: str
    unit: str = ""  # y-axis label
    scale: float = 1.0  # values are multiplied by this (bytes -> GiB)
    log_y: bool = False  # when every value is positive and they span over two decades


LOSS, PREFERENCE, RL, OPTIMISER, SPEED, BATCH, OTHER = (
    "Loss and accuracy",
    "Preference (DPO)",
    "Reinforcement learning",
    "Optimiser",
    "Throughput and memory",
    "Batch contents",
    "Other metrics",
)
SECTIONS = (LOSS, PREFERENCE, RL, OPTIMISER, SPEED, BATCH, OTHER)
GIB = 1 / 2**30

GROUPS = (
    Group("loss", "Loss", ("loss",), LOSS, "loss per supervised token", log_y=True),
    Group("perplexity", "Perplexity", ("perplexity",), LOSS, "exp(loss)", log_y=True),
    Group("token_accuracy", "Token accuracy", ("token_accuracy",), LOSS, "share of targets predicted"),
    Group("reward_accuracy", "Reward accuracy", ("reward_accuracy",), PREFERENCE, "share of pairs, chosen > rejected"),
    Group("reward_margin", "Reward margin", ("reward_margin",), PREFERENCE, "chosen - rejected reward"),
    Group(
        "rewards", "Rewards: chosen and rejected", ("chosen_reward", "rejected_reward"), PREFERENCE, "implicit reward"
    ),
    Group("logps", "Log-probabilities: chosen and rejected", ("chosen_logp", "rejected_logp"), PREFERENCE, "log p"),
    Group("reward", "Reward", ("reward", "reward_mean", "reward_std"), RL, "reward"),
    Group("kl", "KL to the reference policy", ("kl",), RL, "KL"),
    Group("clip_ratio", "Clipped ratio", ("clip_ratio", "clip_fraction"), RL, "share of tokens"),
    Group("entropy", "Entropy", ("entropy",), RL, "nats per token"),
    Group("completion_length", "Completion length", ("completion_length",), RL, "tokens"),
    Group("learning_rate", "Learning rate", ("learning_rate",), OPTIMISER, "learning rate"),
    Group("grad_norm", "Gradient norm", ("grad_norm",), OPTIMISER, "global L2 norm", log_y=True),
    Group("tokens_per_second", "Tokens per second", ("tokens_per_second",), SPEED, "tokens/s"),
    Group("mfu", "Model FLOPs utilisation", ("mfu",), SPEED, "share of peak"),
    Group(
        "memory",
        "Memory",
        ("memory_peak_bytes", "memory_bytes", "host_memory_peak_bytes", "host_memory_bytes"),
        SPEED,
        "GiB",
        scale=GIB,
    ),
    Group("tokens", "Tokens per step", ("tokens",), BATCH, "non-padding tokens"),
    Group("loss_weight", "Supervised tokens per step", ("loss_weight",), BATCH, "loss weight"),
    Group("pairs", "Preference pairs per step", ("pairs",), BATCH, "pairs"),
)
_KNOWN = {m: g for g in GROUPS for m in g.metrics}
LABELS = {
    "memory_peak_bytes": "device peak",
    "memory_bytes": "device",
    "host_memory_peak_bytes": "host peak",
    "host_memory_bytes": "host",
}


@dataclasses.dataclass(frozen=True)
class Series:
    run: str
    split: str
    metric: str
    points: tuple[tuple[int, float], ...]
    colour: str = ""  # set when drawn: what the chart shows this series in

    @property
    def label(self) -> str:
        return LABELS.get(self.metric, self.metric.replace("_", " "))


@dataclasses.dataclass(frozen=True)
class Chart:
    group: Group
    series: tuple[Series, ...]
    png: bytes = b""


def plan_charts(runs: Sequence[Run]) -> list[Chart]:
    """The charts for these runs, in GROUPS order then unknown metrics by name (no drawing)."""
    metrics = list(dict.fromkeys(m for run in runs for (_, m), points in run.series.items() if points))
    groups = [g for g in GROUPS if any(m in metrics for m in g.metrics)]
    groups += [
        Group(_other_key(m), m.replace("_", " ").replace("/", " / ").capitalize(), (m,), OTHER)
        for m in metrics
        if m not in _KNOWN
    ]
    charts = []
    for g in groups:
        series = [
            Series(run.name, split, metric, run.series[(split, metric)])
            for run in runs
            for metric in g.metrics
            for split in sorted(run.splits, key=lambda x: (x != "train", x != "validation"))
            if run.series.get((split, metric))
        ]
        charts.append(Chart(g, tuple(series)))
    return charts


_RESERVED = {g.key for g in GROUPS} | {"probe"}  # PNG names of the known charts and the probe's bars


def _other_key(metric: str) -> str:
    """An unknown metric's PNG name: one named like a known chart ("memory", "reward", "probe")
    overwrote that chart's PNG and repeated its id on the page."""
    key = _file_key(metric)
    return f"{key}-metric" if key in _RESERVED else key


def _file_key(metric: str) -> str:
    """A PNG file name for a metric: TRL-style names hold "/" (clip_ratio/high_mean, rewards/numeric/mean),
    which would name a folder. The metric is kept whole for a distinct name (a/b and a_b differ)."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", metric)
    return safe if safe == metric else f"{safe}-{hashlib.sha1(metric.encode()).hexdigest()[:6]}"


# ------------------------------------------------------------------ drawing

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22")
LEGEND_INSIDE = 8  # more entries than this go beside the axes (inside, 20 runs' entries hid every line)


def run_colours(count: int) -> tuple[str, ...]:
    """One colour per run, all distinct: the palette, and past its 9 colours evenly spaced hues (the
    palette repeated gave runs 1 and 10 one colour)."""
    if count <= len(PALETTE):
        return PALETTE[:count]
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    turbo = colormaps["turbo"]
    return tuple(to_hex(turbo(0.05 + 0.9 * i / (count - 1))) for i in range(count))


SPLIT_STYLE = {"train": dict(linestyle="-", marker=None), "validation": dict(linestyle="--", marker="o")}


METRIC_MARKERS = (None, "^", "s", "x")  # several runs: a chart's 2nd, 3rd... metric of one run


# Past this no metric of a run comes (float32 ends at 3.4e38); matplotlib's axis arithmetic
# overflows near float64's end (+-1e308: "arange: cannot compute length"), so such values are gaps.
DRAWABLE = 1e200


def _drawable(y: float) -> float:
    return y if abs(y) <= DRAWABLE else math.nan


def plain(text: str) -> str:
    """`text` as matplotlib shows it literally: a run or metric name holding two "$" ("cost $5 to $10")
    is otherwise parsed as mathtext (and one that does not parse fails the whole report), and a
    legend label starting with "_" is left out of the legend."""
    text = text.replace("$", r"\$")
    return " " + text if text.startswith("_") else text


def draw(chart: Chart, runs: Sequence[str] = (), *, width: float = 6.4, height: float = 3.3, dpi: int = 100) -> Chart:
    """The chart with its PNG, and each series with the colour it is drawn in. With several `runs`
    (their names, in order) each run keeps one colour on every chart and the line style tells
    the split; with one, each metric and split has its own colour."""
    from matplotlib.figure import Figure  # not pyplot: no global state, safe beside a training loop

    several = len(runs) > 1
    colours = dict(zip(runs, run_colours(len(runs))))
    beside = len(chart.series) > LEGEND_INSIDE
    columns = -(-len(chart.series) // 16)
    # The legend beside the axes widens the figure by its own width, so the plot keeps its size.
    fig = Figure(figsize=(width + (1.9 * columns if beside else 0), height), dpi=dpi)
    ax = fig.add_subplot()
    drawn = []
    values = []
    metrics = chart.group.metrics
    for s in chart.series:
        if several:
            colour = colours.get(s.run, PALETTE[-1])
        else:  # train and validation of a metric side by side in the palette: blue / red, green / orange...
            present = [m for m in metrics if any(x.metric == m for x in chart.series)]
            colour = PALETTE[(2 * present.index(s.metric) + (s.split != "train")) % len(PALETTE)]
        xs = [p[0] for p in s.points]
        ys = [_drawable(p[1] * chart.group.scale) for p in s.points]
        values += [y for y in ys if math.isfinite(y)]
        style = dict(SPLIT_STYLE.get(s.split, dict(linestyle=":", marker="s")))
        if several and s.metric in metrics and metrics.index(s.metric) > 0:
            style["marker"] = METRIC_MARKERS[metrics.index(s.metric) % len(METRIC_MARKERS)]
        if len(xs) == 1:
            style["marker"] = style["marker"] or "o"  # a single point still shows
        parts = ([s.run] if several else []) + [s.split] + ([s.label] if len(metrics) > 1 else [])
        ax.plot(xs, ys, color=colour, linewidth=1.8, markersize=4, label=plain(" · ".join(parts)), **style)
        drawn.append(dataclasses.replace(s, colour=colour))
    if chart.group.log_y and values and min(values) > 0 and max(values) / min(values) > 100:
        ax.set_yscale("log")
    ax.set_title(plain(chart.group.title), fontsize=11)
    ax.set_xlabel("step", fontsize=9)
    ax.set_ylabel(chart.group.unit, fontsize=9)
    ax.tick_params(labelsize=8)
    ax.grid(True, alpha=0.3)
    if beside:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), ncols=columns, frameon=False)
    elif chart.series:
        ax.legend(fontsize=8, loc="best", frameon=False)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return Chart(chart.group, tuple(drawn), buf.getvalue())


def _share(value) -> float:
    """A bar's height on the 0..1 axis; anything else (NaN, 1e308, a string) is no bar (the table
    beside it shows the value as written); NaN and huge ones made matplotlib warn on stderr."""
    x = number(value) if not isinstance(value, str) else None
    return min(1.0, max(0.0, x)) if x is not None and math.isfinite(x) else 0.0


def draw_probe(runs: Sequence[Run], *, dpi: int = 100) -> bytes | None:
    """Accuracy and macro-F1 of each probe run's splits beside the majority-label baseline."""
    rows = []
    for run in runs:
        for split in ("train", "validation"):
            m = (run.probe or {}).get(split)
            if isinstance(m, dict) and all(isinstance(m.get(k), (int, float)) for k in ("accuracy", "macro_f1")):
                rows.append((run.name if len(runs) > 1 else "", split, m))
    if not rows:
        return None
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 3.3), dpi=dpi)
    axes = fig.subplots(1, 2)
    labels = [plain(" ".join(x for x in (name, split) if x)) for name, split, _ in rows]
    for ax, key, title in zip(axes, ("accuracy", "macro_f1"), ("Probe accuracy", "Probe macro-F1")):
        at = range(len(rows))
        ax.bar([i - 0.2 for i in at], [_share(m[key]) for _, _, m in rows], width=0.4, color=PALETTE[0], label="probe")
        ax.bar(
            [i + 0.2 for i in at],
            [_share(m.get(f"majority_{key}")) for _, _, m in rows],
            width=0.4,
            color="#999999",
            label="majority label",
        )
        ax.set_xticks(list(at), labels, fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_title(title, fontsize=11)
        ax.tick_params(labelsize=8)
        ax.grid(True, axis="y", alpha=0.3)
    axes[0].legend(fontsize=8, frameon=False, loc="lower left")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def length_histogram(lengths: Sequence[int], max_seq_len: int, *, dpi: int = 100) -> bytes:
    """Tokens per example, with the row length marked (ftc data inspect)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 3.0), dpi=dpi)
    ax = fig.add_subplot()
    ax.hist(list(lengths), bins=min(50, max(5, len(set(lengths)))), color=PALETTE[0])
    ax.axvline(max_seq_len, color=PALETTE[1], linestyle="--", label=f"max_seq_len {max_seq_len}")
    ax.set_title("Tokens per example", fontsize=11)
    ax.set_xlabel("tokens", fontsize=9)
    ax.set_ylabel("examples", fontsize=9)
    ax.legend(fontsize=8, frameon=False)
    ax.tick_params(labelsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
