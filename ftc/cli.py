"""The `ftc` command line. Command bodies import their implementation lazily so that
`ftc lint` and `ftc schema` never import jax, flax, torch or transformers."""

import click

from ftc import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ftc")
def main():
    """ftc compiles a fine-tuning spec (TOML or JSON) into a sharded JAX training run.

    \b
    ftc lint SPEC...     check specs against the schema
    ftc plan SPEC        show what a spec will do, without allocating weights
    ftc run SPEC         train
    ftc export RUN_DIR   write a Hugging Face checkpoint
    """


if __name__ == "__main__":
    main()
