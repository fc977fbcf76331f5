"""`ftc report`, `ftc diff` and `ftc data inspect`: look at runs and data instead of reading them.

`register(main)` adds them to the CLI group (ftc/cli.py). `ftc report` and `ftc diff` import no
jax; `ftc data inspect` runs the data pipeline (and the tokenizer) but uses no accelerator.
"""

from __future__ import annotations

import os

import click


def _fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    raise SystemExit(1)


@click.command(short_help="Write an HTML report (and PNG charts) of one or more runs.")
@click.argument("run_dirs", metavar="RUN_DIR...", nargs=-1, required=True)
@click.option(
    "--out",
    default=None,
    metavar="FILE.html",
    help="HTML file to write (default: RUN_DIR/report.html for one run, ./report.html for several). "
    "Its charts are also written as PNGs into FILE_charts/ beside it.",
)
def report(run_dirs, out):
    """Write one self-contained HTML file (no network needed: charts are embedded) for the runs in
    RUN_DIR...: loss, perplexity, token accuracy, learning rate, gradient norm, tokens/s, MFU and
    memory, every other logged metric (DPO rewards and margins, ...), probe metrics against the
    majority-label baseline, sample generations, and each run's resolved spec, data statistics
    and plan. Several runs are overlaid, with a table of the spec keys in which they differ.

    `ftc run` keeps RUN_DIR/report.html up to date (at the first logged metrics, then at most once
    a minute, and at the end; logging.report = false turns it off). Open it in a browser: it
    reloads itself while the run goes on.

    \b
      ftc report runs/quickstart            # -> runs/quickstart/report.html
      ftc report runs/lr-1e-4 runs/lr-3e-4 --out compare.html
    """
    from ftc.report import ReportError, default_out, distinct, write_report

    try:
        written = write_report(run_dirs, out)
    except ReportError as e:
        _fail(str(e))
    except OSError as e:
        # the path the user chose, not the hidden staging directory the report is written into first
        where = os.path.abspath(out or default_out(distinct(run_dirs)))
        _fail(f"{where}: could not write the report ({e.strerror or e})")

    pngs = written.pngs
    click.echo(f"wrote {written.html}" + (f" and {len(pngs)} PNG charts in {os.path.dirname(pngs[0])}" if pngs else ""))


@click.command(short_help="Show the spec keys in which two specs or runs differ.")
@click.argument("a", metavar="A")
@click.argument("b", metavar="B")
@click.option("--json", "as_json", is_flag=True, help='Print {"key": [a, b], ...} as JSON (absent: null).')
def diff(a, b, as_json):
    """Compare the resolved specs of A and B, each a spec file (resolved as `ftc run` would: extends,
    overrides and defaults applied, paths absolute) or a run directory (its spec.resolved.json:
    what ran). Prints only the keys that differ. Exit status 0 (also when they differ); 1 when A
    or B is neither a spec nor a run.

    \b
      ftc diff examples/quickstart.toml examples/lora.toml
      ftc diff runs/lr-1e-4 runs/lr-3e-4 --json
    """
    import json

    from ftc.report import ReportError
    from ftc.report import diff as diff_lib

    try:
        specs = [diff_lib.resolved_spec(a), diff_lib.resolved_spec(b)]
    except ReportError as e:
        _fail(str(e))
    rows = diff_lib.differing(specs)
    if as_json:
        absent = lambda v: None if v is diff_lib.ABSENT else v
        click.echo(json.dumps({k: [absent(x) for x in values] for k, values in rows}, indent=2))
    elif not rows:
        click.echo("the resolved specs are the same")
    else:
        click.echo(diff_lib.format_table([a, b], rows))


@click.group(short_help="Look at a spec's training data.")
def data():
    """A spec's training data, as the run will see it."""


@data.command("inspect", short_help="Show the tokens a spec trains on, and the usual data mistakes.")
@click.argument("spec_path", metavar="SPEC", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a spec key (typed by the schema)."
)
@click.option("--n", "count", default=20, show_default=True, type=click.IntRange(min=0), help="Examples to show.")
@click.option(
    "--html", "html_out", default=None, metavar="FILE.html", help="Also write the inspection as an HTML page."
)
@click.option("--color/--no-color", default=None, help="Colour the terminal output (default: when it is a terminal).")
def inspect(spec_path, overrides, count, html_out, color):
    """What SPEC's model will be trained on, before any accelerator is used: the first examples'
    tokens with the supervised ones (the targets the train step weights, taken from the data
    pipeline's own batches) highlighted, the chat template as rendered, and the checks people get
    wrong: share of supervised tokens, rows truncated or dropped and why, EOS / end-of-turn
    supervised or not, double BOS, pad == eos, template tokens missing from the vocabulary; a
    length histogram and what packing achieves. Without colours, supervised spans are ⟦bracketed⟧.
    A GRPO spec's prompts are shown as its run reads them (nothing of a prompt is trained).

    \b
      ftc data inspect examples/quickstart.toml --n 5 --html inspect.html
    """
    import sys

    from ftc.report import out_problem
    from ftc.spec import SpecError, load_spec

    # Before the data pipeline runs: a bad --html then costs nothing, and a data file is never overwritten.
    problem = out_problem(html_out, "--html", charts=False) if html_out is not None else None
    if problem:
        _fail(problem)
    try:
        spec = load_spec(spec_path, overrides)
    except SpecError as e:
        click.echo(str(e), err=True)
        raise SystemExit(1) from None
    from ftc.backends.jax.data.inspect import inspect_spec
    from ftc.backends.jax.data.read import DataError
    from ftc.backends.jax.io.model_source import ModelSourceError
    from ftc.report import inspect_view

    try:
        ins = inspect_spec(spec, n=count)
    except (DataError, ModelSourceError, FileNotFoundError, ValueError, OSError) as e:
        _fail(f"{spec_path}: {e}")
    colour = sys.stdout.isatty() if color is None else color
    click.echo(inspect_view.terminal(ins, colour=colour), color=colour)
    if html_out:
        from ftc.backends.jax.state.files import write_text_atomic

        try:
            os.makedirs(os.path.dirname(os.path.abspath(html_out)), exist_ok=True)
            write_text_atomic(html_out, inspect_view.html_page(ins))
        except OSError as e:
            _fail(f"{html_out}: could not write ({e.strerror or e})")
        click.echo(f"wrote {html_out}")


def register(group: click.Group) -> None:
    for command in (report, diff, data):
        group.add_command(command)
