"""`ftc eval SOURCE --data FILE`: loss, perplexity, token accuracy and generation metrics."""

import click

from ftc.commands.sampling_options import generate_config, sampling_options


@click.command(name="eval", short_help="Score a run, an export or a model on data.")
@click.argument("source")
@click.option(
    "--data",
    "data",
    required=True,
    type=click.Path(dir_okay=False),
    help="A JSONL file of chat, completion or text rows.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["chat", "completion", "text"]),
    default=None,
    help="The rows' format (default: from the first row's keys).",
)
@click.option(
    "--out",
    default=None,
    type=click.Path(dir_okay=False),
    help="Write the report (metrics and every generated sample) here as JSON.",
)
@click.option(
    "--regex",
    default=None,
    help="Also score completions by this regular expression (a group must capture the reference). "
    "Default: the run's eval.regex.",
)
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    default=None,
    help="Generate for at most this many rows with a reference (default: all).",
)
@click.option("--no-generate", is_flag=True, help="Loss, perplexity and token accuracy only.")
@click.option(
    "--max-seq-len",
    type=click.IntRange(min=2),
    default=None,
    help="Truncate rows to this many tokens (default: the run's model.max_seq_len, else min(context, 2048)).",
)
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True, help="Rows per batch.")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@sampling_options(default_max_new_tokens=128)
def eval_command(source, data, fmt, out, regex, limit, no_generate, max_seq_len, batch_size, force,
                 max_new_tokens, temperature, top_k, top_p, min_p, seed, stops, dtype):  # fmt: skip
    """Score SOURCE on the rows of --data: loss, perplexity and token accuracy over the tokens
    training would supervise, and, for chat rows ending in an assistant answer and completion
    rows, generation metrics against that reference: exact match (normalised), contains,
    ROUGE-L, and --regex. Prints a table; --out writes the report with every sample as JSON.

    \b
      ftc eval runs/bot --data data/valid.jsonl --out eval.json
      ftc eval runs/bot --data qa.jsonl --regex "answer: (\\d+)" --max-new-tokens 8

    SOURCE is what `ftc generate` takes. Exit status: 0 done, 1 bad source or data, 2 usage.
    """
    import os

    if out is not None and os.path.isdir(out):
        raise click.UsageError(f"--out {out} is a directory")
    if out is not None and os.path.exists(data) and os.path.exists(out) and os.path.samefile(out, data):
        raise click.UsageError(f"--out {out} is the --data file: the report would replace the data")
    if out is not None and os.path.exists(out) and not force:
        raise click.UsageError(f"{out} exists; pass --force to replace it")
    if not os.path.isfile(data):
        click.echo(f"error: --data {data}: no such file", err=True)
        raise SystemExit(1)
    if out is not None:
        from ftc.commands.out_path import unwritable_file_problem

        problem = unwritable_file_problem(out)
        if problem:  # before the model loads: found now, not after the whole evaluation
            click.echo(f"error: --out {out}: {problem}", err=True)
            raise SystemExit(1)
    from ftc.commands.loading import load_or_exit

    src = load_or_exit(source, dtype)
    from ftc.backends.jax.data.read import DataError
    from ftc.backends.jax.generate.evaluate import evaluate
    from ftc.backends.jax.generate.text import TemplateError

    try:
        report = evaluate(
            src,
            data,
            generate_config(src, max_new_tokens, temperature, top_k, top_p, min_p),
            format=fmt,
            max_seq_len=max_seq_len,
            seed=seed,
            regex=regex,
            stops=stops,
            limit=limit,
            batch_size=batch_size,
            generate=not no_generate,
        )
    except (DataError, TemplateError, ValueError) as e:
        click.echo(f"error: {e}", err=True)
        raise SystemExit(1) from None
    click.echo(report.table())
    if out is not None:
        from ftc.backends.jax.state.files import write_json_atomic

        write_json_atomic(out, report.to_dict())
        click.echo(f"wrote {out}", err=True)
