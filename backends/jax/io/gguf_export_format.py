"""The `gguf` export format (methods' `formats` records): write, reload and what ftc computes.

    "gguf": gguf_format(lambda model, params: params)             # full (methods/full.py)
    "gguf": gguf_format(merged)                                   # lora, qlora: merged, as "hf"

`verify` compares the file as a loader reads it with ftc's model on the weights the file holds:
ftc's side rounds each weight the way the GGUF stores it (float16 / bfloat16, or quantised to
q8_0 / q4_0 and back, block by block along each matrix's rows), so the check measures the export,
not the quantisation. The loader is transformers' GGUF loader where it reads the architecture
(llama, which Mistral is written as, qwen2, qwen3) and every key the model needs
(`transformers_misreads`), else ftc's own GGUF import (gguf_import.py) into an HF directory that
transformers loads.
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
from flax import linen as nn
from flax import traverse_util

from ftc.backends.jax.io import export_common as ex
from ftc.backends.jax.io import gguf_export, hf_checkpoint, verify
from ftc.backends.jax.io.model_source import gguf_file
from ftc.backends.jax.methods.contract import ExportFormat

# general.architecture values transformers' GGUF loader reads (the others go through ftc's import).
TRANSFORMERS_READS = ("llama", "qwen2", "qwen3")


def layout_for(model) -> gguf_export.Layout:
    # the decoder arch names its model_type (one family, several types); a family of one type
    # (GPT-2) has an arch without it, which the refusal called "model_type None"
    types = model.family.model_types
    model_type = getattr(model.arch, "model_type", None) or (types[0] if len(types) == 1 else None)
    problem = gguf_export.layout_problem(model_type, model.arch)
    if problem:
        raise ex.ExportError(f"cannot export GGUF: {problem}")
    return gguf_export.LAYOUTS[model_type]


def write(trained, out: Path, dtype: str, family_params) -> None:
    m = trained.model
    layout_for(m)
    params = family_params(m, trained.params)
    tensors = hf_checkpoint._hf_tensors_of(m.family, m.arch, params)
    if jax.process_index() != 0:
        for _ in tensors:  # the other processes take part in the gathers
            pass
        return
    try:
        tok = gguf_export.write_gguf(
            out / gguf_export.GGUF_FILE,
            model_type=m.arch.model_type,
            arch=m.arch,
            tensors=tensors,
            tokenizer_dir=trained.tokenizer_dir,
            dtype=dtype,
            name=trained.spec.name,
            source_gguf=gguf_file(trained.spec.model.base),
        )
    except (gguf_export.GgufExportError, ValueError) as e:
        raise ex.ExportError(str(e)) from e
    gguf_export.write_modelfile(out, tok)


def stored_params(model, params, dtype: str):
    """The family's params with every weight as the GGUF file holds it (see the module docstring)."""
    layout = layout_for(model)
    if dtype == "float32":
        return params
    family, arch = model.family, model.arch
    specs = family.hf_tensors(arch)
    stacked = hf_checkpoint._stacked_paths(family, arch)
    flat = traverse_util.flatten_dict(nn.meta.unbox(params), sep="/")

    def one(spec, hf_name: str, a: np.ndarray) -> np.ndarray:
        hf = np.asarray(spec.to_hf(a), np.float32)
        if layout.norm_plus_one and hf_name.endswith("norm.weight"):
            return spec.to_flax((hf + np.float32(1.0)) - np.float32(1.0))
        return spec.to_flax(gguf_export.as_stored(hf, dtype, hf_name))

    out = {}
    for path, spec in specs.items():
        host = np.asarray(jax.device_get(flat[path]), np.float32)
        if path in stacked:
            out[path] = np.stack([one(spec, name, host[i]) for i, name in enumerate(spec.names)])
        else:
            out[path] = one(spec, spec.names[0], host)
    return traverse_util.unflatten_dict(out, sep="/")


