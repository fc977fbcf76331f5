"""`ftc eval SOURCE --data FILE`: how well a model does on data, as numbers.

    report = evaluate(load_source("runs/bot"), "data/valid.jsonl", config=GenerateConfig(128, ...))
    print(report.table()); json.dumps(report.to_dict())

- Loss, perplexity and token accuracy over the file's supervised tokens, as training counts them
  (the data pipeline with the run's [data] keys, or the schema's defaults for another source:
  chat trains assistant turns, completion the completion, text every token; no packing, no
  dedupe, overlong rows truncated to max_seq_len). The SFT objective's sums (objectives/sft.py),
  so the numbers equal a run's validation metrics on the same rows.
- For chat and completion rows with a reference answer (prompt_rows.py), generation metrics
  (metrics.py): each row's prompt is completed by the sampler and scored against the reference.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from pathlib import Path

import jax
import numpy as np

from ftc.backends.jax.data.read import DataError
from ftc.backends.jax.generate import metrics as metrics_lib
from ftc.backends.jax.generate import session
from ftc.backends.jax.generate.prompt_rows import read_prompt_rows
from ftc.backends.jax.generate.sampler import GenerateConfig
from ftc.backends.jax.generate.source import Source
from ftc.backends.jax.generate.text import StopStrings
from ftc.backends.jax.objectives.sft import causal_lm_summary, causal_lm_sums
from ftc.spec import spec_from_dict

FORMATS = ("chat", "completion", "text")
DEFAULT_MAX_SEQ_LEN = 2048


@dataclasses.dataclass(frozen=True)
class EvalReport:
    source: str
    data: str
    format: str
    rows: int  # rows scored for the loss
    loss: float
    perplexity: float
    token_accuracy: float
    supervised_tokens: int
    generated: int  # rows with a reference that were generated for
    generation: dict  # metric -> mean over the generated rows
    settings: dict  # how the completions were generated
    samples: tuple[dict, ...]  # per generated row: where, reference, completion, its scores

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def table(self) -> str:
        lines = [
            f"{self.source} on {self.data} ({self.format}, {self.rows} rows)",
            f"  {'loss':<16}{self.loss:.4f}",
            f"  {'perplexity':<16}{self.perplexity:.4f}",
            f"  {'token accuracy':<16}{self.token_accuracy:.4f}  (over {self.supervised_tokens:,} supervised tokens)",
        ]
        if self.generated:
            s = self.settings
            how = "greedy" if not s["temperature"] else f"temperature {s['temperature']}, seed {s['seed']}"
            lines.append(
                f"  generation over {self.generated} rows with a reference ({how}, "
                f"{s['max_new_tokens']} new tokens at most)"
            )
            names = {"exact_match": "exact match", "contains": "contains", "rouge_l": "ROUGE-L", "regex": "regex"}
            for key, value in self.generation.items():
                extra = f"  ({s['regex']!r})" if key == "regex" else ""
                lines.append(f"  {names.get(key, key):<16}{value:.4f}{extra}")
        elif not self.settings.get("generate", True):
            lines.append("  generation: not run (--no-generate)")
        else:
            lines.append("  generation: no rows with a reference answer (chat rows ending in an assistant turn,")
            lines.append("  completion rows with a completion)")
        return "\n".join(lines)


def detect_format(path: str | os.PathLike) -> str:
    """chat, completion or text, from the keys of the file's first row."""
    with open(path, encoding="utf-8-sig") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{number}: invalid JSON ({e.msg} at column {e.colno})") from None
            keys = set(row) if isinstance(row, dict) else set()
            for fmt, key in (("chat", "messages"), ("completion", "prompt"), ("text", "text")):
                if key in keys:
                    return fmt
            raise DataError(
                f"{path}:{number}: cannot tell the data format from keys {sorted(keys)}; expected 'messages' (chat), "
                f"'prompt' + 'completion' (completion) or 'text' (text), or pass --format"
            )
    raise DataError(f"{path}: no rows (the file is empty)")


def _data_spec(source: Source, path: str, format: str, max_seq_len: int | None):
    """The [data] keys the file is read with: the run's (its own file and format put in), else the
    schema's defaults; every row kept (no dedupe, no packing, no validation split)."""
    base = source.spec.to_dict() if source.spec is not None else {"ftc": 1, "name": "eval", "model": {}}
    data = {k: v for k, v in base.get("data", {}).items() if k in ("train_on", "clean", "on_bad_row")}
    if base.get("data", {}).get("format") != format:
        data.pop("train_on", None)
    data.update(format=format, train=os.path.abspath(path), packing=False, shuffle=False)
    data["clean"] = {**data.get("clean", {}), "dedupe": False, "drop_empty": True}
    model = dict(base["model"], base=str(source.model_dir))
    model["max_seq_len"] = max_seq_len or model.get("max_seq_len") or min(source.context, DEFAULT_MAX_SEQ_LEN)
    keep = {k: base[k] for k in ("ftc", "name")}
    return spec_from_dict({**keep, "model": model, "data": data, "training": {"batch_size": 1}})


