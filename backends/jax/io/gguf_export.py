"""`ftc export --format gguf`: a decoder as one GGUF file llama.cpp and Ollama serve, and a Modelfile.

    out/model.gguf     tensors in llama.cpp's names and layouts (the inverse of gguf_import's map),
                       the architecture keys, the tokenizer (gguf_export_vocab.py), the chat template
                       and the EOS / end-of-turn ids
    out/Modelfile      Ollama: FROM ./model.gguf, TEMPLATE from the chat template, stop parameters

Written the way llama.cpp's convert_hf_to_gguf.py writes each architecture (its LlamaModel,
Qwen2Model, Qwen3Model and GemmaModel classes): Llama's Q/K rows (and biases) permuted for its
RoPE, no output.weight when the LM head is the embedding, Gemma's norm weights stored as 1 + w
(llama.cpp multiplies by the weight, transformers by 1 + weight), Llama 3 RoPE scaling as the
rope_freqs.weight tensor. Mistral is llama.cpp's `llama` architecture, as its converter writes it.
Norms and biases stay float32 at every dtype; q8_0 / q4_0 quantise every matrix whose rows are a
whole number of 32-value blocks (the `gguf` package's quantiser; others float16, as llama.cpp does),
q4_0 all but the embedding and LM head, which stay q8_0.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from ftc.backends.jax.io import gguf_export_vocab as vocab
from ftc.backends.jax.io.gguf_config import llama3_rope_factors
from ftc.backends.jax.io.gguf_import import _GLOBAL_NAMES, _LAYER_NAMES, permute_rope

GGUF_FILE = "model.gguf"
MODELFILE = "Modelfile"
# export.dtype -> GGML tensor type of the matrices; 1-D tensors are float32 in every case.
QTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "q8_0": "Q8_0", "q4_0": "Q4_0"}
FILE_TYPES = {"float32": "ALL_F32", "float16": "MOSTLY_F16", "bfloat16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}
FILE_TYPES["q4_0"] = "MOSTLY_Q4_0"
QUANTIZED = ("q8_0", "q4_0")
# `--verify`'s default tolerance where it is not verify.DEFAULT_TOL: a q4_0 model's activations amplify
# float32 rounding (the quickstart's SmolLM2: 6.2e-3 on logits of 32 while its weights are checked bit for bit)
VERIFY_TOL = {"q4_0": 1e-3}


GgufExportError = vocab.GgufExportError


@dataclasses.dataclass(frozen=True)
class Layout:
    """How llama.cpp lays out one transformers model_type (convert_hf_to_gguf.py's class for it)."""

    arch: str  # general.architecture
    permute_qk: bool = False  # LlamaModel.permute on q/k weights and biases
    norm_plus_one: bool = False  # GemmaModel: norm weights stored as 1 + w
    vocab_size_key: bool = False  # <arch>.vocab_size (LlamaModel writes it)
    act: str = "silu"  # the activation llama.cpp's graph for `arch` computes


LAYOUTS = {
    "llama": Layout("llama", permute_qk=True, vocab_size_key=True),
    "mistral": Layout("llama", permute_qk=True, vocab_size_key=True),
    "qwen2": Layout("qwen2"),
    "qwen3": Layout("qwen3"),
    "gemma": Layout("gemma", norm_plus_one=True, act="gelu_pytorch_tanh"),
}
_TO_GGUF_GLOBAL = {hf: g for g, hf in _GLOBAL_NAMES.items()}
_TO_GGUF_LAYER = {hf: g for g, hf in _LAYER_NAMES.items()}


def gguf_name(hf_name: str) -> str:
    """llama.cpp's name of an HF tensor (the inverse of gguf_import.hf_tensor_name)."""
    if hf_name in _TO_GGUF_GLOBAL:
        return _TO_GGUF_GLOBAL[hf_name]
    parts = hf_name.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in _TO_GGUF_LAYER:
        return f"blk.{parts[2]}.{_TO_GGUF_LAYER[parts[3]]}"
    raise GgufExportError(f"tensor {hf_name!r} has no llama.cpp name")


def layout_problem(model_type: str | None, arch) -> str | None:
    """Why this model cannot be served from GGUF as ftc computes it, or None."""
    if model_type not in LAYOUTS:
        return (
            f"model_type {model_type!r} has no GGUF layout in ftc (llama.cpp layouts ftc writes: "
            f"{', '.join(sorted(LAYOUTS))})"
        )
    layout = LAYOUTS[model_type]
    if arch.hidden_act != layout.act:
        return f"hidden_act {arch.hidden_act!r}: llama.cpp's {layout.arch} graph computes {layout.act!r}"
    if not arch.causal:
        return "a bidirectional model is not a causal LM llama.cpp generates with"
    if arch.sliding_window is not None and any(arch.sliding_layers or (True,)):
        if arch.sliding_window < arch.max_position_embeddings:
            return (
                f"sliding_window={arch.sliding_window} (< {arch.max_position_embeddings} positions): llama.cpp's "
                f"{layout.arch} graph attends to the whole context, so served outputs would differ past "
                f"{arch.sliding_window} tokens"
            )
    if layout.arch in ("qwen3", "gemma") and (arch.qkv_bias or arch.o_bias):
        # llama.cpp builds these graphs without attention biases and refuses a file with tensors
        # it does not create; dropping them would serve another model.
        return f"attention_bias=true: llama.cpp's {layout.arch} graph has no attention biases"
    if arch.rope.kind not in ("default", "linear", "llama3"):
        return f"RoPE {arch.rope.kind!r} has no GGUF form ftc writes"
    if arch.rope.kind == "llama3" and layout.arch != "llama":
        return f"Llama 3 RoPE scaling in a {layout.arch} model has no GGUF form llama.cpp reads"
    return None


def _architecture_keys(w, layout: Layout, arch) -> None:
    import gguf

    w.add_context_length(arch.max_position_embeddings)
    w.add_embedding_length(arch.hidden_size)
    w.add_block_count(arch.num_layers)
    w.add_feed_forward_length(arch.intermediate_size)
    w.add_head_count(arch.num_heads)
    w.add_head_count_kv(arch.num_kv_heads)
    w.add_layer_norm_rms_eps(arch.rms_norm_eps)
    w.add_rope_freq_base(arch.rope.theta)
    if layout.arch != "gemma":
        w.add_rope_dimension_count(arch.head_dim)
    if layout.arch == "gemma" or arch.head_dim != arch.hidden_size // arch.num_heads:
        w.add_key_length(arch.head_dim)
        w.add_value_length(arch.head_dim)
    if layout.vocab_size_key:
        w.add_vocab_size(arch.vocab_size)
    if arch.rope.kind == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(arch.rope.factor)
    elif arch.rope.kind == "llama3":  # llama.cpp reads the factors from rope_freqs.weight
        w.add_rope_scaling_orig_ctx_len(arch.rope.original_max_position_embeddings)


def _tensor(hf_name: str, array: np.ndarray, layout: Layout, arch) -> np.ndarray:
    """An HF tensor in llama.cpp's layout (float32)."""
    a = np.asarray(array, dtype=np.float32)
    if layout.permute_qk and hf_name.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
        a = permute_rope(a, arch.num_heads)
    elif layout.permute_qk and hf_name.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias")):
        a = permute_rope(a, arch.num_kv_heads)
    if layout.norm_plus_one and hf_name.endswith("norm.weight"):
        a = a + np.float32(1.0)
    return np.ascontiguousarray(a)


# q4_0 keeps the embedding and the LM head in q8_0: llama.cpp's quantizer also gives them more bits
# (Q6_K there, which the gguf package cannot write), as 4 bits there cost the most accuracy.
_Q4_0_KEEPS_Q8_0 = ("model.embed_tokens.weight", "lm_head.weight")


def stored(a: np.ndarray, dtype: str, hf_name: str = "") -> tuple[np.ndarray, str]:
    """(bytes or values as written, GGML type name) for one llama.cpp-layout float32 tensor."""
    import gguf

    qtype = "Q8_0" if dtype == "q4_0" and hf_name in _Q4_0_KEEPS_Q8_0 else QTYPES[dtype]
    if a.ndim == 1 or qtype == "F32":
        return a, "F32"
    if qtype == "F16":
        return a.astype(np.float16), "F16"
    if qtype in ("Q8_0", "Q4_0") and a.shape[-1] % 32:
        return a.astype(np.float16), "F16"  # rows that are not whole blocks: llama.cpp's fallback too
    kind = gguf.GGMLQuantizationType[qtype]
    return gguf.quants.quantize(a, kind), qtype


def as_stored(a: np.ndarray, dtype: str, hf_name: str = "") -> np.ndarray:
    """What a reader gets back from `stored(a, dtype, hf_name)` (float32): the values the GGUF holds."""
    import gguf

    data, qtype = stored(a, dtype, hf_name)
    if qtype in ("F32", "F16"):
        return np.asarray(data, np.float32)
    return np.asarray(gguf.quants.dequantize(data, gguf.GGMLQuantizationType[qtype]), np.float32).reshape(a.shape)


def write_gguf(
    path: Path,
    *,
    model_type: str,
    arch,
    tensors,
    tokenizer_dir: Path | None,
    dtype: str,
    name: str,
    source_gguf: Path | None = None,
) -> vocab.Vocab:
    """Write one GGUF file. `tensors`: (HF name, HF-layout array) pairs, one at a time
    (hf_checkpoint._hf_tensors_of); `arch`: the family's DecoderArch. Returns the tokenizer
    fields written (the Modelfile and the certificate read them)."""
    import gguf

    if dtype not in QTYPES:
        raise GgufExportError(f"GGUF dtype {dtype!r}: expected one of {', '.join(QTYPES)}")
    problem = layout_problem(model_type, arch)
    if problem:
        raise GgufExportError(f"cannot export GGUF: {problem}")
    if tokenizer_dir is None:
        raise GgufExportError("cannot export GGUF: the run has no tokenizer files, and a GGUF must carry one")
    layout = LAYOUTS[model_type]
    tok = vocab.read_vocab(tokenizer_dir, arch.vocab_size, source_gguf=source_gguf)
    w = gguf.GGUFWriter(str(path), layout.arch)
    w.add_name(name)
    w.add_file_type(gguf.LlamaFileType[FILE_TYPES[dtype]])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _architecture_keys(w, layout, arch)
    vocab.add_to_writer(w, tok)
    if arch.rope.kind == "llama3":
        r = arch.rope
        factors = llama3_rope_factors(
            r.theta, arch.head_dim, r.factor, r.low_freq_factor, r.high_freq_factor, r.original_max_position_embeddings
        )
        w.add_tensor("rope_freqs.weight", factors)
    for hf_name, array in tensors:
        if hf_name == "lm_head.weight" and arch.tie_word_embeddings:
            continue
        data, qtype = stored(_tensor(hf_name, array, layout, arch), dtype, hf_name)
        if qtype in ("F32", "F16"):
            w.add_tensor(gguf_name(hf_name), data)
        else:
            w.add_tensor(gguf_name(hf_name), data, raw_dtype=gguf.GGMLQuantizationType[qtype])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tok


def write_modelfile(out: Path, tok: vocab.Vocab, gguf_file: str = GGUF_FILE) -> None:
    """Ollama's Modelfile beside the GGUF: its TEMPLATE (Go template) comes from the chat template
    (gguf_export_vocab.ollama_template), its stop parameters are the end-of-turn / EOS tokens."""
    lines = [f"FROM ./{gguf_file}", ""]
    template = vocab.ollama_template(tok)
    if template is not None:
        lines += [f'TEMPLATE """{template}"""', ""]
    for stop in tok.stop_texts():
        lines.append(f"PARAMETER stop {_quote(stop)}")
    (out / MODELFILE).write_text("\n".join(lines).rstrip() + "\n")


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
