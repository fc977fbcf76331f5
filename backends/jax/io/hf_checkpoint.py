"""Hugging Face checkpoints in and out: config.json + safetensors <-> flax params, for any family.

Import reads safetensors through a memory map, one tensor (one layer of a stack) at a time, and
with `shardings` each device's shard is cut from the map straight into its buffer
(`jax.make_array_from_callback`): the whole model never sits on the host twice.
Export gathers one parameter at a time, converts it layer by layer, and streams it into the
current shard file. Pickle checkpoints and custom code (`auto_map`) are refused.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import traverse_util

from ftc.backends.jax.io.hf_config import read_hf_config  # part of this module's API
from ftc.backends.jax.io.safetensors_read import SAFETENSORS_DTYPES, SafetensorsCheckpoint
from ftc.backends.jax.models import family_for
from ftc.backends.jax.models.family import Family, HfTensor
from ftc.backends.jax.models.shapes import abstract_params, logical_axes  # part of this module's API

log = logging.getLogger(__name__)

_DTYPE_CODES = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}
_EXPORT_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}
DATA_ALIGNMENT = 64  # bytes: where a safetensors file's tensor data starts (SafetensorsWriter.finish)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    family: Family
    arch: Any
    params: Any  # nested dict of jax.Array (unboxed), the layout `family.build` creates
    hf_config: dict  # config.json as read
    model_dir: Path


# ---------------------------------------------------------------- scanned stacks


def _stacked_paths(family: Family, arch) -> set[str]:
    """Params scanned over layers: their first logical axis is "layers"."""
    axes = _flat_axes(logical_axes(family, arch))
    return {path for path, names in axes.items() if names[:1] == ("layers",)}


def _flat_axes(axes_tree) -> dict[str, tuple]:
    return traverse_util.flatten_dict(axes_tree, sep="/", is_leaf=lambda k, v: isinstance(v, tuple))


# ---------------------------------------------------------------- import


def _flat(tree) -> dict[str, Any]:
    return traverse_util.flatten_dict(tree, sep="/")


def _stored(checkpoint: SafetensorsCheckpoint, entry: str | tuple[str, ...]):
    """One entry of `HfTensor.names` as stored: an array, or a tuple of arrays for a tuple of names."""
    return checkpoint.get(entry) if isinstance(entry, str) else tuple(checkpoint.get(n) for n in entry)


def _slice_reader(checkpoint: SafetensorsCheckpoint, spec: HfTensor, stacked: bool, dtype) -> Callable:
    """index (tuple of slices over the flax shape) -> np.ndarray of that block, in `dtype`."""

    def read(index: tuple) -> np.ndarray:
        # np.array copies: params never alias the memory-mapped file (export may replace it).
        if not stacked:
            return np.array(spec.to_flax(_stored(checkpoint, spec.names[0]))[index], dtype=dtype)
        layer_index, rest = index[0], tuple(index[1:])
        layer_ids = range(*layer_index.indices(len(spec.names)))
        # One layer converted at a time; only the requested block is kept.
        return np.stack(
            [np.asarray(spec.to_flax(_stored(checkpoint, spec.names[i]))[rest], dtype=dtype) for i in layer_ids]
        )

    return read


def _layout_stored(spec: HfTensor, checkpoint: SafetensorsCheckpoint) -> HfTensor:
    """`spec`, or its `fused` layout when the checkpoint stores that one instead."""
    fused = spec.fused
    if fused is not None and not all(n in checkpoint.where for n in spec.stored_names()):
        if all(n in checkpoint.where for n in fused.stored_names()):
            return fused
    return spec


def load_model(
    model_dir: str | os.PathLike, *, dtype=jnp.float32, shardings=None, hf_config: dict | None = None
) -> LoadedModel:
    """Load a local HF directory (config.json + safetensors, any stored float dtype) as flax params.

    `shardings`: a jax.sharding.Sharding for every param, or a pytree of them matching the params;
    each device's block is then read from the memory-mapped file directly into that device.
    `hf_config`: the config to build the model from, when not config.json as read (a classifier's
    decoder read without its LM head: rl/reward_model.py).
    """
    model_dir = Path(model_dir)
    hf_config = read_hf_config(model_dir) if hf_config is None else hf_config
    family = family_for(hf_config)
    arch = family.config_from_hf(hf_config)
    checkpoint = SafetensorsCheckpoint(model_dir)
    np_dtype = np.dtype(dtype)

    expected = _flat(abstract_params(family, arch, dtype))
    specs = family.hf_tensors(arch)
    if set(specs) != set(expected):
        raise ValueError(
            f"family {family.name}: hf_tensors and module params differ: "
            f"only in hf_tensors {sorted(set(specs) - set(expected))}, "
            f"only in params {sorted(set(expected) - set(specs))}"
        )
    specs = {path: _layout_stored(spec, checkpoint) for path, spec in specs.items()}
    wanted = [name for spec in specs.values() for name in spec.stored_names()]
    missing = checkpoint.resolve_base_prefix(wanted)
    if missing:
        raise ValueError(
            f"{model_dir}: checkpoint lacks {len(missing)} tensor(s) that config.json "
            f"(model_type={hf_config.get('model_type')!r}) requires, e.g. {missing[:5]}"
        )
    unused = sorted(set(checkpoint.where) - {checkpoint.aliases.get(n, n) for n in wanted})
    if unused:
        log.info(
            "%s: ignoring %d checkpoint tensor(s) the model does not use, e.g. %s", model_dir, len(unused), unused[:5]
        )

    if shardings is not None and not isinstance(shardings, jax.sharding.Sharding):
        flat_shardings = _flat(shardings)
        if set(flat_shardings) != set(expected):
            raise ValueError(
                f"shardings tree does not match the params: missing {sorted(set(expected) - set(flat_shardings))}"
            )
    stacked_paths = _stacked_paths(family, arch)
    flat_params = {}
    for path, spec in specs.items():
        shape = expected[path].shape
        first_name = spec.stored_names()[0]
        try:
            first = spec.to_flax(_stored(checkpoint, spec.names[0]))
        except ValueError as e:  # a stored shape the layout cannot take
            raise ValueError(
                f"{model_dir}: tensor {first_name} (file {checkpoint.file_of(first_name)}) does not fit param "
                f"{path} {tuple(shape)} as config.json implies it: {e}"
            ) from None
        stacked = path in stacked_paths
        got = (len(spec.names),) + tuple(first.shape) if stacked else tuple(first.shape)
        if got != tuple(shape):
            raise ValueError(
                f"{model_dir}: tensor {first_name} (file {checkpoint.file_of(first_name)}) gives param {path} "
                f"shape {got}, but config.json implies {tuple(shape)}"
            )
        read = _slice_reader(checkpoint, spec, stacked, np_dtype)
        if shardings is None:
            flat_params[path] = jnp.asarray(read(tuple(slice(None) for _ in shape)))
        else:
            sharding = shardings if isinstance(shardings, jax.sharding.Sharding) else flat_shardings[path]
            flat_params[path] = jax.make_array_from_callback(shape, sharding, read)
    params = traverse_util.unflatten_dict(flat_params, sep="/")
    return LoadedModel(family=family, arch=arch, params=params, hf_config=hf_config, model_dir=model_dir)


# ---------------------------------------------------------------- export


def _to_host(x) -> np.ndarray:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def _hf_tensors_of(family: Family, arch, params) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, array in HF layout) one at a time, gathering one param at a time."""
    flat = _flat(nn.meta.unbox(params))
    specs = family.hf_tensors(arch)
    if set(specs) != set(flat):
        raise ValueError(
            f"params do not match family {family.name}: missing {sorted(set(specs) - set(flat))}, "
            f"unexpected {sorted(set(flat) - set(specs))}"
        )
    stacked_paths = _stacked_paths(family, arch)
    for path, spec in specs.items():
        host = _to_host(flat[path])
        slices = [host] if path not in stacked_paths else [host[i] for i in range(len(spec.names))]
        for entry, value in zip(spec.names, slices):
            if isinstance(entry, str):
                yield entry, spec.to_hf(value)
            else:
                yield from zip(entry, spec.to_hf(value), strict=True)
        del host, slices


