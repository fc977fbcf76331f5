"""Model FLOPs per trained token and device peaks: the two halves of MFU.

Model FLOPs follow the PaLM paper's appendix B (the convention MaxText, Levanter and torchtitan
report): a weight matmul costs 2 FLOPs per weight per token forward, 2 more backward for the
activation gradient and 2 more for the weight gradient when the weight trains; attention's score
and value matmuls cost 12 * layers * seq_len * (heads * head_dim) per token over forward and
backward (not halved for causal masking). Rematerialisation's recomputation is not model work and
is not counted, so MFU does not rise by recomputing.

    full fine-tune    6 N + attention
    LoRA / adapters   4 N + 6 N_adapter + attention   (frozen weights need no weight gradient)
    DPO               + a forward of the reference model: 2 N + attention / 3

N counts every weight that takes part in a matmul per token: the projections and the LM head
(also when tied to the embedding). The embedding lookup is a gather and costs nothing here.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class MatmulWeights:
    base: int  # N: the model's matmul weights (projections + LM head)
    base_trained: int  # of those, how many train (all for a full fine-tune, 0 for LoRA)
    adapter: int  # weights a method adds that train and take part in matmuls (LoRA A/B)


def train_flops_per_token(
    weights: MatmulWeights, *, layers: int, seq_len: int, attention_width: int, reference_forward: bool = False
) -> float:
    """Model FLOPs to train on one token (forward + backward) under the convention above.
    `attention_width` = heads * head_dim; `reference_forward`: the objective also runs a frozen
    reference model forward (DPO)."""
    attention = 12.0 * layers * seq_len * attention_width
    flops = 4.0 * weights.base + 2.0 * weights.base_trained + 6.0 * weights.adapter + attention
    if reference_forward:
        flops += 2.0 * weights.base + attention / 3.0
    return flops


# Data-sheet dense peaks per device (one jax device), TFLOP/s in bfloat16/float16.
# TPU v4 and v5p devices are whole chips (megacore); v5e and v6e have one core per chip.
PEAK_BF16_TFLOPS = (
    ("h100 pcie", 756.0),
    ("h100", 989.4),  # SXM / HBM3
    ("h200", 989.4),
    ("gh200", 989.4),
    ("b200", 2250.0),
    ("a100", 312.0),
    ("l40s", 362.0),
    ("l4", 121.0),
    ("a10g", 70.0),
    ("tpu v6 lite", 918.0),
    ("tpu v6e", 918.0),
    ("tpu v5 lite", 197.0),
    ("tpu v5e", 197.0),
    ("tpu v5p", 459.0),
    ("tpu v5", 459.0),
    ("tpu v4", 275.0),
)


def datasheet_peak_flops(device_kind: str, compute_dtype: str) -> float | None:
    """The data-sheet peak FLOP/s of a device kind (`jax.Device.device_kind`) in a 16-bit compute
    dtype; None for float32 compute or a device not listed (the first matching entry wins, so more
    specific names come first)."""
    if compute_dtype not in ("bfloat16", "float16"):
        return None
    kind = device_kind.lower()
    for name, tflops in PEAK_BF16_TFLOPS:
        if name in kind:
            return tflops * 1e12
    return None


def mfu(flops_per_token: float, tokens_per_second: float, peak_flops_per_device: float, devices: int) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the peak of every device in the run."""
    return flops_per_token * tokens_per_second / (peak_flops_per_device * devices)
