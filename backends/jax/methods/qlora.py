"""QLoRA (Dettmers et al. 2023): LoRA over a frozen base whose linear layers are stored in NF4.

The transformation is lora.py's model with a quantisation config: every Dense inside the
scanned blocks (the "all-linear" set, LoRA target or not; the LM head and embeddings stay in
their own dtype, as bitsandbytes leaves them) keeps its kernel as NF4 codes packed two per uint8
plus blockwise absmax scales (`quant_block_size` values per block, one of the schema's sizes),
optionally double quantised (nf4.py). Inside the model the intercepted Dense dequantises its
kernel to the compute dtype and runs the matmul; LoRA's A and B (float32, trained) sit on top as
in plain LoRA.

Frozen base bytes: 0.5 byte per weight for the codes, + 4 / block_size for float32 scales
(0.5625 per weight at block 64, 0.281 x bfloat16), or + ~1 / block_size with double quantisation
(0.516 per weight, 0.258 x bfloat16).

Export is LoRA's: format peft writes the adapter (served on the original, unquantised base, as
PEFT does with bitsandbytes QLoRA adapters; `verify` checks it on the dequantised base the run
trained against); format hf dequantises the base and folds scale * A @ B into it, so the merged
checkpoint computes exactly what the trained QLoRA model did.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp

from ftc.backends.jax.io import export_common as ex
from ftc.backends.jax.io import hf_checkpoint
from ftc.backends.jax.methods import lora, lora_export
from ftc.backends.jax.methods.contract import ExportFormat
from ftc.backends.jax.methods.intercept import Intercepted
from ftc.backends.jax.methods.lora_params import merged_params, save_merged
from ftc.spec import schema_walk

# The schema's choices (its enum is the contract; nf4.py itself takes any even block size).
BLOCK_SIZES = tuple(schema_walk.node_at(("method", "quant_block_size"))["enum"])
# NF4 double quantisation's second level: its float32 mean is summed in an order that depends on
# the mesh, so a rebuild on another mesh could differ in the last bit; a checkpoint keeps it.
SECOND_LEVEL = frozenset({"absmax_q", "absmax_scale", "absmax_offset"})


@dataclasses.dataclass(frozen=True)
class QLoraConfig:
    """The spec's [method] keys for kind = "qlora" (their defaults are the schema's)."""

    rank: int
    alpha: float
    dropout: float
    rslora: bool
    targets: str | tuple[str, ...]
    quant_block_size: int
    double_quant: bool

    def __post_init__(self):
        b = self.quant_block_size
        if isinstance(b, bool) or b not in BLOCK_SIZES:
            raise ValueError(f"[method].quant_block_size={b!r}: expected one of {', '.join(map(str, BLOCK_SIZES))}")
        _ = self.lora  # builds (and so validates) the LoRA keys

    @classmethod
    def from_spec(cls, method) -> QLoraConfig:
        """From an ftc.spec MethodSpec (spec validation fills every key)."""
        return cls(**{f.name: getattr(method, f.name) for f in dataclasses.fields(cls)})

    @property
    def lora(self) -> lora.LoraConfig:
        return lora.LoraConfig(
            self.rank,
            self.alpha,
            self.dropout,
            self.rslora,
            tuple(self.targets) if isinstance(self.targets, list) else self.targets,
        )

    @property
    def quant(self) -> lora.QuantConfig:
        return lora.QuantConfig(self.quant_block_size, bool(self.double_quant))


def plan_qlora(family, arch, config: QLoraConfig) -> lora.LoraPlan:
    return lora.plan_lora(family, arch, config.lora, quant=config.quant)


def adapt(family, arch, module, config: QLoraConfig) -> Intercepted:
    """The transformed model: what the training core builds instead of `family.build(arch, dtype)`.
    Its params come from `lora.init_params(model, loaded_params, rng)` (which quantises)."""
    return Intercepted(module, plan_qlora(family, arch, config), lora.interceptor)


def init_method(loaded, config: QLoraConfig, rng: jax.Array, *, dtype=jnp.bfloat16, shardings=None) -> lora.Initialized:
    """QLoRA on a `hf_checkpoint.LoadedModel`: quantises its linear layers, adds LoRA factors."""
    return lora.init_method(loaded, config.lora, rng, dtype=dtype, quant=config.quant, shardings=shardings)


def dequantized_base(plan: lora.LoraPlan, params):
    """The family's plain params with every NF4 kernel dequantised (float32), without LoRA: the
    base model a QLoRA run actually trained against."""
    return merged_params(plan, params, include_lora=False)


def is_stored_nf4(path: str) -> bool:
    return lora.QUANT_CHILD in path.split("/")


def is_second_level(path: str) -> bool:
    parts = path.split("/")
    return lora.QUANT_CHILD in parts and parts[-1] in SECOND_LEVEL


def _reload_peft(trained, out, scratch, causal: bool):
    """The adapter on the base QLoRA trained against (NF4 dequantised), written to `scratch`."""
    m = trained.model
    base_dir = Path(scratch) / "dequantised"
    hf_checkpoint.save_hf(base_dir, ex.loaded(trained, dequantized_base(m.plan, trained.params)), dtype="float32")
    return lora_export.reload_peft_on(base_dir, out, causal)


def _load_peft_line(out, base_name: str | None, auto: str) -> str:
    return (
        lora_export.load_peft_line(out, base_name, auto) + " -- trained against the NF4-dequantised base; on the "
        "original base it differs by the quantisation error"
    )


METHOD = dataclasses.replace(
    lora.METHOD,
    kind="qlora",
    config=QLoraConfig.from_spec,
    transform=adapt,
    formats={
        "hf": lora_export.FORMATS["hf"],
        "gguf": lora_export.FORMATS["gguf"],
        "peft": ExportFormat(
            write=lora_export.write_peft,
            how_to_load=_load_peft_line,
            ftc_side=ex.trained_weights_exported,
            reload=_reload_peft,
        ),
    },
    own_dtype=is_stored_nf4,
    saved_frozen=is_second_level,
)

is_trainable = lora.is_trainable
method_summary = lora.method_summary
save_peft_adapter = lora.save_peft_adapter
__all__ = [
    "QLoraConfig",
    "adapt",
    "dequantized_base",
    "init_method",
    "is_trainable",
    "method_summary",
    "plan_qlora",
    "save_merged",
    "save_peft_adapter",
]