class _ShardWriter:
    """Writes tensors into numbered safetensors files of at most `max_bytes` data each."""

    def __init__(self, out_dir: Path, max_bytes: int):
        self.out_dir, self.max_bytes = out_dir, max_bytes
        self.shards: list[tuple[Path, dict]] = []  # (temp data file, header)
        self._data = None
        self._size = 0

    def add(self, name: str, array: np.ndarray):
        nbytes = array.nbytes
        if self._data is None or (self._size and self._size + nbytes > self.max_bytes):
            self._open()
        header = self.shards[-1][1]
        header[name] = {
            "dtype": _DTYPE_CODES[array.dtype],
            "shape": list(array.shape),
            "data_offsets": [self._size, self._size + nbytes],
        }
        self._data.write(np.ascontiguousarray(array).tobytes())
        self._size += nbytes

    def _open(self):
        self._close_data()
        fd, tmp = tempfile.mkstemp(prefix=".shard-", dir=self.out_dir)
        self._data = os.fdopen(fd, "wb")
        self._size = 0
        self.shards.append((Path(tmp), {}))

    def _close_data(self):
        if self._data is not None:
            self._data.close()

    def finish(self) -> dict[str, str]:
        """Writes the final files; returns tensor name -> file name."""
        self._close_data()
        n = len(self.shards)
        weight_map = {}
        for i, (tmp, header) in enumerate(self.shards):
            file_name = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            header_bytes = json.dumps({"__metadata__": {"format": "pt"}, **header}, separators=(",", ":")).encode()
            # The data starts 64-byte aligned (the format asks for 8): a memory-mapped tensor then
            # sits where a fresh allocation would, and PyTorch's CPU kernels pick their path by
            # pointer alignment (an 8-aligned Qwen2-MoE export gave logits 3e-7 off its source).
            header_bytes += b" " * (-(8 + len(header_bytes)) % DATA_ALIGNMENT)
            with open(self.out_dir / file_name, "wb") as out, open(tmp, "rb") as data:
                out.write(struct.pack("<Q", len(header_bytes)))
                out.write(header_bytes)
                shutil.copyfileobj(data, out, 16 << 20)
            tmp.unlink()
            weight_map.update({name: file_name for name in header})
        return weight_map


