"""A GGUF file (llama.cpp's format) becomes a local Hugging Face directory ftc loads like any other.

    import_gguf("SmolLM2-135M-Instruct.Q4_1.gguf") -> ~/.cache/ftc/gguf/<sha256[:16]>-v1/
        config.json            Llama / Qwen2 / Qwen3 / Gemma config rebuilt from the GGUF metadata
        model.safetensors      float32 (dequantised), HF tensor names, Llama Q/K un-permuted
        tokenizer.json, tokenizer_config.json (with the chat template), special tokens
        ftc_gguf_source.json   where it came from (file, sha256, converter version)

Tensors are read and dequantised with the `gguf` package (numpy; no torch); config.json comes
from gguf_config.py, the tokenizer files from gguf_tokenizer.py (transformers' own conversion).
A conversion is written into a temporary directory and renamed into place, so an interrupted one
never leaves a half-written model in the cache, and the cache key (file hash + converter version)
makes a second call free.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import time
import uuid
from pathlib import Path

import numpy as np

from ftc.backends.jax.io.gguf_config import BY_MODEL_TYPE, GgufImportError, config_from_gguf, read_metadata
from ftc.backends.jax.io.gguf_tokenizer import write_tokenizer
from ftc.backends.jax.state import files

# Bump when the output of a conversion changes, so stale cache entries are not reused.
CONVERTER_VERSION = 1
SOURCE_RECORD = "ftc_gguf_source.json"
# One safetensors shard is held in memory while it is written; larger models get several shards.
MAX_SHARD_BYTES = 4 * 1024**3


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
    files.remove_abandoned(root, ".tmp-")
    tmp = root / f".tmp-{final.name}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        started = time.perf_counter()
        convert_gguf(path, tmp)
        record = {
            "gguf_file": str(path.resolve()),
            "sha256": sha,
            "converter_version": CONVERTER_VERSION,
            "convert_seconds": round(time.perf_counter() - started, 3),
        }
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
    rope_freqs = next(
        (np.asarray(t.data, np.float32).reshape(-1) for t in reader.tensors if t.name == "rope_freqs.weight"), None
    )
    config = config_from_gguf(metadata, tensor_names, source=str(path), rope_freqs=rope_freqs)
    _write_config(config, out)
    _write_safetensors(_hf_tensors(reader, config, str(path)), out)
    if "tokenizer.ggml.model" in metadata:
        write_tokenizer(reader, path, out)


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
    layer = {
        "input_layernorm.weight": (d,),
        "post_attention_layernorm.weight": (d,),
        "self_attn.q_proj.weight": (q, d),
        "self_attn.k_proj.weight": (kv, d),
        "self_attn.v_proj.weight": (kv, d),
        "self_attn.o_proj.weight": (d, q),
        "self_attn.q_proj.bias": (q,),
        "self_attn.k_proj.bias": (kv,),
        "self_attn.v_proj.bias": (kv,),
        "self_attn.o_proj.bias": (d,),
        "self_attn.q_norm.weight": (hd,),
        "self_attn.k_norm.weight": (hd,),
        "mlp.gate_proj.weight": (f, d),
        "mlp.up_proj.weight": (f, d),
        "mlp.down_proj.weight": (d, f),
        "mlp.gate_proj.bias": (f,),
        "mlp.up_proj.bias": (f,),
        "mlp.down_proj.bias": (d,),
    }
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
        if BY_MODEL_TYPE[self.config["model_type"]].norm_plus_one and self.hf_name.endswith("norm.weight"):
            w = w - np.float32(1.0)
        if BY_MODEL_TYPE[self.config["model_type"]].permuted_qk:
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
    arch = BY_MODEL_TYPE[config["model_type"]]
    extra = (
        arch.required
        + (_ATTENTION_BIASES if config.get("attention_bias") else ())
        + (_MLP_BIASES if config.get("mlp_bias") else ())
    )
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
            raise GgufImportError(
                f"{source}: tensor {t.name!r} ({hf_name}) has shape {lazy.shape}, config implies {expected[hf_name]}"
            )
        out.append(lazy)
    if unknown:
        raise GgufImportError(
            f"{source}: tensors a {config['model_type']} model has no place for: "
            f"{', '.join(unknown[:8])}{' ...' if len(unknown) > 8 else ''}"
        )
    if missing := sorted(wanted - {t.hf_name for t in out}):
        raise GgufImportError(
            f"{source}: tensors missing for a {config['model_type']} model: "
            f"{', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}"
        )
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
