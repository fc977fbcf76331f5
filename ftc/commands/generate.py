"""`ftc generate SOURCE --prompt TEXT` (streamed) or `--file prompts.jsonl --out completions.jsonl`."""

import click

from ftc.commands.sampling_options import generate_config, sampling_options


@click.command(short_help="Generate text from a run, an export or a model.")
@click.argument("source")
@click.option("--prompt", default=None, help="One prompt; its completion is streamed to the terminal.")
@click.option(
    "--file",
    "prompt_file",
    default=None,
    type=click.Path(dir_okay=False),
    help='A JSONL file of prompts: {"messages": [...]} (OpenAI chat rows) or {"prompt": "..."}.',
)
@click.option(
    "--out",
    default=None,
    type=click.Path(dir_okay=False),
    help="With --file: where to write the rows with their completions (JSONL, written whole or not at all).",
)
@click.option("--raw", is_flag=True, help="Give the prompt to the model as plain text, without the chat template.")
@click.option("--system", default=None, help="A system message before the prompt (chat models).")
@click.option(
    "--batch-size", type=click.IntRange(min=1), default=8, show_default=True, help="With --file: prompts per batch."
)
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@sampling_options()
def generate(
    source,
    prompt,
    prompt_file,
    out,
    raw,
    system,
    batch_size,
    force,
    max_new_tokens,
    temperature,
    top_k,
    top_p,
    min_p,
    seed,
    stops,
    dtype,
):
    """Generate from SOURCE: one --prompt, streamed to the terminal, or every row of a --file into
    --out. A chat model's prompts go through its chat template unless --raw. Generation ends at the
    model's EOS ids, at a --stop text, or after --max-new-tokens.

    \b
      ftc generate runs/bot --prompt "What is your favorite book?"
      ftc generate runs/bot --file prompts.jsonl --out out.jsonl --temperature 0.7

    SOURCE is a run directory (its latest checkpoint: LoRA, QLoRA and adapters run unmerged), an
    export (hf, peft or adapters), or any model.base source: an HF directory, an HF id in the local
    cache, a .gguf file, package:NAME/path. Exit status: 0 done, 1 bad source or prompts, 2 usage.
    """
    if (prompt is None) == (prompt_file is None):
        raise click.UsageError("give exactly one of --prompt TEXT or --file PROMPTS.jsonl")
    if prompt_file is not None and out is None:
        raise click.UsageError("--file needs --out COMPLETIONS.jsonl")
    if out is not None and prompt_file is None:
        raise click.UsageError("--out goes with --file")
    if system is not None and raw:
        raise click.UsageError("--system is a chat message, written by the chat template that --raw leaves out")
    import os

    if prompt is not None and not prompt.strip():
        click.echo("error: --prompt is empty: give the text to complete", err=True)
        raise SystemExit(1)
    if out is not None and os.path.exists(out) and os.path.exists(prompt_file) and os.path.samefile(out, prompt_file):
        raise click.UsageError(f"--out {out} is the --file it reads: write the completions elsewhere")
    if out is not None and os.path.exists(out) and not force:
        raise click.UsageError(f"{out} exists; pass --force to replace it")
    if out is not None:
        from ftc.commands.out_path import unwritable_file_problem

        problem = unwritable_file_problem(out)
        if problem:  # before the model loads: found now, not after every prompt is generated
            click.echo(f"error: --out {out}: {problem}", err=True)
            raise SystemExit(1)
    from ftc.commands.loading import load_or_exit

    rows = None
    if prompt_file is not None:
        from ftc.backends.jax.data.read import DataError
        from ftc.backends.jax.generate.prompt_rows import read_prompt_rows

        try:
            rows = read_prompt_rows(prompt_file)  # before the model loads: a bad file fails fast
        except DataError as e:
            click.echo(f"error: {e}", err=True)
            raise SystemExit(1) from None
    src = load_or_exit(source, dtype)
    from ftc.backends.jax.data.read import DataError
    from ftc.backends.jax.generate import session
    from ftc.backends.jax.generate.text import StopStrings, TemplateError

    config = generate_config(src, max_new_tokens, temperature, top_k, top_p, min_p)
    sampler = src.sampler()
    stop = StopStrings(src.tokenizer, stops)
    if rows is None:
        import jax

        try:
            ids = session.prompt_ids(src, prompt, raw=raw, system=system)
            problem = session.prompt_problem("--prompt", ids, src.context)
        except TemplateError as e:
            problem = f"--prompt: {e}"
        if problem:
            click.echo(f"error: {problem}", err=True)
            raise SystemExit(1)
        result = session.stream_one(
            src, sampler, src.params, ids, jax.random.key(seed), config, stop, lambda t: click.echo(t, nl=False)
        )
        click.echo()
        click.echo(result.summary(), err=True)
        return
    try:
        completed = session.complete_rows(
            src, sampler, src.params, rows, seed, config, stop, raw=raw, system=system, batch_size=batch_size
        )
    except DataError as e:
        click.echo(f"error: {e}", err=True)
        raise SystemExit(1) from None
    import json

    from ftc.backends.jax.state.files import write_text_atomic

    write_text_atomic(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in completed))
    click.echo(f"wrote {len(completed)} completions to {out}", err=True)
