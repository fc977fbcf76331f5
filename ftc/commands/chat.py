"""`ftc chat SOURCE`: an interactive multi-turn chat in the terminal (plain stdin/stdout, so it
works over ssh and in pipes)."""

import sys

import click

from ftc.commands.sampling_options import generate_config, sampling_options

HELP_LINE = "type a message; /reset clears the history, /exit (or Ctrl-D) quits"


@click.command(short_help="Chat with a run, an export or a model in the terminal.")
@click.argument("source")
@click.option("--system", default=None, help="A system message at the start of the conversation.")
@sampling_options(default_max_new_tokens=512)
def chat(source, system, max_new_tokens, temperature, top_k, top_p, min_p, seed, stops, dtype):
    """Chat with SOURCE turn by turn; the history is kept and sent through the model's chat
    template, the reply is streamed as it is generated. /reset clears the history, /exit or
    Ctrl-D ends the chat. The oldest turns are dropped when the history outgrows the model's context.

    \b
      ftc chat runs/quickstart
      ftc chat runs/bot --temperature 0.7 --top-p 0.9 --system "Answer briefly."

    SOURCE is what `ftc generate` takes: a run directory, an export, or a model source.
    """
    from ftc.commands.loading import load_or_exit

    src = load_or_exit(source, dtype)
    if not src.is_chat:
        click.echo(
            f"error: {source} has no chat template in its tokenizer; use `ftc generate {source} --prompt TEXT --raw`",
            err=True,
        )
        raise SystemExit(1)
    try:
        import readline  # noqa: F401 - line editing and history for input() where available
    except ImportError:
        pass
    from ftc.backends.jax.generate import session
    from ftc.backends.jax.generate.text import StopStrings, TemplateError

    if system:
        try:  # a template that refuses a system message (Gemma's) would refuse every turn
            session.prompt_ids(
                src, [{"role": "system", "content": system}, {"role": "user", "content": "hi"}], raw=False
            )
        except TemplateError as e:
            click.echo(f"error: --system: {e}", err=True)
            raise SystemExit(1) from None

    interactive = sys.stdin.isatty()
    click.echo(HELP_LINE, err=True)

    def lines():
        while True:
            try:
                yield input("you> " if interactive else "")
            except EOFError:
                return

    def write(text):
        click.echo(text, nl=False)

    session.chat(
        src,
        src.sampler(),
        src.params,
        lines(),
        write,
        seed,
        generate_config(src, max_new_tokens, temperature, top_k, top_p, min_p),
        StopStrings(src.tokenizer, stops),
        system=system,
        reply_prefix="model> " if interactive else "",
    )
