"""Fingerprints of what a run's frozen base is rebuilt from: its source files (size, header and
sampled sha256: cheap on a 100 GB base, sure to catch a swapped file) and per-leaf checksums of the
rebuilt params (a float sum that catches a rebuild computing differently). frozen_base.py records
them in a checkpoint's metadata and checks them before it trusts a rebuild."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from ftc.backends.jax.models.shapes import path_str
from ftc.backends.jax.state import checkpoint as ckpt_lib
from ftc.backends.jax.state import init_from

SAMPLES = 16
SAMPLE_BYTES = 4096
WHOLE_FILE_BYTES = 1 << 20  # files up to this size are hashed whole


# ---------------------------------------------------------------- the source's files


def file_fingerprint(path: str | os.PathLike) -> dict:
    """{"size", "sha256"}: sha256 of the whole file up to WHOLE_FILE_BYTES, else of its
    safetensors header (length + JSON) and SAMPLES evenly spaced SAMPLE_BYTES ranges, the first at
    its start and the last at its end."""
    path = Path(path)
    size = path.stat().st_size
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= WHOLE_FILE_BYTES:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        else:
            head = f.read(8)
            h.update(head)
            if path.suffix == ".safetensors" and len(head) == 8:
                h.update(f.read(min(int.from_bytes(head, "little"), 100 << 20)))
            for offset in sample_offsets(size):
                f.seek(offset)
                h.update(f.read(SAMPLE_BYTES))
    return {"size": size, "sha256": h.hexdigest()}


def sample_offsets(size: int) -> list[int]:
    """Where file_fingerprint's sampled ranges of a file of `size` bytes start."""
    last = max(size - SAMPLE_BYTES, 0)
    return [last * i // (SAMPLES - 1) for i in range(SAMPLES)]


def source_files(spec, model_dir: str | os.PathLike, init_step: int | None) -> tuple[str, Path, list[Path]]:
    """(what, directory, files) the frozen base is read from, as `initial_params` reads it: an
    init_from run's checkpoint at `init_step`, an init_from HF directory, else the base's own
    directory (model_dir). An init_from PEFT adapter or adapter export brings trained weights only."""
    source = init_from.resolve(spec, model_dir, init_step)
    if source.kind == init_from.RUN:
        directory = Path(ckpt_lib.checkpoint_dir(source.path)) / str(init_step)
        files = sorted(p for p in directory.rglob("*") if p.is_file()) if directory.is_dir() else []
        return f"model.init_from {source.path} (its checkpoint at step {init_step})", directory, files
    if source.kind == init_from.HF_DIR:
        directory, what = source.base_dir, f"model.init_from {source.path}"
    else:
        directory = Path(model_dir)
        what = f"model.base {spec.model.base}" + (
            "" if Path(spec.model.base) == directory else f" (read from {directory})"
        )
    files = sorted(directory.glob("*.safetensors")) + sorted(directory.glob("*.safetensors.index.json"))
    return what, directory, files


def source_fingerprint(spec, model_dir: str | os.PathLike, init_step: int | None) -> dict:
    what, directory, files = source_files(spec, model_dir, init_step)
    return {
        "what": what,
        "dir": str(directory),
        "exists": directory.is_dir(),
        "files": {str(p.relative_to(directory)): file_fingerprint(p) for p in files},
    }


def source_changes(saved: dict, now: dict) -> list[str]:
    """One line per file of the frozen base's source that is gone, new, or changed."""
    where = now["dir"]
    if not now.get("exists", True):
        return [f"  {where}: gone"]
    a, b = saved["files"], now["files"]
    out = []
    for name in sorted(set(a) | set(b)):
        path = os.path.join(where, name)
        if name not in b:
            out.append(f"  {path}: gone")
        elif name not in a:
            out.append(f"  {path}: a new file")
        elif a[name]["size"] != b[name]["size"]:
            out.append(f"  {path}: size {a[name]['size']} -> {b[name]['size']} bytes")
        elif a[name]["sha256"] != b[name]["sha256"]:
            out.append(
                f"  {path}: content changed (same size; sha256 of "
                f"{'the file' if b[name]['size'] <= WHOLE_FILE_BYTES else 'its header and sampled ranges'} "
                f"{a[name]['sha256'][:12]} -> {b[name]['sha256'][:12]})"
            )
    return out


# ---------------------------------------------------------------- checksums of the rebuilt leaves


def _mix(v):
    """murmur3's 32-bit finaliser: a bijection of uint32 that spreads every input bit."""
    v = v ^ (v >> 16)
    v = v * jnp.uint32(0x85EBCA6B)
    v = v ^ (v >> 13)
    v = v * jnp.uint32(0xC2B2AE35)
    return v ^ (v >> 16)


def _leaf_sums(x: jax.Array) -> jax.Array:
    """[2] uint32: sums (mod 2**32, so in any order, on any mesh) of each element's bits mixed with
    its flat position, and of that mixed again."""
    if x.dtype == jnp.bool_:
        bits = x.astype(jnp.uint32)
    else:
        unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[jnp.dtype(x.dtype).itemsize]
        bits = jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)
    index = jnp.zeros(x.shape, jnp.uint32)
    stride = 1
    for d in reversed(range(x.ndim)):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, x.shape, d) * jnp.uint32(stride % 2**32)
        stride *= x.shape[d]
    h = _mix(bits ^ _mix(index + jnp.uint32(0x9E3779B9)))
    return jnp.stack([jnp.sum(h, dtype=jnp.uint32), jnp.sum(_mix(h + jnp.uint32(0x27D4EB2F)), dtype=jnp.uint32)])


def checksums(tree: dict) -> dict[str, str]:
    """ "/"-joined path -> 16 hex digits for every leaf of `tree` (sharded arrays welcome)."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    if not flat:
        return {}
    sums = jax.jit(lambda leaves: [_leaf_sums(x) for x in leaves])([x for _, x in flat])
    out = {}
    for (path, _), s in zip(flat, sums):
        a, b = (int(v) for v in np.asarray(s.addressable_data(0)))
        out[path_str(path)] = f"{a:08x}{b:08x}"
    return out


def checksum_changes(saved: dict[str, str], now: dict[str, str]) -> list[str]:
    out = []
    for name in sorted(set(saved) | set(now)):
        if saved.get(name) != now.get(name):
            out.append(
                f"  {name}: "
                + (
                    "not rebuilt"
                    if name not in now
                    else "not in the checkpoint's record"
                    if name not in saved
                    else "the rebuilt values differ from the run's"
                )
            )
    return out