def loss_metrics(source: Source, path: str, format: str, *, max_seq_len=None, batch_size: int = 8) -> dict:
    """loss, perplexity, token_accuracy, supervised_tokens and rows over the file (see module doc)."""
    from ftc.backends.jax.stages import build_data

    spec = _data_spec(source, path, format, max_seq_len)
    try:
        rows = build_data(spec, source.tokenizer).train_rows  # [N, T] arrays, one sequence per row
    except DataError as e:
        if not e.problems:
            raise
        # the reader's hint names a spec key (data.on_bad_row), which `ftc eval` has no spec to set
        raise DataError(f"{path}: {len(e.problems)} bad {format} row(s); fix or remove them", e.problems) from None
    n = len(rows["input_ids"])
    module = source.model.eval_module
    sums_fn = jax.jit(lambda params, batch: causal_lm_sums(module, params, batch, jax.random.key(0)))
    totals: dict[str, float] = {}
    for start in range(0, n, batch_size):
        batch = {}
        for key, value in rows.items():
            chunk = value[start : start + batch_size]
            pad = np.zeros((batch_size - len(chunk),) + chunk.shape[1:], chunk.dtype)  # weight 0: adds nothing
            batch[key] = np.concatenate([chunk, pad])
        for key, value in jax.device_get(sums_fn(source.params, batch)).items():
            totals[key] = totals.get(key, 0.0) + float(value)
    summary = {k: float(v) for k, v in causal_lm_summary(totals).items()}
    return {
        "rows": n,
        "loss": summary["loss"],
        "perplexity": math.exp(min(summary["loss"], 700.0)),
        "token_accuracy": summary["token_accuracy"],
        "supervised_tokens": int(totals["weight_sum"]),
    }


def generation_metrics(
    source: Source,
    path: str,
    config: GenerateConfig,
    *,
    seed: int = 0,
    regex: re.Pattern | None = None,
    stops=(),
    limit: int | None = None,
    batch_size: int = 8,
    progress: bool = True,
    params=None,
    sampler=None,
    rows=None,
) -> tuple[dict, tuple[dict, ...]]:
    """(mean metrics, per-row samples) over the first `limit` rows of `path` with a reference
    (`rows`: those rows read already). `params` / `sampler` default to the source's."""
    rows = [r for r in (rows or read_prompt_rows(path)) if r.reference is not None][:limit]
    if not rows:
        return {}, ()
    completed = session.complete_rows(
        source,
        sampler or source.sampler(),
        source.params if params is None else params,
        rows,
        seed,
        config,
        StopStrings(source.tokenizer, stops),
        raw=True,  # completion prompts as training reads them; chat rows through the template
        batch_size=batch_size,
        progress=progress,
    )
    samples = []
    for row, done in zip(rows, completed):
        scores = metrics_lib.score(done["completion"], row.reference, regex)
        samples.append(
            {
                "where": row.where,
                "prompt": row.prompt if isinstance(row.prompt, str) else list(row.prompt),
                "reference": row.reference,
                "completion": done["completion"],
                "finish_reason": done["finish_reason"],
                **scores,
            }
        )
    return metrics_lib.mean_scores([{k: s[k] for k in scores} for s in samples]), tuple(samples)


def evaluate(
    source: Source,
    path: str,
    config: GenerateConfig,
    *,
    format: str | None = None,
    max_seq_len: int | None = None,
    seed: int = 0,
    regex: str | None = None,
    stops=(),
    limit: int | None = None,
    batch_size: int = 8,
    generate: bool = True,
    progress: bool = True,
) -> EvalReport:
    """The whole `ftc eval` (see the module docstring)."""
    if not Path(path).is_file():
        raise DataError(f"{path}: no such file")
    if source.tokenizer is None:
        raise DataError(f"{source.name} has no tokenizer files: ftc cannot tokenise {path} for it")
    if max_seq_len is not None and max_seq_len > source.context:
        # positions past the context have no embedding (or RoPE the model never saw); padding every
        # row to such a length also made a tiny model's evaluation run for many minutes
        raise DataError(f"--max-seq-len {max_seq_len} is above {source.name}'s context ({source.context} positions)")
    format = format or detect_format(path)
    if format not in FORMATS:
        raise DataError(f"--format {format!r}: expected one of {', '.join(FORMATS)}")
    if regex is None and source.spec is not None:
        regex = source.spec.eval.regex
    pattern = metrics_lib.compile_regex(regex)
    lm = loss_metrics(source, path, format, max_seq_len=max_seq_len, batch_size=batch_size)
    means, samples = {}, ()
    if generate and format != "text":
        means, samples = generation_metrics(
            source,
            path,
            config,
            seed=seed,
            regex=pattern,
            stops=stops,
            limit=limit,
            batch_size=batch_size,
            progress=progress,
        )
    settings = {
        "max_new_tokens": config.max_new_tokens,
        "temperature": config.sampling.temperature,
        "top_k": config.sampling.top_k,
        "top_p": config.sampling.top_p,
        "min_p": config.sampling.min_p,
        "seed": seed,
        "regex": regex,
        "stop": list(stops),
        "generate": generate,
    }
    return EvalReport(source.name, str(path), format, generated=len(samples), generation=means,
                      settings=settings, samples=samples, **lm)  # fmt: skip
