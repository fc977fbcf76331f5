"""What a method is to the rest of ftc: one `Method` record per kind, plain functions and data.

Every question the program, `ftc plan` and `ftc export` ask about a method is a field here, so
adding a method is one module defining `METHOD = Method(...)` plus one line in the registry
(methods/__init__.py). Nothing imports jax here: the record is data; its functions live in the
method's module and import what they need there.

    METHOD = Method(
        kind="lora",
        config=LoraConfig.from_spec,      # the spec's MethodSpec -> the method's config
        transform=adapt,                  # (family, arch, base module, config) -> module with `.plan`
        trainable=is_trainable,           # "/"-joined param path -> trained?
        init_params=init_params,          # (module, base params, rng, shardings=, param_dtype=) -> params
        ...,
        formats={"hf": ExportFormat(...), "peft": ExportFormat(...)},
    )
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any


def _never(path: str) -> bool:
    return False


def _same(x):
    return x


@dataclasses.dataclass(frozen=True)
class ExportFormat:
    """One way a trained method leaves ftc (`ftc export --format NAME`).

    `trained` below is an `io.export.TrainedRun`: the run's MethodModel, params, base and tokenizer."""

    write: Callable[[Any, Any, str], None]  # (trained, empty directory, dtype): writes the export there
    how_to_load: Callable[[Any, Any, str], str]  # (out dir, base_name, "AutoModelForCausalLM"|"AutoModel")
    ftc_side: Callable[[Any, Any, str], tuple]  # (MethodModel, params, dtype) -> (module, params): what the
    #                                                 export holds, computed by ftc for `verify`
    reload: Callable[[Any, Any, Any, bool], Any]  # (trained, out dir, scratch dir, causal) -> the PyTorch model


@dataclasses.dataclass(frozen=True)
class Method:
    """Everything ftc asks of one `[method] kind` (see the module docstring)."""

    kind: str
    config: Callable[[Any], Any]  # spec.method (every key filled by the schema) -> config
    trainable: Callable[[str], bool]  # "/"-joined param path -> trained in the step loop?
    detail: Callable[[Any], str]  # MethodModel -> one line on its settings (plan, run log)
    formats: Mapping[str, ExportFormat | None]  # `ftc export --format` choices; None: `exported_by_run` writes it
    format_hint: str = ""  # said when another format is asked for
    # (family, arch, base module, config) -> the module that trains, carrying `.plan`; None: the base itself
    transform: Callable | None = None
    # (module, base params, rng, *, shardings, param_dtype) -> the method's params; None: the base params
    init_params: Callable | None = None
    base_params: Callable[[Any], Any] = _same  # the family's tree inside the method's params
    eval_module: Callable[[Any], Any] = _same  # the module without training-only noise (LoRA dropout)
    zero_is_base: bool = False  # trainable leaves set to zero compute the base model exactly
    own_dtype: Callable[[str], bool] = _never  # leaves stored in their own dtypes, not param_dtype (NF4)
    saved_frozen: Callable[[str], bool] = _never  # frozen leaves a checkpoint holds all the same (a rebuild
    #                                                 could differ in the last bit: NF4's second level)
    summary: Callable[[Any], Any] | None = None  # params -> counts (.trainable, .total, .base_bytes,
    #                                                 .quantized_weights, .quantized_bytes); None: by `trainable`
    # model.init_from directories: does this method read one with this adapter_config.json, and how
    reads_init_dir: Callable[[dict], bool] = _never
    load_trained: Callable | None = None  # (MethodModel, directory, params) -> params with its weights
    init_subdir: str | None = None  # where an HF export directory holds this method's weights
    trains_in_step_loop: bool = True  # False: `ftc run` trains it in its own loop (the probe)
    # a method whose export `ftc run` writes (no checkpoint): `ftc export` copies (and verifies) it,
    # (run_dir, out, *, format, dtype, verify, force, tol, echo) -> (ExportResult, VerifyResult | None)
    exported_by_run: Callable | None = None
