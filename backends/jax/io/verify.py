"""Does ftc compute what transformers computes? One fixed batch through both, the largest difference.

    result = verify_model("path/to/hf_dir")          # ftc (JAX) vs transformers (PyTorch), float32
    result.max_abs_diff, result.ok

The batch is deterministic (token ids drawn from a seeded generator within the vocabulary) and
right-padded to different lengths, so the attention mask is exercised; only real tokens are
compared. Causal LMs compare logits; encoders (no LM head) compare the last hidden states.

The check passes when max |ftc - transformers| <= tol * max(1, max |transformers output|): an
absolute tolerance for outputs of order one, scaled for real models with large logits. Two correct
float32 stacks drift apart with depth (rounding compounds over layers): on SmolLM2-135M (30 layers,
logits up to ~32) they differ by ~5e-4, while transformers alone differs from itself by ~1e-4 when
the same row is run inside or outside a batch, and a wrong layout or RoPE differs by ~1e-1.
`ftc model verify` and `ftc export --verify` are thin wrappers over this module.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import numpy as np

DEFAULT_TOL = 1e-4  # float32, relative to the output scale (see the module docstring)


class ReferenceUnavailable(RuntimeError):
    """The PyTorch reference cannot run here (torch is not installed)."""


@dataclasses.dataclass(frozen=True)
class Batch:
    input_ids: np.ndarray  # int32 [B, T]
    attention_mask: np.ndarray  # int32 [B, T], 1 = real token, right padding
    positions: np.ndarray  # int32 [B, T]


@dataclasses.dataclass(frozen=True)
class VerifyResult:
    model_dir: Path
    output: str  # "logits" or "hidden"
    max_abs_diff: float  # over real (unpadded) tokens
    max_abs_reference: float  # scale of the reference outputs, to read the difference against
    tol: float
    shape: tuple[int, ...]  # [B, T, vocab or hidden]
    real_tokens: int
    ftc_load_seconds: float
    ftc_forward_seconds: float
    torch_load_seconds: float
    torch_forward_seconds: float
    greedy: str = ""  # the export certificate's greedy-continuation verdict (certificate.py); "" when not run
    greedy_ok: bool = True

    @property
    def threshold(self) -> float:
        """The largest allowed max_abs_diff: tol scaled by the output magnitude (at least 1)."""
        return self.tol * max(1.0, self.max_abs_reference)

    @property
    def ok(self) -> bool:
        return bool(np.isfinite(self.max_abs_diff)) and self.max_abs_diff <= self.threshold and self.greedy_ok

    def summary(self) -> str:
        verdict = "OK" if self.ok else "FAILED"
        b, t = self.shape[:2]
        return (
            f"{verdict}: max |{self.output} ftc - transformers| = {self.max_abs_diff:.3g} "
            f"(allowed {self.threshold:.3g} = tol {self.tol:.3g} x max(1, max |reference| "
            f"{self.max_abs_reference:.3g})) over {self.real_tokens} real tokens in a {b}x{t} padded batch\n"
            f"  ftc load {self.ftc_load_seconds:.2f} s, forward {self.ftc_forward_seconds:.2f} s; "
            f"transformers load {self.torch_load_seconds:.2f} s, forward {self.torch_forward_seconds:.2f} s"
        ) + (f"\n  {self.greedy}" if self.greedy else "")


def fixed_batch(vocab_size: int, batch: int = 2, seq_len: int = 16, seed: int = 0) -> Batch:
    """Seeded token ids in [0, vocab_size); row i is right-padded to length max(1, seq_len - 3i)."""
    if batch < 1 or seq_len < 1:
        raise ValueError(f"batch={batch}, seq_len={seq_len}: both must be >= 1")
    ids = np.random.default_rng(seed).integers(0, vocab_size, size=(batch, seq_len)).astype(np.int32)
    lengths = np.maximum(1, seq_len - 3 * np.arange(batch))
    mask = (np.arange(seq_len)[None, :] < lengths[:, None]).astype(np.int32)
    ids = np.where(mask == 1, ids, 0).astype(np.int32)  # pad id 0: any id works, it is masked
    positions = np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch, seq_len)).copy()
    return Batch(ids, mask, positions)


def is_causal_lm(hf_config: dict) -> bool:
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in hf_config.get("architectures") or ())


def ftc_outputs(loaded, batch: Batch, output: str) -> np.ndarray:
    """Outputs of a `hf_checkpoint.LoadedModel` on `batch`, float32 numpy."""
    import jax
    import jax.numpy as jnp

    module = loaded.family.build(loaded.arch, jnp.float32)

    @jax.jit
    def forward(params, input_ids, attention_mask, positions):
        return module.apply(
            {"params": params}, input_ids, attention_mask=attention_mask, positions=positions, output=output
        )

    out = forward(loaded.params, batch.input_ids, batch.attention_mask, batch.positions)
    return np.asarray(jax.device_get(out), dtype=np.float32)


def require_torch() -> None:
    try:
        import torch  # noqa: F401
    except ImportError as e:
        raise ReferenceUnavailable(
            "the transformers reference needs PyTorch, which is not installed; "
            "install it with `pip install 'ftc[torch]'` (CPU wheel torch==2.13.0)"
        ) from e


def load_reference(model_dir: str | os.PathLike, *, causal: bool):
    """The transformers PyTorch model of a local directory, float32, eval mode, no remote code."""
    require_torch()
    import torch
    from transformers import AutoModel, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    auto = AutoModelForCausalLM if causal else AutoModel
    return auto.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True, trust_remote_code=False).eval()


def reference_outputs(model, batch: Batch, output: str) -> np.ndarray:
    """Outputs of a transformers PyTorch model on `batch`, float32 numpy."""
    import torch

    args = {
        "input_ids": torch.as_tensor(batch.input_ids, dtype=torch.long),
        "attention_mask": torch.as_tensor(batch.attention_mask, dtype=torch.long),
        "position_ids": torch.as_tensor(batch.positions, dtype=torch.long),
    }
    with torch.no_grad():
        out = model(**args)
    result = out.logits if output == "logits" else out.last_hidden_state
    return result.float().numpy()


def compare(ftc_out: np.ndarray, reference: np.ndarray, batch: Batch) -> tuple[float, float]:
    """(max |ftc - reference|, max |reference|) over real tokens."""
    if ftc_out.shape != reference.shape:
        raise ValueError(f"ftc output shape {ftc_out.shape} != transformers output shape {reference.shape}")
    real = batch.attention_mask.astype(bool)
    diff = np.abs(ftc_out[real].astype(np.float64) - reference[real].astype(np.float64))
    return float(diff.max()), float(np.abs(reference[real]).max())


def verify_model(
    model_dir: str | os.PathLike,
    *,
    batch: int = 2,
    seq_len: int = 16,
    tol: float = DEFAULT_TOL,
    seed: int = 0,
    loaded=None,
) -> VerifyResult:
    """Run one fixed batch through ftc and transformers (both float32) and compare.

    `model_dir` is a local HF directory (see model_source.resolve_model_source). `loaded` is an
    already loaded ftc model to check against that directory (what `ftc export --verify` passes);
    by default the directory is loaded with hf_checkpoint.load_model in float32.
    """
    import jax.numpy as jnp

    from ftc.backends.jax.io import hf_checkpoint

    require_torch()  # before the slow part, so a machine without torch hears it at once
    model_dir = Path(model_dir)
    started = time.perf_counter()
    if loaded is None:
        loaded = hf_checkpoint.load_model(model_dir, dtype=jnp.float32)
    ftc_load = time.perf_counter() - started
    hf_config = loaded.hf_config
    causal = is_causal_lm(hf_config)
    output = "logits" if causal else "hidden"

    started = time.perf_counter()
    reference_model = load_reference(model_dir, causal=causal)
    torch_load = time.perf_counter() - started

    fixed = fixed_batch(int(hf_config["vocab_size"]), batch, seq_len, seed)
    started = time.perf_counter()
    ours = ftc_outputs(loaded, fixed, output)
    ftc_forward = time.perf_counter() - started
    started = time.perf_counter()
    reference = reference_outputs(reference_model, fixed, output)
    torch_forward = time.perf_counter() - started

    max_diff, scale = compare(ours, reference, fixed)
    return VerifyResult(
        model_dir=model_dir,
        output=output,
        max_abs_diff=max_diff,
        max_abs_reference=scale,
        tol=tol,
        shape=tuple(reference.shape),
        real_tokens=int(fixed.attention_mask.sum()),
        ftc_load_seconds=ftc_load,
        ftc_forward_seconds=ftc_forward,
        torch_load_seconds=torch_load,
        torch_forward_seconds=torch_forward,
    )
