"""Full fine-tuning: the family's model as it is, every weight trains; exported as an HF checkpoint."""

from __future__ import annotations

from ftc.backends.jax.io import export_common as ex
from ftc.backends.jax.io.gguf_export_format import gguf_format
from ftc.backends.jax.methods.contract import ExportFormat, Method


def _write_hf(trained, out, dtype: str) -> None:
    ex.save_hf(trained, out, trained.params, dtype)


METHOD = Method(
    kind="full",
    config=lambda method: None,
    trainable=lambda path: True,
    detail=lambda model: "every weight trains",
    formats={
        "hf": ExportFormat(
            write=_write_hf, how_to_load=ex.load_hf_line, ftc_side=ex.every_weight_exported, reload=ex.reload_hf
        ),
        "gguf": gguf_format(lambda model, params: params),
    },
    format_hint="a full fine-tune exports format 'hf' or 'gguf'",
)
