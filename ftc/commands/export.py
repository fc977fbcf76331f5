"""`ftc export`: a run's checkpoint as a Hugging Face / PEFT / adapter directory."""

import os

import click

from ftc import guard
from ftc.commands.common import need_train
from ftc.spec import choices

DTYPE_ALIASES = {"f32": "float32", "bf16": "bfloat16", "f16": "float16"}  # llama.cpp's names


@click.command(short_help="Write a run's checkpoint as a Hugging Face / PEFT / adapter directory or a GGUF.")
@click.argument("run_dir", metavar="RUN_DIR", type=click.Path(exists=True, file_okay=False))
@click.option(
    "--out",
    default=None,
    type=click.Path(file_okay=False),
    help="Directory to write (default RUN_DIR/export). Written atomically: all or nothing.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(choices.export_formats()),
    default=None,
    help="hf: a transformers checkpoint (LoRA/QLoRA merged; adapters: base + ftc_adapters/); "
    "peft: a PEFT LoRA adapter; adapters: bottleneck adapters only; gguf: one GGUF file for llama.cpp / Ollama "
    "with a Modelfile (merged). Default: the run's export.format.",
)
@click.option(
    "--dtype",
    type=click.Choice(["float32", "bfloat16", "float16", "q8_0", "q4_0", *DTYPE_ALIASES]),
    default=None,
    help="Dtype of the written weights (f32, bf16, f16 are the same as float32, bfloat16, float16); "
    "q8_0 and q4_0, llama.cpp's block quantisations, for --format gguf. Default: the run's export.dtype.",
)
@click.option(
    "--verify/--no-verify",
    default=None,
    help="Reload the export in its loader (transformers / PEFT / transformers' GGUF loader), compare its "
    "outputs with ftc's model on a fixed batch and its greedy continuations of fixed prompts with ftc's "
    "sampler; fail on a mismatch (the certificate in ftc_export.json). Default: the run's export.verify.",
)
@click.option(
    "--tol",
    default=None,
    type=click.FloatRange(min=0),
    help="Allowed max |difference| for --verify, scaled by max(1, max |reference output|). "
    "Default 1e-4 (1e-3 for a q4_0 GGUF, whose weights are also checked bit for bit).",
)
@click.option("--step", default=None, type=click.IntRange(min=0), help="Checkpoint step (default: the latest).")
@click.option(
    "--force",
    is_flag=True,
    help="Replace --out if it exists and is not empty (never a run directory, nor what it reads).",
)
@click.option(
    "--base-name",
    default=None,
    metavar="NAME",
    help="The base's name in PEFT / adapter configs (base_model_name_or_path), e.g. the HF id a serving "
    "machine loads. Default: model.base as the spec names it (for a GGUF, the HF model its metadata names).",
)
def export(run_dir, out, fmt, dtype, verify, tol, step, force, base_name):
    """Export the final checkpoint of RUN_DIR (a run directory of `ftc run`). The model, the method
    and the base are read from the checkpoint itself; nothing needs re-entering.

    Exit status: 0 written (and verified with --verify), 1 refused, failed, or verification above
    the tolerance or with different greedy tokens.
    """
    need_train("export")
    dtype = DTYPE_ALIASES.get(dtype, dtype)
    from ftc.backends.jax.io.export import ExportError, export_run
    from ftc.backends.jax.io.model_source import ModelSourceError
    from ftc.backends.jax.io.verify import ReferenceUnavailable

    click.get_current_context().meta[guard.LOG_DIR] = run_dir
    from ftc.commands.out_path import unwritable_dir_problem

    problem = unwritable_dir_problem(out if out is not None else os.path.join(run_dir, "export"))
    if problem:  # before the checkpoint loads: found now, not at the last rename
        click.echo(f"error: --out {out or os.path.join(run_dir, 'export')}: {problem}", err=True)
        raise SystemExit(1)
    try:
        _, check = export_run(
            run_dir,
            out=out,
            format=fmt,
            dtype=dtype,
            verify=verify,
            force=force,
            step=step,
            tol=tol,
            base_name=base_name,
            echo=click.echo,
        )
    except (ExportError, ModelSourceError, ReferenceUnavailable, FileNotFoundError) as e:
        click.echo(f"error: {e}", err=True)
        raise SystemExit(1) from None
    raise SystemExit(0 if check is None or check.ok else 1)