def _export_config(family: Family, arch, hf_config: dict, dtype_name: str) -> dict:
    config = {
        k: v
        for k, v in (hf_config or {}).items()
        if k
        not in (
            "_name_or_path",
            "transformers_version",
            "torch_dtype",
            "dtype",
            "auto_map",
            "architectures",
            "rope_scaling",
            "rope_theta",
            "rope_parameters",
            "quantization_config",
        )
    }
    config.update(family.hf_config(arch))
    config["architectures"] = [family.hf_architecture]
    config["dtype"] = dtype_name
    return config


def _generation_config(config: dict, model_dir: Path | None) -> dict:
    generation = {}
    if model_dir is not None and (model_dir / "generation_config.json").exists():
        generation = json.loads((model_dir / "generation_config.json").read_text())
    else:
        generation["_from_model_config"] = True
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if config.get(key) is not None:
            generation.setdefault(key, config[key])
    generation.pop("transformers_version", None)
    return generation


def save_hf(
    out_dir: str | os.PathLike,
    model: LoadedModel | tuple,
    *,
    dtype: str = "bfloat16",
    max_shard_bytes: int = 2**30,
    tokenizer_dir: str | os.PathLike | None = None,
) -> Path:
    """Write a HF directory transformers loads: config.json, generation_config.json, safetensors
    (sharded with model.safetensors.index.json above `max_shard_bytes`), tokenizer files.

    `model` is a LoadedModel or (family, arch, params, hf_config). Only process 0 writes; every
    process must call (gathering a sharded param is collective).
    """
    if isinstance(model, LoadedModel):
        family, arch, params, hf_config, source_dir = (
            model.family,
            model.arch,
            model.params,
            model.hf_config,
            model.model_dir,
        )
    else:
        family, arch, params, hf_config = model
        source_dir = None
    dtype_name = str(jnp.dtype(dtype)) if not isinstance(dtype, str) else dtype
    if dtype_name not in _EXPORT_DTYPES:
        raise ValueError(f"export dtype {dtype!r}; expected one of {', '.join(_EXPORT_DTYPES)}")
    np_dtype = np.dtype(_EXPORT_DTYPES[dtype_name])
    out_dir = Path(out_dir)
    writer_process = jax.process_index() == 0
    if writer_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        for stale in list(out_dir.glob("model*.safetensors")) + list(out_dir.glob("model.safetensors.index.json")):
            stale.unlink()
    writer = _ShardWriter(out_dir, max_shard_bytes) if writer_process else None
    total = 0
    for name, array in _hf_tensors_of(family, arch, params):
        array = np.asarray(array).astype(np_dtype)
        total += array.nbytes
        if writer is not None:
            writer.add(name, array)
    if writer is None:
        return out_dir
    weight_map = writer.finish()
    if len(set(weight_map.values())) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")

    config = _export_config(family, arch, hf_config, dtype_name)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    generation = _generation_config(config, source_dir)
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2, sort_keys=True) + "\n")
    if tokenizer_dir is not None:
        copied = [f for f in TOKENIZER_FILES if (Path(tokenizer_dir) / f).exists()]
        if not copied:
            raise FileNotFoundError(f"{tokenizer_dir}: no tokenizer files ({', '.join(TOKENIZER_FILES)})")
        for f in copied:
            shutil.copyfile(Path(tokenizer_dir) / f, out_dir / f)
    return out_dir
