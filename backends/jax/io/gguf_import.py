"""A GGUF file (llama.cpp's format) becomes a local Hugging Face directory ftc loads like any other.

    import_gguf("SmolLM2-135M-Instruct.Q4_1.gguf") -> ~/.cache/ftc/gguf/<sha256[:16]>-v1/
        config.json            Llama / Qwen2 / Qwen3 config rebuilt from the GGUF metadata
        model.safetensors      float32 (dequantised), HF tensor names, Llama Q/K un-permuted
        tokenizer.json, tokenizer_config.json (with the chat template), special tokens
        ftc_gguf_source.json   where it came from (file, sha256, converter version)

Tensors are read and dequantised with the `gguf` package (numpy; no torch). The tokenizer is built
by transformers' own GGUF tokenizer conversion. A conversion is written into a temporary directory
and renamed into place, so an interrupted one never leaves a half-written model in the cache, and
the cache key (file hash + converter version) makes a second call free.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import socket
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

# Bump when the output of a conversion changes, so stale cache entries are not reused.
CONVERTER_VERSION = 1
SOURCE_RECORD = "ftc_gguf_source.json"
# One safetensors shard is held in memory while it is written; larger models get several shards.
MAX_SHARD_BYTES = 4 * 1024**3


@dataclasses.dataclass(frozen=True)
class GgufArch:
    """How one llama.cpp architecture maps onto a transformers model."""

    model_type: str
    architecture: str
    permuted_qk: bool               # llama.cpp's converter permutes Q/K rows (Llama only)
    config_head_dim: bool = True    # the config class has a head_dim field
    required: tuple[str, ...] = ()  # per-layer HF tensors beyond the Llama core it always has
    extra_config: tuple[tuple[str, Any], ...] = ()


ARCHITECTURES = {
    "llama": GgufArch("llama", "LlamaForCausalLM", permuted_qk=True),
    "qwen2": GgufArch("qwen2", "Qwen2ForCausalLM", permuted_qk=False, config_head_dim=False,
                      required=("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
                      extra_config=(("use_sliding_window", False),)),
    "qwen3": GgufArch("qwen3", "Qwen3ForCausalLM", permuted_qk=False,
                      required=("self_attn.q_norm.weight", "self_attn.k_norm.weight")),
}
SUPPORTED_ARCHITECTURES = tuple(ARCHITECTURES)
_BY_MODEL_TYPE = {a.model_type: a for a in ARCHITECTURES.values()}


class GgufImportError(ValueError):
    """A GGUF file ftc cannot turn into a Hugging Face checkpoint; the message names the file."""


# ----------------------------------------------------------------------------------------------
# Cache


def default_cache_root() -> Path:
    """`$FTC_CACHE`, else `$XDG_CACHE_HOME/ftc`, else `~/.cache/ftc`."""
    if os.environ.get("FTC_CACHE"):
        return Path(os.environ["FTC_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "ftc"


def file_sha256(path: Path, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def import_gguf(gguf_path: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None) -> Path:
    """The cached HF directory converted from `gguf_path`, converting it first if needed.

    `cache_dir` is ftc's cache root (default `default_cache_root()`); conversions live under
    `<cache_dir>/gguf/<sha256 prefix>-v<CONVERTER_VERSION>/`.
    """
    path = Path(gguf_path).expanduser()
    if not path.is_file():
        raise GgufImportError(f"{path}: GGUF file not found")
    root = (Path(cache_dir).expanduser() if cache_dir is not None else default_cache_root()) / "gguf"
    sha = file_sha256(path)
    final = root / f"{sha[:16]}-v{CONVERTER_VERSION}"
    if (final / "config.json").is_file():
        return final

    root.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_temps(root)
    tmp = root / f".tmp-{final.name}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        started = time.perf_counter()
        convert_gguf(path, tmp)
        record = {"gguf_file": str(path.resolve()), "sha256": sha, "converter_version": CONVERTER_VERSION,
                  "convert_seconds": round(time.perf_counter() - started, 3)}
        (tmp / SOURCE_RECORD).write_text(json.dumps(record, indent=2) + "\n")
        try:
            os.rename(tmp, final)  # atomic: the directory appears complete or not at all
        except OSError:
            if not (final / "config.json").is_file():
                raise
            shutil.rmtree(tmp)  # another process finished the same conversion first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _remove_abandoned_temps(root: Path) -> None:
    """Delete temp dirs of conversions killed on this host (their process no longer exists)."""
    host = socket.gethostname()
    for tmp in root.glob(".tmp-*"):
        m = re.fullmatch(r"\.tmp-.+-v\d+-(.+)-(\d+)-[0-9a-f]{8}", tmp.name)
        if not m or m.group(1) != host:
            continue
        try:
            os.kill(int(m.group(2)), 0)
        except ProcessLookupError:
            shutil.rmtree(tmp, ignore_errors=True)
        except PermissionError:
            pass  # alive, owned by someone else


# ----------------------------------------------------------------------------------------------
# Conversion


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike) -> None:
    """Write config.json, safetensors and tokenizer files for `gguf_path` into `out_dir` (no cache)."""
    import gguf

    path, out = Path(gguf_path), Path(out_dir)
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # the reader raises bare ValueErrors on a bad magic or version
        raise GgufImportError(f"{path}: not a readable GGUF file ({e})") from e
    metadata = read_metadata(reader)
    tensor_names = tuple(t.name for t in reader.tensors)
    rope_freqs = next((np.asarray(t.data, np.float32).reshape(-1) for t in reader.tensors
                       if t.name == "rope_freqs.weight"), None)
    config = config_from_gguf(metadata, tensor_names, source=str(path), rope_freqs=rope_freqs)
    _write_config(config, out)
    _write_safetensors(_hf_tensors(reader, config, str(path)), out)
    if "tokenizer.ggml.model" in metadata:
        _write_tokenizer(reader, path, out)


def read_metadata(reader) -> dict[str, Any]:
    """GGUF key/value metadata as Python values; the long tokenizer arrays are left out."""
    skip = {"tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
            "tokenizer.ggml.scores", "tokenizer.ggml.precompiled_charsmap"}
    out = {}
    for key, field in reader.fields.items():
        if key in skip:
            out[key] = len(field.data)  # a count is all the config needs (vocab size)
        else:
            out[key] = field.contents()
    return out


def _float(value: float) -> float:
    # GGUF stores float32; write the shortest decimal that is the same float32 (1e-05, not 9.99e-06).
    return float(str(np.float32(value)))


def config_from_gguf(metadata: dict[str, Any], tensor_names: tuple[str, ...], *, source: str = "GGUF",
                     rope_freqs: np.ndarray | None = None) -> dict:
    """A transformers config dict from llama.cpp metadata (pure; `source` names the file in errors).

    `rope_freqs` is the file's `rope_freqs.weight` tensor, when it has one (Llama 3.1+ RoPE scaling).
    """
    arch = metadata.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise GgufImportError(
            f"{source}: general.architecture={arch!r} is not supported; ftc imports GGUF architectures "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}")

    def key(name: str, default: Any = ...) -> Any:
        full = f"{arch}.{name}"
        if full in metadata:
            return metadata[full]
        if default is ...:
            raise GgufImportError(f"{source}: metadata key {full!r} is missing (needed for config.json)")
        return default

    if key("expert_count", 0):
        raise GgufImportError(f"{source}: mixture-of-experts GGUF ({arch}.expert_count="
                              f"{key('expert_count')}) is not supported; ftc imports dense models")
    if "rope_freqs.weight" in tensor_names and rope_freqs is None:
        raise GgufImportError(f"{source}: the rope_freqs.weight tensor is needed to rebuild the RoPE config")

    hidden = key("embedding_length")
    heads = key("attention.head_count")
    kv_heads = key("attention.head_count_kv", heads)
    head_dim = key("attention.key_length", hidden // heads)
    if key("attention.value_length", head_dim) != head_dim:
        raise GgufImportError(f"{source}: key_length {head_dim} != value_length "
                              f"{key('attention.value_length')}; Llama needs them equal")
    rope_dims = key("rope.dimension_count", head_dim)
    if rope_dims != head_dim:
        raise GgufImportError(f"{source}: {arch}.rope.dimension_count={rope_dims} but head_dim={head_dim}; "
                              "partial rotary embeddings are not a Llama architecture")
    if isinstance(kv_heads, list):  # per-layer head counts (hybrid models)
        raise GgufImportError(f"{source}: per-layer {arch}.attention.head_count_kv is not supported")

    vocab = key("vocab_size", None)
    if vocab is None:
        vocab = metadata.get("tokenizer.ggml.tokens")
    if vocab is None:
        raise GgufImportError(f"{source}: neither {arch}.vocab_size nor tokenizer.ggml.tokens gives the vocab size")

    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": _float(key("rope.freq_base", 10000.0))}
    scaling = key("rope.scaling.type", "none")
    if rope_freqs is not None:
        if arch != "llama":
            raise GgufImportError(f"{source}: rope_freqs.weight in a {arch} model is not supported")
        rope = llama3_rope_from_factors(rope_freqs, rope["rope_theta"], head_dim, source=source,
                                        original=key("rope.scaling.original_context_length", None))
    elif scaling == "linear":
        rope.update(rope_type="linear", factor=_float(key("rope.scaling.factor")))
    elif scaling not in ("none", None):
        raise GgufImportError(f"{source}: {arch}.rope.scaling.type={scaling!r} is not supported "
                              "(supported: none, linear)")

    spec = ARCHITECTURES[arch]
    if not spec.config_head_dim and head_dim != hidden // heads:
        raise GgufImportError(f"{source}: head_dim {head_dim} != hidden {hidden} / heads {heads}, which "
                              f"{spec.model_type} configs cannot express")
    config = {
        "architectures": [spec.architecture],
        "model_type": spec.model_type,
        "hidden_size": hidden,
        "intermediate_size": key("feed_forward_length"),
        "num_hidden_layers": key("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": _float(key("attention.layer_norm_rms_epsilon")),
        "rope_parameters": rope,
        "max_position_embeddings": key("context_length"),
        "vocab_size": vocab,
        # llama.cpp writes output.weight only when the LM head is not the embedding matrix.
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "attention_bias": "blk.0.attn_q.bias" in tensor_names,
        "mlp_bias": "blk.0.ffn_up.bias" in tensor_names,  # Llama only; dropped below for the others
        "bos_token_id": metadata.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": metadata.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": metadata.get("tokenizer.ggml.padding_token_id"),
        "torch_dtype": "float32",
        **dict(spec.extra_config),
    }
    if not spec.config_head_dim:
        del config["head_dim"]
    if spec.model_type != "llama":  # no MLP-bias switch; a bias tensor there is refused as unknown
        del config["mlp_bias"]
    if spec.model_type == "qwen2":  # Qwen2 always has q/k/v biases and no others: no switch
        del config["attention_bias"]
    return config


# Llama 3.1's RoPE scaling as Meta ships it; llama.cpp reads original_max_position_embeddings from
# the top level of config.json, where Llama 3.x has none, so its files always use 8192.
_LLAMA3_ROPE_CANDIDATES = ({"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},)


def llama3_rope_factors(theta: float, head_dim: int, factor: float, low_freq_factor: float,
                        high_freq_factor: float, original_max_position_embeddings: int) -> np.ndarray:
    """The per-frequency divisors llama.cpp's converter stores as rope_freqs.weight (float32)."""
    freqs = (np.float32(1.0) / (np.float32(theta) ** (np.arange(0, head_dim, 2, dtype=np.float32)
                                                      / np.float32(head_dim)))).astype(np.float32)
    old = original_max_position_embeddings
    low_wavelen, high_wavelen = old / low_freq_factor, old / high_freq_factor
    out = []
    for freq in freqs:
        wavelen = np.float32(2 * np.pi) / freq
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def llama3_rope_from_factors(rope_freqs: np.ndarray, theta: float, head_dim: int, *, source: str,
                             original: int | None = None) -> dict:
    """HF `rope_parameters` (rope_type llama3) that give exactly these rope_freqs, or an error.

    The file stores only the result, not the parameters: the factor is its largest entry, and the
    rest must be one of the known settings that reproduces every entry.
    """
    factors = np.asarray(rope_freqs, dtype=np.float32).reshape(-1)
    if factors.shape != (head_dim // 2,):
        raise GgufImportError(f"{source}: rope_freqs.weight has {factors.size} entries, head_dim {head_dim} "
                              f"needs {head_dim // 2}")
    if np.all(factors == 1.0):
        return {"rope_type": "default", "rope_theta": theta}
    factor = float(factors.max())
    candidates = list(_LLAMA3_ROPE_CANDIDATES)
    if original:
        candidates.insert(0, {**candidates[0], "original_max_position_embeddings": int(original)})
    for params in candidates:
        if np.allclose(llama3_rope_factors(theta, head_dim, factor, **params), factors, rtol=1e-6, atol=0):
            return {"rope_type": "llama3", "rope_theta": theta, "factor": _float(factor), **params}
    raise GgufImportError(
        f"{source}: rope_freqs.weight (min {factors.min():.4g}, max {factor:.4g}) matches no Llama 3 RoPE "
        f"scaling ftc knows ({candidates}); convert the original HF checkpoint instead")


# llama.cpp tensor name -> HF name ({i} is the layer); see gguf.constants.MODEL_TENSORS / TensorNameMap.
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.bias": "self_attn.o_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "ffn_gate.bias": "mlp.gate_proj.bias",
    "ffn_up.bias": "mlp.up_proj.bias",
    "ffn_down.bias": "mlp.down_proj.bias",
}


