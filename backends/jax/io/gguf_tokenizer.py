"""A GGUF file's tokenizer as Hugging Face tokenizer files, through transformers' own conversion.

The fields are read with the `gguf` package (transformers' reader imports torch); the conversion
itself (vocab, merges, special tokens, chat template) is transformers'.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from ftc.backends.jax.io.gguf_config import GgufImportError


def gguf_tokenizer_fields(reader) -> tuple[str, dict, dict]:
    """`(architecture, tokenizer_dict, tokenizer_config)` as transformers' `get_gguf_tokenizer` gives them.

    transformers' own reader imports torch; this reads the same fields with the `gguf` package so a
    conversion needs no torch. tests/test_gguf_import.py checks the two agree on a real file.
    """
    from transformers.integrations.gguf.gguf_tokenizer_mapping import _SPECIAL_TOKENS, GGUF_TOKENIZER_MAPPING

    def value(key: str):
        field = reader.fields[key]
        v = field.contents()
        return bytes(v) if key.endswith("precompiled_charsmap") else v

    grouped = {
        group: {name: value(f"tokenizer.{key}") for key, name in renames.items() if f"tokenizer.{key}" in reader.fields}
        for group, renames in GGUF_TOKENIZER_MAPPING.items()
    }
    tokenizer, tokenizer_config = grouped["tokenizer"], grouped["tokenizer_config"]
    if tokenizer.get("tokenizer_type") == "llama":
        # llama.cpp adds BOS to a sentencepiece vocabulary that does not say otherwise.
        tokenizer_config.setdefault("add_bos_token", True)
    for name, key in _SPECIAL_TOKENS.items():
        token_id = value(f"tokenizer.ggml.{key}") if f"tokenizer.ggml.{key}" in reader.fields else None
        tokenizer_config[name] = tokenizer["tokens"][token_id] if token_id is not None else None
    return reader.fields["general.architecture"].contents(), tokenizer, tokenizer_config


def write_tokenizer(reader, path: Path, out: Path) -> None:
    """transformers' GGUF tokenizer conversion (vocab, merges, special tokens, chat template)."""
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer

    architecture, tokenizer_dict, tokenizer_config = gguf_tokenizer_fields(reader)
    try:
        backend, extra = convert_gguf_tokenizer(architecture, tokenizer_dict)
    except Exception as e:
        raise GgufImportError(
            f"{path}: transformers could not build a tokenizer from the GGUF metadata "
            f"(tokenizer.ggml.model={tokenizer_dict.get('tokenizer_type')!r}): {e}"
        ) from e
    kwargs = {k: v for k, v in {**tokenizer_config, **extra}.items() if v is not None}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs)
    # Keep the chat template inside tokenizer_config.json, where every transformers version and
    # vLLM look for it (transformers 5 would otherwise write chat_template.jinja).
    with contextlib.redirect_stdout(None):
        tokenizer.save_pretrained(out, save_jinja_files=False)
