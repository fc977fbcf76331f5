"""The ftc side of bench.real_data, in its own process: `ftc run`'s pipeline on the spec the
orchestrator wrote (the quickstart's work, logged every step), export left out.

    python -m bench.real_data_ftc SPEC.json RESULT.json

Wall time for the epoch is the train loop's own clock: each metrics.jsonl row's tokens/s covers
the steps since the previous row with evaluations left out, so with a row every step the step
times are real tokens / tokens per second (the first step's includes its compilation).
"""

from __future__ import annotations

import json
import os
import sys
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common  # noqa: E402


def main(spec_path: str, result_path: str) -> None:
    t0 = time.perf_counter()
    import numpy as np

    from ftc.backends.jax import pipeline, stages
    from ftc.backends.jax.train import step as ts
    from ftc.spec import spec_from_dict

    spec = spec_from_dict(json.loads(open(spec_path).read()))
    # The export is not part of the epoch (TRL's side saves nothing either).
    pipeline.export_at_end = lambda run_dir, echo=print: ""
    summary = pipeline.run(spec, echo=lambda s: None)
    wall = time.perf_counter() - t0
    peak = common.peak_rss_bytes()

    rows = [json.loads(line) for line in open(os.path.join(summary["run_dir"], "metrics.jsonl"))]
    train = [r for r in rows if r["split"] == "train"]
    valid = [r for r in rows if r["split"] == "validation"]
    # Replay the same (seeded) batches to count what each step trained on.
    model_dir, _ = stages.model_with_weights(spec)
    data = stages.build_data(spec, stages.load_tokenizer(stages.tokenizer_dir(spec, model_dir)))
    it = data.train_iterator()
    real, supervised = [], []
    for _ in range(summary["step"]):
        batch = next(it)
        real.append(ts.real_tokens(batch))
        # weights mark the supervised (assistant) targets: the same count as the assistant masks
        supervised.append(float(np.sum(batch["weights"])))
    step_s = [n / r["tokens_per_second"] for n, r in zip(real, train)]
    result = {
        "stack": "ftc",
        "steps": summary["step"],
        "steps_per_epoch": data.steps_per_epoch,
        "epoch_s": sum(step_s),
        "first_step_s": step_s[0],
        "step_times_s": step_s,
        "process_s": wall,
        "supervised_tokens": sum(supervised),
        "real_tokens": sum(real),
        "supervised_tokens_per_s": sum(supervised) / max(sum(step_s), 1e-9),
        "peak_rss_bytes": peak,
        "losses": [r["loss"] for r in train],
        "validation_loss_start": valid[0]["loss"] if valid and valid[0]["step"] == 0 else None,
        "validation_loss": valid[-1]["loss"] if valid else None,
        "rows_per_step": data.batch_size,
        "layout": "packed" if data.stats.packing else "padded to max_seq_len",
    }
    common.write_json(result_path, result)


if __name__ == "__main__":
    main(*sys.argv[1:3])