def hf_tensor_name(gguf_name: str) -> str | None:
    """The HF name (Llama layout, shared by Qwen2/3) of a llama.cpp tensor, or None when it has none."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = re.fullmatch(r"blk\.(\d+)\.(.+)", gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
    return None


def unpermute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (convert_hf_to_gguf.py `LlamaModel.permute`).

    llama.cpp rotates adjacent pairs (x0, x1), HF rotates halves (x0, x_{d/2}); the converter
    interleaves each head's two halves, so here rows go back from (head, d/2, 2) to (head, 2, d/2).
    """
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's permutation, the inverse of `unpermute_rope` (what its converter writes)."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _expected_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    d, f, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    hd = config.get("head_dim", d // config["num_attention_heads"])
    q, kv = config["num_attention_heads"] * hd, config["num_key_value_heads"] * hd
    shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,), "lm_head.weight": (v, d)}
    layer = {"input_layernorm.weight": (d,), "post_attention_layernorm.weight": (d,),
             "self_attn.q_proj.weight": (q, d), "self_attn.k_proj.weight": (kv, d),
             "self_attn.v_proj.weight": (kv, d), "self_attn.o_proj.weight": (d, q),
             "self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,),
             "self_attn.o_proj.bias": (d,), "self_attn.q_norm.weight": (hd,), "self_attn.k_norm.weight": (hd,),
             "mlp.gate_proj.weight": (f, d), "mlp.up_proj.weight": (f, d),
             "mlp.down_proj.weight": (d, f), "mlp.gate_proj.bias": (f,), "mlp.up_proj.bias": (f,),
             "mlp.down_proj.bias": (d,)}
    for i in range(config["num_hidden_layers"]):
        shapes.update({f"model.layers.{i}.{k}": s for k, s in layer.items()})
    return shapes


