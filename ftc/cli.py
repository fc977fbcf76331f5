"""The `ftc` command line. Command bodies import their implementation lazily so that
`ftc lint` and `ftc schema` never import jax, flax, torch or transformers. Choices (method kinds,
objectives, export formats) are the schema's (spec/choices.py)."""

import click

from ftc import __version__, guard
from ftc.commands import report as report_commands
from ftc.commands.common import need_train as _need_train
from ftc.spec import choices


@click.group(cls=guard.GuardedGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ftc")
@click.option("--debug", is_flag=True, envvar="FTC_DEBUG", help="Show the traceback of an unexpected error.")
@click.pass_context
def main(ctx, debug):
    """ftc compiles a fine-tuning spec (TOML or JSON) into a sharded JAX training run.

    \b
    ftc lint SPEC...     check specs against the schema
    ftc plan SPEC        show what a spec will do, without allocating weights
    ftc run SPEC         train
    ftc export RUN_DIR   write a Hugging Face checkpoint
    ftc generate SOURCE  generate text (also: ftc chat SOURCE, ftc eval SOURCE)
    ftc report RUN_DIR   an HTML report with charts (several runs: overlaid)
    ftc data inspect     the tokens a spec trains on, and the usual data mistakes
    ftc diff A B         the spec keys in which two specs or runs differ
    """
    ctx.meta[guard.DEBUG] = debug


@main.command(short_help="Check specs against the schema and rules.")
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a key in every spec, typed by the schema: --set training.learning_rate=1e-4",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["text", "json", "github"]),
    default="text",
    show_default=True,
    help="text: file:line:col lines; json: one document; github: GitHub Actions annotations.",
)
def lint(files, overrides, fmt):
    """Check spec files (TOML or JSON) against the schema and the semantic rules.

    Reports every problem at once with file:line:col, key path and what was expected.
    A local data or model file that does not exist yet is a warning, not an error.
    Exit status: 0 all valid, 1 any invalid, 2 usage error.
    """
    from ftc.spec import lint_file
    from ftc.spec.report import render

    results = {f: lint_file(f, overrides) for f in files}
    out = render(results, fmt)
    if out:
        click.echo(out)
    invalid = any(i.severity == "error" for issues in results.values() for i in issues)
    raise SystemExit(1 if invalid else 0)


@main.command(short_help="Print the spec's JSON Schema.")
def schema():
    """Print the spec's JSON Schema (2020-12), for editors and other tools."""
    from ftc.schemas import schema_text

    click.echo(schema_text(), nl=False)


@main.command(short_help="Write a commented starter spec.")
@click.argument("path", default="spec.toml", type=click.Path(dir_okay=False))
@click.option(
    "--method", type=click.Choice(choices.method_kinds()), default="lora", show_default=True, help="What to train."
)
@click.option(
    "--objective",
    type=click.Choice(choices.objectives()),
    default=None,
    help="Training objective (default: the method's first: classify for a probe, else sft).",
)
@click.option(
    "--base",
    default=None,
    help="Base model: an HF id in the local cache (org/name[@rev]), a local HF directory, a .gguf file, or "
    "package:IMPORT_NAME/path (a model shipped in an installed Python package; init lists those it knows). "
    "Default: the first offline base that works here.",
)
@click.option("--name", default=None, help="Run name (default: from the file name).")
@click.option("--force", is_flag=True, help="Overwrite PATH if it exists.")
def init(path, method, objective, base, name, force):
    """Write a commented starter spec to PATH (default spec.toml) that lints clean, and list the
    bases that work offline for its objective (ftc never downloads a model), saying which are on
    this machine."""
    import os
    import re

    from ftc.spec import lint_file
    from ftc.spec.load import SUFFIXES
    from ftc.spec.starter import NAME_PATTERN, as_json, name_from_file, offline_bases, starter_spec

    only = choices.method_info(method).get("objectives")
    if only and objective not in (None, *only):
        raise click.UsageError(
            f"{choices.method_info(method)['objectives_why']}: --objective must be {' or '.join(only)}"
        )
    if name is not None and not re.fullmatch(NAME_PATTERN, name):
        raise click.UsageError(f"--name {name!r}: use lower-case letters, digits, '.', '_' and '-'")
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in SUFFIXES:
        raise click.UsageError(f"{path}: a spec is a .toml or .json file, not {suffix or 'a file without suffix'!r}")
    if os.path.exists(path) and not force:
        raise click.UsageError(f"{path} exists; pass --force to overwrite it")
    text = starter_spec(os.path.basename(path), name or name_from_file(path), method, objective, base)
    text = as_json(text) if suffix == ".json" else text
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    # Linted beside PATH (relative paths resolve alike), renamed over it only when clean: a failure
    # leaves no broken spec behind and keeps the file --force would have replaced.
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{os.getpid()}.tmp{suffix}")
    try:
        with open(tmp, "x", encoding="utf-8") as f:
            f.write(text)
        issues = lint_file(tmp)
        errors = [i for i in issues if i.severity == "error"]
        if errors:  # the template and the schema disagree: a bug in ftc, not in the user's input
            raise click.ClickException("the starter spec does not lint clean:\n" + "\n".join(map(str, errors)))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    click.echo(f"wrote {path}: edit the data paths (and model.base), then `ftc lint {path}`")
    for issue in issues:
        if issue.key_path.startswith("model."):
            click.echo(f"warning: {issue.key_path}: {issue.message}")
    objective = objective or choices.objectives_for(method)[0]
    click.echo(f"offline bases for {objective} (ftc never downloads a model):")
    for source, about, problem in offline_bases(objective):
        click.echo(f"  {source}  {'works here' if problem is None else 'not on this machine'}\n    {about}")


