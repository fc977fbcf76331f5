"""Generation inside `ftc run` (the spec's [eval]): at each validation, complete the first
`eval.samples` rows of data.validation that have a reference answer with the parameters being
trained, on the training mesh, and log the metrics (metrics.py) and the samples.

    hook = generation_hook(spec, model, tokenizer, model_dir, hf_config, mesh, logger)
    hook(state, step)      # -> the mean metrics; logs them and the samples

metrics.jsonl gets one row per validation: {"step", "split": "generation", "exact_match",
"contains", "rouge_l"[, "regex"], "samples": [{"where", "prompt", "reference", "completion",
"finish_reason", scores...}]}; TensorBoard gets the metrics as scalars under generation/ and the
samples as a text table (generation/samples). Greedy, `eval.max_new_tokens` tokens at most.
"""

from __future__ import annotations

from collections.abc import Callable

from ftc.backends.jax.data import sources as data_sources
from ftc.backends.jax.data.read import resolve_sources
from ftc.backends.jax.generate import evaluate, metrics
from ftc.backends.jax.generate.prompt_rows import read_prompt_rows
from ftc.backends.jax.generate.sampler import GenerateConfig, make_sampler
from ftc.backends.jax.generate.source import Source, context_length, eos_ids
from ftc.spec.run_rules import GENERATION_FORMATS


def generation_hook(spec, model, tokenizer, model_dir, hf_config, mesh, logger) -> Callable | None:
    """The hook for `train_loop(generation_eval=...)`, or None when eval.samples is 0. Raises
    ValueError (naming the keys) when the spec asks for samples it has no prompts for."""
    n = spec.eval.samples
    if not n:
        return None
    validation = spec.data.validation
    why = None
    if spec.data.format not in GENERATION_FORMATS:  # lint checks this too (spec/run_rules.py)
        why = f"data.format is {spec.data.format!r} (samples need chat or completion rows)"
    elif validation is None:
        why = "there is no data.validation file (a validation_split's rows are not kept as prompts)"
    elif validation.startswith(data_sources.prefixes()):
        why = f"data.validation is a named source ({validation}); samples are read from JSONL files"
    if why:
        raise ValueError(f"eval.samples = {n}: {why}; set eval.samples = 0 or give data.validation as JSONL")
    regex = metrics.compile_regex(spec.eval.regex, "eval.regex")
    files = resolve_sources(validation)
    rows = [r for f in files for r in read_prompt_rows(f) if r.reference is not None][:n]
    if not rows:
        raise ValueError(f"eval.samples = {n}: no row of {validation} has a reference answer to compare with")
    source = Source(
        spec.run_dir,
        f"run {spec.run_dir} (training)",
        model,
        None,
        tokenizer,
        model_dir,
        hf_config,
        eos_ids(model_dir, hf_config, tokenizer),
        context_length(hf_config),
        spec,
    )
    sampler = make_sampler(model.family, model.arch, model.eval_module, context=source.context, mesh=mesh)
    config = GenerateConfig(spec.eval.max_new_tokens, eos_ids=source.eos_ids, pad_id=source.pad_id)

    def hook(state: dict, step: int) -> dict:
        means, samples = evaluate.generation_metrics(
            source,
            files[0],
            config,
            seed=spec.training.seed,
            regex=regex,
            limit=n,
            batch_size=min(n, 8),
            progress=False,
            params=state["params"],
            sampler=sampler,
            rows=rows,
        )
        if logger is not None:
            logger.log(step, "generation", {**means, "samples": list(samples)})
            logger.log_text(step, "generation/samples", _markdown(samples))
        return means

    return hook


def _markdown(samples) -> str:
    """The samples as a markdown table (TensorBoard renders it)."""

    def cell(text) -> str:
        text = text if isinstance(text, str) else " / ".join(f"{m['role']}: {m['content']}" for m in text)
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| prompt | reference | completion | exact | ROUGE-L |", "|---|---|---|---|---|"]
    for s in samples:
        lines.append(
            f"| {cell(s['prompt'])} | {cell(s['reference'])} | {cell(s['completion'])} | "
            f"{s['exact_match']:.0f} | {s['rouge_l']:.3f} |"
        )
    return "\n".join(lines)