class _LazyTensor:
    """One GGUF tensor, dequantised to float32 HF layout only when asked (keeps memory to a shard)."""

    def __init__(self, tensor, hf_name: str, config: dict):
        self.tensor, self.hf_name, self.config = tensor, hf_name, config
        self.shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))  # GGUF lists dims fastest-first
        self.nbytes = int(np.prod(self.shape)) * 4

    def load(self) -> np.ndarray:
        from gguf import dequantize

        w = np.asarray(dequantize(self.tensor.data, self.tensor.tensor_type), dtype=np.float32).reshape(self.shape)
        if _BY_MODEL_TYPE[self.config["model_type"]].permuted_qk:
            if ".self_attn.q_proj." in self.hf_name:
                w = unpermute_rope(w, self.config["num_attention_heads"])
            elif ".self_attn.k_proj." in self.hf_name:
                w = unpermute_rope(w, self.config["num_key_value_heads"])
        return np.ascontiguousarray(w)


_ATTENTION_BIASES = ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias", "self_attn.o_proj.bias")
_MLP_BIASES = ("mlp.gate_proj.bias", "mlp.up_proj.bias", "mlp.down_proj.bias")
_OPTIONAL = _ATTENTION_BIASES + _MLP_BIASES + ("self_attn.q_norm.weight", "self_attn.k_norm.weight")


