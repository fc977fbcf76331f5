"""state/init_from.py: the one place that says what a `model.init_from` path is."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import train_testlib as tl

from ftc.backends.jax.methods import adapter as adapters
from ftc.backends.jax.state import init_from
from ftc.backends.jax.state.files import write_json_atomic


def _spec(init: Path | None):
    return tl.spec({"model": {"init_from": str(init)}} if init else None)


def test_resolve_tells_runs_adapters_exports_and_hf_directories_apart(tmp_path):
    base = tmp_path / "base"
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    peft, ours, hf, odd = (tmp_path / name for name in ("peft", "ours", "hf", "odd"))
    for directory, config in ((peft, {"peft_type": "LORA"}), (ours, {"format": adapters.FORMAT}), (odd, {})):
        directory.mkdir()
        (directory / "adapter_config.json").write_text(json.dumps(config))
    (hf / "ftc_adapters").mkdir(parents=True)
    (hf / "config.json").write_text("{}")

    assert init_from.resolve(_spec(None), base) == init_from.InitSource(init_from.BASE, None, base)
    run = init_from.resolve(_spec(tmp_path / "run"), base)
    assert (run.kind, run.base_dir, run.step) == (init_from.RUN, None, None)  # no complete checkpoint yet
    assert init_from.resolve(_spec(tmp_path / "run"), base, init_step=7).step == 7
    got = {p.name: init_from.resolve(_spec(p), base) for p in (peft, ours, odd, hf, tmp_path / "nothing")}
    assert {name: (s.kind, s.base_dir, s.method_dir) for name, s in got.items()} == {
        "peft": (init_from.METHOD_DIR, base, peft),
        "ours": (init_from.METHOD_DIR, base, ours),
        "odd": (init_from.UNKNOWN, base, odd),
        "hf": (init_from.HF_DIR, hf, None),
        "nothing": (init_from.UNKNOWN, base, None),
    }
    (hf / "ftc_adapters" / "adapter_config.json").write_text("{}")  # an adapter export in format hf
    assert init_from.resolve(_spec(hf), base).method_dir == hf / "ftc_adapters"


def test_check_method_says_which_method_can_start_from_a_source(tmp_path):
    (tmp_path / "peft").mkdir()
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    peft = init_from.resolve(_spec(tmp_path / "peft"), tmp_path)
    init_from.check_method(peft, "qlora")
    with pytest.raises(
        ValueError,
        match=r"is a PEFT LORA adapter, which a method.kind='adapter' run cannot start "
        r"from \(expected method.kind lora or qlora\)",
    ):
        init_from.check_method(peft, "adapter")
    with pytest.raises(ValueError, match="expected a run directory"):
        init_from.check_method(init_from.resolve(_spec(tmp_path / "nothing"), tmp_path), "full")


def test_atomic_json_write_leaves_the_whole_file_and_no_temporary(tmp_path):
    write_json_atomic(tmp_path / "a.json", {"x": [1, 2]})
    write_json_atomic(tmp_path / "a.json", {"y": 1.5})
    assert (tmp_path / "a.json").read_text() == '{\n  "y": 1.5\n}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]
