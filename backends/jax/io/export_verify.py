"""`ftc export --verify`: reload an export in PyTorch (transformers; PEFT for peft; ftc's PyTorch
hooks for adapters) and compare its outputs on a fixed padded batch with ftc's model in float32,
using the weights as exported (rounded to the export dtype). See io/export.py's docstring."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import jax
import numpy as np

from ftc.backends.jax.io import verify as verify_lib
from ftc.backends.jax.io.export_common import (
    ExportResult,
    as_float32,
    is_causal,
)

if TYPE_CHECKING:
    from ftc.backends.jax.io.export import TrainedRun


def verify_export(
    trained: TrainedRun,
    result: ExportResult,
    *,
    tol: float | None = None,
    batch: int = 2,
    seq_len: int = 16,
    seed: int = 0,
    echo: Callable[[str], None] | None = None,
):
    """Reload `result` in PyTorch and compare with ftc's model on one fixed padded batch (see the
    module docstring). Returns a verify.VerifyResult (`.ok`, `.summary()`). With `echo`, a
    non-float32 export also reports how far rounding to its dtype moved the trained model's outputs."""
    verify_lib.require_torch()
    import torch

    tol = verify_lib.DEFAULT_TOL if tol is None else tol
    m, dtype = trained.model, result.dtype
    exported = m.method.formats[result.format]
    causal = is_causal(m.family)
    output = "logits" if causal else "hidden"
    params = trained.params

    # ftc's side: the trained model, float32, with the weights the export holds.
    module, ours = exported.ftc_side(m, params, dtype)
    ours = as_float32(ours)

    with tempfile.TemporaryDirectory(prefix="ftc-verify-") as scratch:
        started = time.perf_counter()
        reference = exported.reload(trained, result.out_dir, Path(scratch), causal)
        torch_load = time.perf_counter() - started

        fixed = verify_lib.fixed_batch(
            int(trained.hf_config.get("vocab_size") or m.arch.vocab_size), batch, seq_len, seed
        )
        started = time.perf_counter()
        forward = jax.jit(
            lambda p, ids, mask, pos: module.apply(
                {"params": p}, ids, attention_mask=mask, positions=pos, output=output
            )
        )
        ftc_out = np.asarray(
            jax.device_get(forward(ours, fixed.input_ids, fixed.attention_mask, fixed.positions)), np.float32
        )
        ftc_forward = time.perf_counter() - started
        if echo is not None and dtype != "float32":
            trained_forward = jax.jit(
                lambda p, ids, mask, pos: m.eval_module.apply(
                    {"params": p}, ids, attention_mask=mask, positions=pos, output=output
                )
            )
            trained_out = np.asarray(
                jax.device_get(
                    trained_forward(as_float32(params), fixed.input_ids, fixed.attention_mask, fixed.positions)
                ),
                np.float32,
            )
            moved = float(np.abs(trained_out - ftc_out)[fixed.attention_mask.astype(bool)].max())
            echo(
                f"rounding the weights to {dtype} moves ftc's {output} by up to {moved:.3g} (not an export error: "
                f"the check below compares transformers with ftc on the {dtype} weights)"
            )
        started = time.perf_counter()
        with torch.no_grad():
            ref_out = verify_lib.reference_outputs(reference, fixed, output)
        torch_forward = time.perf_counter() - started
    max_diff, scale = verify_lib.compare(ftc_out, ref_out, fixed)
    return verify_lib.VerifyResult(
        model_dir=result.out_dir,
        output=output,
        max_abs_diff=max_diff,
        max_abs_reference=scale,
        tol=tol,
        shape=tuple(ref_out.shape),
        real_tokens=int(fixed.attention_mask.sum()),
        ftc_load_seconds=trained.load_seconds,
        ftc_forward_seconds=ftc_forward,
        torch_load_seconds=torch_load,
        torch_forward_seconds=torch_forward,
    )


# ---------------------------------------------------------------- one call
