"""QLoRA (Dettmers et al. 2023): LoRA over a frozen base whose linear layers are stored in NF4.

The transformation is lora.py's `LoraModel` with a quantisation config: every Dense inside the
scanned blocks (the "all-linear" set, LoRA target or not; the LM head and embeddings stay in
their own dtype, as bitsandbytes leaves them) keeps its kernel as NF4 codes packed two per uint8
plus blockwise absmax scales (`quant_block_size` values per block, default 64), optionally double
quantised (nf4.py). Inside the model the intercepted Dense dequantises its kernel to the compute
dtype and runs the matmul; LoRA's A and B (float32, trained) sit on top as in plain LoRA.

Frozen base bytes: 0.5 byte per weight for the codes, + 4 / block_size for float32 scales
(0.5625 per weight at block 64, 0.281 x bfloat16), or + ~1 / block_size with double quantisation
(0.516 per weight, 0.258 x bfloat16).

Export is LoRA's: `save_peft_adapter` writes the adapter (served on the original, unquantised
base, as PEFT does with bitsandbytes QLoRA adapters); `save_merged` dequantises the base and folds
scale * A @ B into it, so the merged checkpoint computes exactly what the trained QLoRA model did.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from ftc.backends.jax.methods import lora


@dataclasses.dataclass(frozen=True)
class QLoraConfig:
    """The spec's [method] keys for kind = "qlora" (defaults as in spec_keys)."""

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    rslora: bool = False
    targets: str | tuple[str, ...] = lora.ALL_LINEAR
    quant_block_size: int = 64
    double_quant: bool = False

    def __post_init__(self):
        b = self.quant_block_size
        if not isinstance(b, int) or isinstance(b, bool) or b < 2 or b % 2:
            raise ValueError(f"[method].quant_block_size={b!r}: expected an even integer >= 2")
        self.lora  # validates the LoRA keys

    @classmethod
    def from_spec(cls, method) -> "QLoraConfig":
        given = {f.name: getattr(method, f.name) for f in dataclasses.fields(cls)
                 if getattr(method, f.name, None) is not None}
        return cls(**given)

    @property
    def lora(self) -> lora.LoraConfig:
        return lora.LoraConfig(self.rank, self.alpha, self.dropout, self.rslora,
                               tuple(self.targets) if isinstance(self.targets, list) else self.targets)

    @property
    def quant(self) -> lora.QuantConfig:
        return lora.QuantConfig(self.quant_block_size, bool(self.double_quant))


def plan_qlora(family, arch, config: QLoraConfig) -> lora.LoraPlan:
    return lora.plan_lora(family, arch, config.lora, quant=config.quant)


def adapt(family, arch, module, config: QLoraConfig) -> lora.LoraModel:
    """The transformed model: what the training core builds instead of `family.build(arch, dtype)`.
    Its params come from `lora.init_params(model, loaded_params, rng)` (which quantises)."""
    return lora.LoraModel(module, plan_qlora(family, arch, config))


def init_method(loaded, config: QLoraConfig, rng: jax.Array, *, dtype=jnp.bfloat16, shardings=None) -> lora.Method:
    """QLoRA on a `hf_checkpoint.LoadedModel`: quantises its linear layers, adds LoRA factors."""
    return lora.init_method(loaded, config.lora, rng, dtype=dtype, quant=config.quant, shardings=shardings)


def dequantized_base(plan: lora.LoraPlan, params):
    """The family's plain params with every NF4 kernel dequantised (float32), without LoRA: the
    base model a QLoRA run actually trained against."""
    return lora.merged_params(plan, params, include_lora=False)


is_trainable = lora.is_trainable
method_summary = lora.method_summary
save_peft_adapter = lora.save_peft_adapter
save_merged = lora.save_merged
