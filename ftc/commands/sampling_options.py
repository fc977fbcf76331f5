"""Options `ftc generate`, `ftc chat` and `ftc eval` share: the source's dtype and how to sample."""

import math

import click

# jax.random.key takes a signed 64-bit seed; a bigger one was an OverflowError deep in jax.
SEED_RANGE = click.IntRange(min=-(2**63), max=2**63 - 1)


def _finite(ctx, param, value):
    """click's FloatRange lets nan through (every comparison with it is false) and inf past an
    open top; neither is a temperature or a probability."""
    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a finite number")
    return value


def _non_empty(ctx, param, values):
    """An empty --stop text would be found at once in every completion."""
    if any(v == "" for v in values):
        raise click.BadParameter("an empty text: give the text that ends a completion")
    return values


def sampling_options(default_max_new_tokens: int = 256):
    """Decorate a command with --max-new-tokens, --temperature, --top-k, --top-p, --min-p, --seed,
    --stop and --dtype."""

    def decorate(f):
        options = [
            click.option(
                "--max-new-tokens",
                type=click.IntRange(min=1),
                default=default_max_new_tokens,
                show_default=True,
                help="Most tokens to generate per prompt (fewer where the model's context ends first).",
            ),
            click.option(
                "--temperature",
                type=click.FloatRange(min=0),
                default=0.0,
                show_default=True,
                callback=_finite,
                help="0: greedy (the most likely token, deterministic); > 0: sample.",
            ),
            click.option(
                "--top-k",
                type=click.IntRange(min=0),
                default=0,
                show_default=True,
                help="Keep the k most likely tokens (0: off).",
            ),
            click.option(
                "--top-p",
                type=click.FloatRange(min=0, max=1, min_open=True),
                default=1.0,
                show_default=True,
                callback=_finite,
                help="Keep the most likely tokens up to this probability mass (1: off).",
            ),
            click.option(
                "--min-p",
                type=click.FloatRange(min=0, max=1),
                default=0.0,
                show_default=True,
                callback=_finite,
                help="Keep tokens at least this fraction as likely as the most likely one (0: off).",
            ),
            click.option(
                "--seed",
                type=SEED_RANGE,
                default=0,
                show_default=True,
                help="Seed of the sampling (same seed, same text).",
            ),
            click.option(
                "--stop",
                "stops",
                multiple=True,
                callback=_non_empty,
                metavar="TEXT",
                help="End a completion where this text appears (repeatable); the model's EOS ids always end it.",
            ),
            click.option(
                "--dtype",
                type=click.Choice(["float32", "bfloat16"]),
                default="float32",
                show_default=True,
                help="Compute dtype; bfloat16 also holds the weights in it (half the bytes read per token).",
            ),
        ]
        for option in reversed(options):
            f = option(f)
        return f

    return decorate


def generate_config(source, max_new_tokens, temperature, top_k, top_p, min_p):
    """The sampler's GenerateConfig for a loaded source and the options."""
    from ftc.backends.jax.generate.sampler import GenerateConfig
    from ftc.backends.jax.generate.sampling import SamplingConfig

    sampling = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    return GenerateConfig(max_new_tokens, sampling, source.eos_ids, source.pad_id)
