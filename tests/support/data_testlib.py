"""Shared pieces for the data tests: a tiny offline tokenizer, JSONL writing, and build_datasets'
spec-supplied keywords as the schema's defaults resolve them."""

from __future__ import annotations

import json
import os

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from ftc.spec import schema_walk
from ftc.spec.validate import fill_defaults

# ChatML, as SmolLM2 renders it (without its default system message).
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "hello there, how are you doing today?",
    "I am doing well, thank you for asking.",
    "what is your favourite colour? mine is blue.",
    "system user assistant tool weight content role",
    "Numbers 0 1 2 3 4 5 6 7 8 9 and punctuation .,;:!?'\"-()[]{}",
]


def make_tokenizer(*, eos_is_pad: bool = False, bos: bool = False) -> PreTrainedTokenizerFast:
    """Byte-level BPE (vocab ~300) with ChatML special tokens, trained in milliseconds."""
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(_CORPUS * 5, trainer)
    if bos:
        from tokenizers import processors

        tk.post_processor = processors.TemplateProcessing(
            single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", tk.token_to_id("<|endoftext|>"))]
        )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        eos_token="<|im_end|>",
        pad_token="<|im_end|>" if eos_is_pad else "<pad>",
        bos_token="<|endoftext|>" if bos else None,
    )
    tok.chat_template = CHATML
    return tok


def write_jsonl(path, rows) -> str:
    """Rows are dicts (written as JSON) or strings (written verbatim, for malformed lines)."""
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return os.fspath(path)


def chat(*turns, **extra) -> dict:
    """chat("user", "hi", "assistant", "hello") -> {"messages": [...]}."""
    messages = [{"role": r, "content": c} for r, c in zip(turns[::2], turns[1::2])]
    return {"messages": messages, **extra}


def spec_data_options(format: str, **given) -> dict:
    """build_datasets' keywords that come from the spec, as a spec setting only data.format
    resolves them (the schema's defaults, its x-ftc-when applied), with `given` on top."""
    data = fill_defaults({"format": format}, schema_walk.node_at(("data",)), ("data",))
    options = dict(
        format=format,
        validation=None,
        validation_split=data["validation_split"],
        packing=data.get("packing"),
        train_on=data.get("train_on"),
        shuffle=data["shuffle"],
        clean=data["clean"],
        on_bad_row=data["on_bad_row"],
        labels=None,
        seed=schema_walk.node_at(("training", "seed"))["default"],
    )
    return {**options, **given}


def spec_row_clean_options(format: str, **given) -> dict:
    """clean_rows' keywords (the data.clean keys it reads, and data.train_on) as the schema's
    defaults resolve them for `format`, with `given` on top."""
    options = spec_data_options(format)
    clean = {k: v for k, v in options["clean"].items() if k != "overlong"}
    return {**clean, "train_on": options["train_on"], **given}