def weights_check(model, out: Path, held) -> dict:
    """Every tensor of the file, dequantised, against `held`, the weights ftc's side of `verify`
    computes with (`ftc_side`'s params, in llama.cpp's layout here): equal bit for bit, or the largest
    difference and where."""
    import gguf

    layout = layout_for(model)
    ours = {
        gguf_export.gguf_name(name): gguf_export._tensor(name, a, layout, model.arch)
        for name, a in hf_checkpoint._hf_tensors_of(model.family, model.arch, held)
        if not (name == "lm_head.weight" and model.arch.tie_word_embeddings)
    }
    worst, where, count = 0.0, None, 0
    for t in gguf.GGUFReader(str(Path(out) / gguf_export.GGUF_FILE)).tensors:
        if t.name not in ours:
            continue  # rope_freqs.weight: the RoPE config, not a weight
        mine = ours.pop(t.name)
        theirs = np.asarray(gguf.dequantize(t.data, t.tensor_type), np.float32).reshape(mine.shape)
        diff = float(np.abs(theirs - mine).max()) if mine.size else 0.0
        count += 1
        if diff > worst:
            worst, where = diff, t.name
    return {
        "tensors": count,
        "missing": sorted(ours),
        "max_abs_diff": worst,
        "at": where,
        "ok": worst == 0 and not ours,
    }


def transformers_misreads(model) -> str | None:
    """Why transformers' GGUF loader would build another model than the file holds, or None.
    Its GGUF config mapping (transformers.integrations.ggml) reads no RoPE scaling (only gpt-oss's;
    llama.cpp reads rope.scaling.* and rope_freqs.weight), no attention_bias / mlp_bias (the bias
    tensors of a Llama are then dropped), and no head_dim for qwen3 (it keeps Qwen3Config's 128 and
    fails to load any other). Verifying through it would fail a correct file, or crash."""
    layout, arch = layout_for(model), model.arch
    if layout.arch not in TRANSFORMERS_READS:
        return f"it does not read general.architecture {layout.arch!r}"
    rope = getattr(arch, "rope", None)
    if rope is not None and rope.kind != "default":
        return f"it reads no RoPE scaling ({rope.kind!r})"
    if layout.arch == "llama" and any(getattr(arch, k, False) for k in ("qkv_bias", "o_bias", "mlp_bias")):
        return "it reads no attention_bias / mlp_bias"
    if layout.arch == "qwen3" and arch.head_dim != 128:
        return f"it reads no Qwen3 head_dim (assumes 128, here {arch.head_dim})"
    return None


def reload(trained, out: Path, scratch: Path, causal: bool):
    """The GGUF as a PyTorch model: transformers' GGUF loader, or ftc's import then transformers."""
    import torch
    from transformers import AutoModelForCausalLM

    if transformers_misreads(trained.model) is None:
        return AutoModelForCausalLM.from_pretrained(
            str(out), gguf_file=gguf_export.GGUF_FILE, dtype=torch.float32
        ).eval()
    from ftc.backends.jax.io.gguf_import import convert_gguf

    hf_dir = Path(scratch) / "from-gguf"
    hf_dir.mkdir()
    convert_gguf(Path(out) / gguf_export.GGUF_FILE, hf_dir)
    return verify.load_reference(hf_dir, causal=True)


def loader_name(model) -> str:
    """Which loader `reload` uses for the MethodModel `model` (the certificate records it)."""
    why = transformers_misreads(model)
    if why is None:
        return "transformers GGUF loader (from_pretrained gguf_file=)"
    return f"ftc GGUF import (gguf_import.convert_gguf) + transformers (not transformers' GGUF loader: {why})"


def how_to_load(out, base_name, auto: str) -> str:
    path = Path(out) / gguf_export.GGUF_FILE
    return (
        f"llama-cli -m {path}  |  ollama create NAME -f {Path(out) / gguf_export.MODELFILE}  |  "
        f"{auto}.from_pretrained({str(out)!r}, gguf_file={gguf_export.GGUF_FILE!r})"
    )


def gguf_format(family_params) -> ExportFormat:
    """The `gguf` ExportFormat of a method whose trained model is the family's params
    `family_params(MethodModel, params)` (LoRA: merged)."""
    return ExportFormat(
        write=lambda trained, out, dtype: write(trained, out, dtype, family_params),
        how_to_load=how_to_load,
        ftc_side=lambda model, params, dtype: (model.base, stored_params(model, family_params(model, params), dtype)),
        reload=reload,
    )