def _model_tensors(config: dict) -> set[str]:
    """Exactly the HF tensors this config's model has (lm_head only when untied)."""
    arch = _BY_MODEL_TYPE[config["model_type"]]
    extra = arch.required + (_ATTENTION_BIASES if config.get("attention_bias") else ()) + (
        _MLP_BIASES if config.get("mlp_bias") else ())
    names = {n for n in _expected_shapes(config) if not n.endswith(_OPTIONAL) or n.endswith(extra)}
    return names - ({"lm_head.weight"} if config["tie_word_embeddings"] else set())


def _hf_tensors(reader, config: dict, source: str) -> list[_LazyTensor]:
    expected, wanted = _expected_shapes(config), _model_tensors(config)
    out, unknown = [], []
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":
            continue  # folded into config.json's rope_parameters
        hf_name = hf_tensor_name(t.name)
        if hf_name not in wanted:
            unknown.append(t.name)  # a tensor the transformers model would silently drop
            continue
        lazy = _LazyTensor(t, hf_name, config)
        if lazy.shape != expected[hf_name]:
            raise GgufImportError(f"{source}: tensor {t.name!r} ({hf_name}) has shape {lazy.shape}, "
                                  f"config implies {expected[hf_name]}")
        out.append(lazy)
    if unknown:
        raise GgufImportError(f"{source}: tensors a {config['model_type']} model has no place for: "
                              f"{', '.join(unknown[:8])}{' ...' if len(unknown) > 8 else ''}")
    if missing := sorted(wanted - {t.hf_name for t in out}):
        raise GgufImportError(f"{source}: tensors missing for a {config['model_type']} model: "
                              f"{', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
    return out


# ----------------------------------------------------------------------------------------------
# Writers


def _write_config(config: dict, out: Path) -> None:
    from transformers import AutoConfig

    # Round-trip through the config class so config.json is exactly what transformers itself writes.
    fields = {k: v for k, v in config.items() if k != "model_type"}
    AutoConfig.for_model(config["model_type"], **fields).save_pretrained(out)


def _write_safetensors(tensors: list[_LazyTensor], out: Path) -> None:
    from safetensors.numpy import save_file

    shards: list[list[_LazyTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > MAX_SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    if len(shards) == 1:
        save_file({t.hf_name: t.load() for t in shards[0]}, str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file({t.hf_name: t.load() for t in shard}, str(out / name), metadata={"format": "pt"})
        weight_map.update({t.hf_name: name for t in shard})
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors)}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def gguf_tokenizer_fields(reader) -> tuple[str, dict, dict]:
    """`(architecture, tokenizer_dict, tokenizer_config)` as transformers' `get_gguf_tokenizer` gives them.

    transformers' own reader imports torch; this reads the same fields with the `gguf` package so a
    conversion needs no torch. tests/test_gguf_import.py checks the two agree on a real file.
    """
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_TOKENIZER_MAPPING, _SPECIAL_TOKENS

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


def _write_tokenizer(reader, path: Path, out: Path) -> None:
    """transformers' GGUF tokenizer conversion (vocab, merges, special tokens, chat template)."""
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer

    architecture, tokenizer_dict, tokenizer_config = gguf_tokenizer_fields(reader)
    try:
        backend, extra = convert_gguf_tokenizer(architecture, tokenizer_dict)
    except Exception as e:
        raise GgufImportError(f"{path}: transformers could not build a tokenizer from the GGUF metadata "
                              f"(tokenizer.ggml.model={tokenizer_dict.get('tokenizer_type')!r}): {e}") from e
    kwargs = {k: v for k, v in {**tokenizer_config, **extra}.items() if v is not None}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs)
    # Keep the chat template inside tokenizer_config.json, where every transformers version and
    # vLLM look for it (transformers 5 would otherwise write chat_template.jinja).
    with contextlib.redirect_stdout(None):
        tokenizer.save_pretrained(out, save_jinja_files=False)