@main.group(short_help="Inspect and check base models.")
def model():
    """Base models: local HF directories, HF ids (local cache only), .gguf files, package:NAME/path."""


@model.command(short_help="Compare ftc's forward pass with transformers'.")
@click.argument("source")
@click.option("--batch", default=2, show_default=True, type=click.IntRange(min=1), help="Sequences in the test batch.")
@click.option("--seq-len", default=16, show_default=True, type=click.IntRange(min=1), help="Tokens per sequence.")
@click.option(
    "--tol",
    default=1e-4,
    show_default=True,
    type=click.FloatRange(min=0),
    help="Allowed max |difference|, scaled by max(1, max |transformers output|).",
)
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the token ids.")
@click.option(
    "--cache-dir",
    default=None,
    type=click.Path(file_okay=False),
    help="ftc cache for converted GGUF files (default $FTC_CACHE or ~/.cache/ftc).",
)
def verify(source, batch, seq_len, tol, seed, cache_dir):
    """Load SOURCE in ftc (JAX) and in transformers (PyTorch), both float32, run one fixed padded
    batch through both and print the largest difference of the logits (hidden states for encoders).

    SOURCE is a local HF directory, an HF id in the local cache (org/name[@rev]), a .gguf file or
    package:NAME/path. Exit status: 0 within tolerance, 1 above it, 2 when the check cannot run
    (bad source, or PyTorch not installed).
    """
    _need_train("model verify")
    from ftc.backends.jax.io.model_source import ModelSourceError, resolve_model_source
    from ftc.backends.jax.io.verify import ReferenceUnavailable, verify_model

    try:
        model_dir = resolve_model_source(source, cache_dir=cache_dir)
        click.echo(f"model: {model_dir}")
        result = verify_model(model_dir, batch=batch, seq_len=seq_len, tol=tol, seed=seed)
    except (ModelSourceError, ReferenceUnavailable, ValueError, FileNotFoundError) as e:
        click.echo(f"error: {e}", err=True)  # the check could not run: not the same as failing it
        raise SystemExit(2) from None
    click.echo(result.summary())
    raise SystemExit(0 if result.ok else 1)


def _load_spec_or_exit(spec_path, overrides):
    from ftc.spec import SpecError, load_spec

    try:
        return load_spec(spec_path, overrides)
    except SpecError as e:
        click.echo(str(e), err=True)
        raise SystemExit(1) from None


@main.command(short_help="Show what a spec will do, allocating nothing.")
@click.argument("spec_path", metavar="SPEC", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a spec key (typed by the schema)."
)
@click.option(
    "--devices",
    type=click.IntRange(min=1),
    default=None,
    help="Plan for this many devices (default: the devices jax sees here).",
)
@click.option(
    "--compile",
    "compile_",
    is_flag=True,
    help="Also compile the train step ahead of time for the plan's mesh and print XLA's memory analysis per "
    "device beside the estimate. With --devices N, on N CPU devices XLA makes up (no accelerator needed).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the plan as one JSON document.")
def plan(spec_path, overrides, devices, compile_, as_json):
    """Compile SPEC into a plan: model summary, parameter counts, per-device memory estimate,
    batch geometry, steps, schedule, mesh and the partition of every parameter.

    Reads only the base model's config.json: planning a 70B model allocates nothing. --compile
    also builds the run's train step on abstract inputs and has XLA compile it (seconds to
    minutes, growing with the model); still no weights are read.
    """
    import json

    spec = _load_spec_or_exit(spec_path, overrides)
    _need_train("plan")
    from ftc.compiler.report import format_compiled_memory, format_plan

    compiled = None
    try:
        if compile_:
            from ftc.backends.jax.compiled_memory import compiled_memory

            result, compiled = compiled_memory(spec, devices)
        else:
            from ftc.backends.jax.pipeline import plan_spec

            result = plan_spec(spec, device_count=devices)
    except (ValueError, FileNotFoundError, NotImplementedError) as e:
        click.echo(f"error: {e}", err=True)
        raise SystemExit(1) from None
    if as_json:
        out = result.to_dict()
        if compiled is not None:
            out["compiled_memory"] = compiled.to_dict()
        click.echo(json.dumps(out, indent=2))
    else:
        click.echo(format_plan(result) + ("" if compiled is None else "\n" + format_compiled_memory(result, compiled)))


