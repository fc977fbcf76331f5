"""The TRL side of bench.real_data, in its own process: TRL's SFTTrainer on the token ids and
assistant masks ftc's data pipeline produced (so both stacks train on the same sequences and
supervise the same tokens), at SFTConfig's defaults apart from what the quickstart fixes.

    python -m bench.real_data_trl JOB.json RESULT.json

JOB: model_dir, tokenizer_dir, train/validation (JSONL of {"input_ids", "assistant_masks"}),
variant ("trl" | "trl-packing" | "trl-padding-free"), learning_rate, warmup_steps, schedule,
weight_decay, grad_clip, batch_size, max_seq_len, max_steps (0 = one epoch), seed, threads,
gradient_checkpointing (null = TRL's default), out_dir.
"""

from __future__ import annotations

import json
import os
import sys
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common  # noqa: E402

VARIANTS = {
    "trl": {},  # rows padded to the longest in each batch, no packing
    "trl-packing": {"packing": True},  # best-fit-decreasing packing; TRL turns padding-free on with it
    "trl-padding-free": {"padding_free": True},  # rows concatenated into one, no padding
}


def _read(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def validation_loss(model, rows: list[dict], batch_size: int, pad_id: int) -> float:
    """Mean assistant-token loss over the whole set (token-weighted, as ftc's evaluation): rows
    right-padded per batch, token i scored when its assistant mask is 1."""
    import torch

    total, count = 0.0, 0.0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for lo in range(0, len(rows), batch_size):
            chunk = rows[lo : lo + batch_size]
            width = max(len(r["input_ids"]) for r in chunk)
            ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            attn = torch.zeros((len(chunk), width), dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.float32)
            for i, r in enumerate(chunk):
                n = len(r["input_ids"])
                ids[i, :n] = torch.tensor(r["input_ids"])
                attn[i, :n] = 1
                mask[i, :n] = torch.tensor(r["assistant_masks"], dtype=torch.float32)
            logits = model(input_ids=ids, attention_mask=attn).logits.float()
            nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none"
            )
            weights = mask[:, 1:].reshape(-1)
            total += float((nll * weights).sum())
            count += float(weights.sum())
    model.train(was_training)
    return total / max(count, 1.0)


def main(job_path: str, result_path: str) -> None:
    t0 = time.perf_counter()
    job = json.loads(open(job_path).read())
    import torch

    torch.set_num_threads(job["threads"])
    import datasets
    import transformers
    import trl

    transformers.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    tokenizer = transformers.AutoTokenizer.from_pretrained(job["tokenizer_dir"])
    model = transformers.AutoModelForCausalLM.from_pretrained(job["model_dir"], dtype=torch.float32)
    train_rows, valid_rows = _read(job["train"]), _read(job["validation"])
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    val_start = validation_loss(model, valid_rows, job["batch_size"], pad_id)

    extra = {}
    if job.get("gradient_checkpointing") is not None:
        extra["gradient_checkpointing"] = job["gradient_checkpointing"]
    config = trl.SFTConfig(
        output_dir=job["out_dir"],
        per_device_train_batch_size=job["batch_size"],
        gradient_accumulation_steps=1,
        num_train_epochs=1,
        max_steps=job["max_steps"] or -1,
        learning_rate=job["learning_rate"],
        lr_scheduler_type=job["schedule"],
        warmup_steps=job["warmup_steps"],
        weight_decay=job["weight_decay"],
        max_grad_norm=job["grad_clip"],
        max_length=job["max_seq_len"],
        bf16=False,  # the quickstart trains in float32
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        seed=job["seed"],
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True,
        **VARIANTS[job["variant"]],
        **extra,
    )
    counted: list[float] = []

    class CountingTrainer(trl.SFTTrainer):
        def compute_loss(self, model, inputs, *args, **kwargs):
            # supervised targets of this step: labels past each row's first token (the same
            # count as sum(assistant_masks[1:]); padding-free already masks each sequence's first)
            counted.append(float((inputs["labels"][..., 1:] != -100).sum()))
            return super().compute_loss(model, inputs, *args, **kwargs)

    trainer = CountingTrainer(
        model=model,
        args=config,
        train_dataset=datasets.Dataset.from_list(train_rows),
        processing_class=tokenizer,
    )
    t_train = time.perf_counter()
    trainer.train()
    epoch_s = time.perf_counter() - t_train
    peak = common.peak_rss_bytes()
    val_end = validation_loss(trainer.model, valid_rows, job["batch_size"], pad_id)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    common.write_json(
        result_path,
        {
            "stack": job["variant"],
            "steps": trainer.state.global_step,
            "epoch_s": epoch_s,
            "process_s": time.perf_counter() - t0,
            "supervised_tokens": sum(counted),
            "supervised_tokens_per_s": sum(counted) / max(epoch_s, 1e-9),
            "peak_rss_bytes": max(peak, common.peak_rss_bytes()),
            "losses": losses,
            "validation_loss_start": val_start,
            "validation_loss": val_end,
            "rows_per_step": job["batch_size"],
            "gradient_checkpointing": bool(config.gradient_checkpointing),
            "attn_implementation": getattr(model.config, "_attn_implementation", None),
            "versions": {"trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__},
        },
    )


if __name__ == "__main__":
    main(*sys.argv[1:3])
