"""A safetensors header that lies about a tensor is refused when the file is opened, naming the
file, the tensor and what is wrong (before: a negative shape whose dimensions multiply to the
right count reached numpy's reshape, "can only specify one unknown dimension")."""

from __future__ import annotations

import json
import struct

import pytest

from ftc.backends.jax.io.safetensors_read import SafetensorsFile


def _file(tmp_path, entry: dict, data: bytes = b"\0" * 16):
    header = json.dumps({"t": entry}).encode()
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


@pytest.mark.parametrize(
    "entry, says",
    [
        ({"dtype": "F32", "shape": [-2, -2], "data_offsets": [0, 16]}, "has shape [-2, -2]: a dimension below 0"),
        ({"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 8]}, "has 8 bytes, not 16"),
        ({"dtype": "F32", "shape": [2, 2], "data_offsets": [8, 24]}, "ends at byte 24 of the data"),
        ({"dtype": "F32", "shape": "2x2", "data_offsets": [0, 16]}, "has a malformed header entry"),
    ],
    ids=["negative-shape", "short-data", "past-the-end", "malformed"],
)
def test_a_header_entry_that_does_not_add_up_is_named(tmp_path, entry, says):
    path = _file(tmp_path, entry)
    with pytest.raises(ValueError) as error:
        SafetensorsFile(path)
    assert str(error.value).startswith(f"{path}: tensor 't' ") and says in str(error.value), error.value


def test_a_consistent_header_reads(tmp_path):
    path = _file(tmp_path, {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]})
    assert SafetensorsFile(path).tensor("t").shape == (2, 2)
