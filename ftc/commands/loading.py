"""Loading a SOURCE for the generation commands, with the CLI's error handling."""

import click


def load_or_exit(source: str, dtype: str):
    """The loaded Source, or a clear message and exit status 1."""
    from ftc.backends.jax.generate.source import SourceError, load_source
    from ftc.backends.jax.pipeline import use_compilation_cache

    use_compilation_cache()  # a second `ftc generate` / `ftc chat` on the same model skips most compiling
    try:
        src = load_source(source, dtype=dtype)
    except (SourceError, ValueError, FileNotFoundError) as e:
        click.echo(f"error: {e}", err=True)
        raise SystemExit(1) from None
    click.echo(f"model: {src.what}", err=True)
    return src
