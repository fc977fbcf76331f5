"""Reading a Hugging Face checkpoint's safetensors: tensors by name, as memory-mapped views.

A directory holds model.safetensors, or shards named by model.safetensors.index.json. Nothing is
copied until a caller slices a tensor (hf_checkpoint.load_model reads one layer at a time).
Pickle checkpoints are refused with how to convert them.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

SAFETENSORS_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_PICKLE_PATTERNS = ("pytorch_model*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.bin")


class SafetensorsFile:
    """One .safetensors file: its header, and tensors as read-only views of a memory map."""

    def __init__(self, path: Path):
        self.path = path
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            (header_len,) = struct.unpack("<Q", head) if len(head) == 8 else (None,)
            if header_len is None or header_len > size - 8:
                raise ValueError(f"{path}: not a safetensors file, or truncated ({size} bytes; no complete header)")
            try:
                header = json.loads(f.read(header_len))
            except ValueError as e:
                raise ValueError(f"{path}: not a safetensors file (header is not JSON: {e})") from None
        if not isinstance(header, dict):
            raise ValueError(f"{path}: not a safetensors file (header is not a JSON object)")
        header.pop("__metadata__", None)
        self.header = header
        self.data_start = 8 + header_len
        for name, entry in header.items():
            problem = _entry_problem(entry, size - self.data_start)
            if problem:
                raise ValueError(f"{path}: tensor {name!r} {problem}")
        self._map = np.memmap(path, dtype=np.uint8, mode="r")

    def tensor(self, name: str) -> np.ndarray:
        entry = self.header[name]
        if entry["dtype"] not in SAFETENSORS_DTYPES:
            raise ValueError(f"{self.path}: tensor {name} has unsupported dtype {entry['dtype']}")
        begin, end = entry["data_offsets"]
        raw = self._map[self.data_start + begin : self.data_start + end]
        return raw.view(SAFETENSORS_DTYPES[entry["dtype"]]).reshape(entry["shape"])


def _entry_problem(entry, data_bytes: int) -> str | None:
    """What is wrong with one tensor's header entry in a file with `data_bytes` bytes of data."""
    try:
        dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
        count = int(np.prod([int(d) for d in shape], dtype=np.int64))
    except (TypeError, KeyError, ValueError):
        return f"has a malformed header entry {str(entry)[:200]}"
    if any(int(d) < 0 for d in shape):  # two negative dims multiply to a plausible count
        return f"has shape {shape}: a dimension below 0"
    if not 0 <= begin <= end:
        return f"has data offsets {begin}..{end}"
    if end > data_bytes:
        return f"ends at byte {end} of the data, but the file holds {data_bytes}: truncated"
    want = count * SAFETENSORS_DTYPES[dtype].itemsize if dtype in SAFETENSORS_DTYPES else end - begin
    if end - begin != want:
        return f"of shape {shape} and dtype {dtype} has {end - begin} bytes, not {want}"
    return None


class SafetensorsCheckpoint:
    """All safetensors files of a model directory, by tensor name."""

    def __init__(self, model_dir: Path):
        index_path = model_dir / "model.safetensors.index.json"
        single = model_dir / "model.safetensors"
        if single.exists():
            files = {single.name: SafetensorsFile(single)}
            self.where = {name: single.name for name in files[single.name].header}
        elif index_path.exists():
            weight_map = json.loads(index_path.read_text())["weight_map"]
            files = {}
            for file_name in sorted(set(weight_map.values())):
                if not (model_dir / file_name).exists():
                    raise FileNotFoundError(f"{index_path} names {file_name}, which is not in {model_dir}")
                files[file_name] = SafetensorsFile(model_dir / file_name)
            self.where = dict(weight_map)
        else:
            raise FileNotFoundError(no_safetensors_message(model_dir))
        self.files = files
        self.aliases: dict[str, str] = {}  # wanted name -> stored name, see resolve_base_prefix

    def file_of(self, name: str) -> str:
        return self.where[self.aliases.get(name, name)]

    def get(self, name: str) -> np.ndarray:
        stored = self.aliases.get(name, name)
        return self.files[self.where[stored]].tensor(stored)

    def resolve_base_prefix(self, wanted: list[str]) -> list[str]:
        """Names in `wanted` still missing after trying one base-model prefix ("bert.", "transformer.")
        added to or stripped from the missing names, as transformers does when a head model's checkpoint
        is read as its base model or the reverse, and LayerNorm's legacy names (`_legacy_name`).
        Records the renames that resolve in `aliases`."""
        missing = [name for name in wanted if name not in self.where]
        if not missing:
            return []
        candidates = [""] + sorted({n.split(".", 1)[0] + "." for n in list(self.where) + wanted if "." in n})
        best: dict[str, str] = {}
        for prefix in candidates:
            for to_stored in (lambda n, p=prefix: p + n, lambda n, p=prefix: n[len(p) :] if n.startswith(p) else None):
                found = {}
                for n in missing:
                    stored = to_stored(n)
                    for form in (stored, _legacy_name(stored)):
                        if form is not None and form in self.where:
                            found[n] = form
                            break
                if len(found) > len(best):
                    best = found
        self.aliases = best
        return [n for n in missing if n not in best]


def _legacy_name(name: str | None) -> str | None:
    """A LayerNorm weight / bias under the TensorFlow-era name (`LayerNorm.gamma` / `.beta`) some
    checkpoints still store (the BERT releases); transformers renames them on load, so ftc reads them."""
    if name is None:
        return None
    for new, old in ((".LayerNorm.weight", ".LayerNorm.gamma"), (".LayerNorm.bias", ".LayerNorm.beta")):
        if name.endswith(new):
            return name[: -len(new)] + old
    return None


def no_safetensors_message(model_dir: Path) -> str:
    pickles = sorted({p.name for pattern in _PICKLE_PATTERNS for p in model_dir.glob(pattern)})
    if pickles:
        return (
            f"{model_dir}: found only pickle checkpoint file(s) {', '.join(pickles)}; ftc loads weights from "
            "safetensors only (model.safetensors or model.safetensors.index.json), because unpickling can run "
            "arbitrary code. Convert them once in a trusted environment, e.g. "
            "`AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out, safe_serialization=True)`."
        )
    return f"{model_dir}: no model.safetensors or model.safetensors.index.json found"
