"""What the commands share: the check that the training stack is installed."""

import click

# `pip install ftc` is the lint-only install; these commands need the `train` extra.
TRAIN_MODULES = ("jax", "flax", "optax", "orbax", "transformers", "grain", "gguf")


def need_train(command: str) -> None:
    """A one-line answer, not an ImportError traceback, when the training stack is not installed."""
    import importlib.util

    missing = [m for m in TRAIN_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        raise click.ClickException(
            f"`ftc {command}` needs the training stack, not in this install ({', '.join(missing)} missing): "
            "pip install 'ftc[train]' (and 'ftc[torch]' to load exports in PyTorch)"
        )