@main.command(short_help="Train a spec (resumes from the run's latest checkpoint).")
@click.argument("spec_path", metavar="SPEC", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a spec key (typed by the schema)."
)
@click.option(
    "--coordinator",
    default=None,
    envvar="FTC_COORDINATOR",
    metavar="HOST:PORT",
    help="Multi-process: address of process 0, the same for every process [env FTC_COORDINATOR].",
)
@click.option(
    "--num-processes",
    type=click.IntRange(min=1),
    default=None,
    envvar="FTC_NUM_PROCESSES",
    help="Multi-process: how many processes join the run [env FTC_NUM_PROCESSES].",
)
@click.option(
    "--process-id",
    type=click.IntRange(min=0),
    default=None,
    envvar="FTC_PROCESS_ID",
    help="Multi-process: this process's id, 0 .. N-1 [env FTC_PROCESS_ID].",
)
@click.option(
    "--distributed",
    is_flag=True,
    envvar="FTC_DISTRIBUTED",
    help="Multi-process: read coordinator, count and id from the cluster (TPU pod, SLURM, Open MPI, "
    "Kubernetes) [env FTC_DISTRIBUTED=1].",
)
def run(spec_path, overrides, coordinator, num_processes, process_id, distributed):
    """Train SPEC into <output_dir>/<name>: spec.resolved.json, metrics.jsonl, tensorboard/,
    checkpoints/. Running it again resumes from the latest checkpoint; a changed training-relevant
    key is refused. SIGTERM/SIGINT save a checkpoint and exit non-zero.

    Several hosts (or one process per GPU) train one run together: start the same command on
    each, with the same --coordinator and --num-processes and its own --process-id (host 1 here;
    host 0 passes --process-id 0). The mesh spans every device of every process; the output
    directory must be shared storage.

    \b
      ftc run spec.toml --coordinator host0:8476 --num-processes 2 --process-id 1"""
    spec = _load_spec_or_exit(spec_path, overrides)
    _need_train("run")
    click.get_current_context().meta[guard.LOG_DIR] = spec.run_dir
    from ftc.backends.jax.train import distributed as dist

    launch = dist.Launch(coordinator, num_processes, process_id, distributed)
    problem = launch.problem()
    single = choices.method_info(spec.method.kind).get("single_process")
    if problem is None and launch.multi_process and single:
        problem = (
            f"method.kind = {spec.method.kind} runs in one process ({single}); "
            "start it without --coordinator / --distributed"
        )
    if problem:
        click.echo(f"error: {problem}", err=True)
        raise SystemExit(2)
    try:
        dist.initialize(launch)
    except (RuntimeError, ValueError) as e:  # coordinator unreachable, timeout, cluster not detected
        where = launch.coordinator or "the cluster's coordinator"
        click.echo(f"error: could not join the multi-process run at {where}: {e}", err=True)
        raise SystemExit(1) from None

    from ftc.backends.jax.data.read import DataError
    from ftc.backends.jax.io.export import ExportError, VerifyFailedError
    from ftc.backends.jax.io.model_source import ModelSourceError
    from ftc.backends.jax.pipeline import run as run_spec
    from ftc.backends.jax.state.checkpoint import ResumeRefusedError
    from ftc.backends.jax.state.lock import LockedError
    from ftc.backends.jax.train.step import NonFiniteLossError
    from ftc.compiler.sharding_rules import PlanError

    echo = click.echo if dist.is_writer() else (lambda *_a, **_k: None)
    try:
        summary = run_spec(spec, echo=echo)
    except (
        ResumeRefusedError,
        LockedError,
        NonFiniteLossError,
        NotImplementedError,
        PlanError,
        ModelSourceError,
        DataError,
        FileNotFoundError,
        ExportError,
        VerifyFailedError,
        ValueError,
    ) as e:
        click.echo(f"error: {e}", err=True)
        raise SystemExit(1) from None
    echo(f"done: step {summary['step']} of {summary['total_steps']} in {summary['run_dir']}")


# Commands in their own modules (ftc/commands/), one line each.
from ftc.commands.chat import chat  # noqa: E402
from ftc.commands.eval import eval_command  # noqa: E402
from ftc.commands.export import export  # noqa: E402
from ftc.commands.generate import generate  # noqa: E402

for command in (export, generate, chat, eval_command):
    main.add_command(command)

report_commands.register(main)

if __name__ == "__main__":
    from ftc import host_allocator

    host_allocator.restart_tuned()
    main()
