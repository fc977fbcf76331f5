"""The export certificate (ftc_export.json "certificate") and `ftc export --format gguf` on real runs:
a LoRA run exported merged as GGUF reloads by transformers' GGUF loader with ftc's logits and the
same greedy continuations; the merged HF export and the PEFT adapter generate the same greedy tokens;
`--verify` fails on a mismatch; refusals leave nothing written."""

from __future__ import annotations

import json

import method_runs_testlib as mr
import pytest
from click.testing import CliRunner

from ftc.backends.jax.io import certificate
from ftc.cli import main


def export(run_dir, out, *args):
    result = CliRunner().invoke(main, ["export", str(run_dir), "--out", str(out), *map(str, args)])
    return result


def cert_of(out) -> dict:
    return json.loads((out / "ftc_export.json").read_text())["certificate"]


@pytest.mark.parametrize("dtype", ["float32", "q8_0", "q4_0"])
def test_lora_run_exports_merged_gguf_that_reloads_with_ftc_logits_and_greedy_tokens(dtype, tmp_path):
    run = mr.trained("lora")
    result = export(run.run_dir, tmp_path / "gguf", "--format", "gguf", "--dtype", dtype, "--verify")
    assert result.exit_code == 0, result.output
    assert "verify: OK" in result.output and "greedy continuations" in result.output
    cert = cert_of(tmp_path / "gguf")
    assert cert["ok"] and cert["logits"]["ok"] and cert["greedy"]["ok"] and cert["stops"]["ok"]
    assert cert["weights"]["ok"] and cert["weights"]["max_abs_diff"] == 0 and cert["weights"]["tensors"] > 10
    assert cert["logits"]["loader"].startswith("transformers GGUF loader")
    assert all("first_difference" not in row and row["ftc"] for row in cert["greedy"]["prompts"])
    assert cert["stops"]["gguf_chat_template"] and cert["stops"]["end_of_turn_id"] in cert["stops"]["gguf_stop_ids"]
    hashes = cert["hashes"]
    assert hashes["spec.resolved.json"] and hashes["tokenizer"] and hashes["chat_template"]
    assert all(len(h) == 64 for h in hashes["data"].values())
    assert (tmp_path / "gguf" / "Modelfile").read_text().startswith("FROM ./model.gguf")


def test_merged_lora_export_and_its_peft_adapter_generate_the_same_greedy_tokens(tmp_path):
    run = mr.trained("lora")
    for fmt in ("hf", "peft"):
        result = export(run.run_dir, tmp_path / fmt, "--format", fmt, "--verify")
        assert result.exit_code == 0, result.output
    merged, adapter = cert_of(tmp_path / "hf")["greedy"], cert_of(tmp_path / "peft")["greedy"]
    assert adapter["loader"].startswith("PEFT") and merged["loader"].startswith("transformers")
    assert [r["loader"] for r in merged["prompts"]] == [r["loader"] for r in adapter["prompts"]]
    assert [r["ftc"] for r in merged["prompts"]] == [r["loader"] for r in merged["prompts"]]


def test_export_without_verify_still_writes_hashes_and_stop_ids(tmp_path):
    run = mr.trained("full")
    result = export(run.run_dir, tmp_path / "out", "--format", "hf", "--no-verify")
    assert result.exit_code == 0, result.output
    cert = cert_of(tmp_path / "out")
    assert "greedy" not in cert and "logits" not in cert and cert["stops"]["ok"] and cert["ok"]


def test_verify_fails_when_the_greedy_continuations_differ(tmp_path, monkeypatch):
    run = mr.trained("full")
    real = certificate.reference_greedy

    def off_by_one(reference, prompt_ids, stop_ids):  # a loader that picks another token at step 3
        return [
            tuple(t if i != 3 else (t + 1) % 320 for i, t in enumerate(row))
            for row in real(reference, prompt_ids, stop_ids)
        ]

    monkeypatch.setattr(certificate, "reference_greedy", off_by_one)
    monkeypatch.setattr(certificate, "TIE_GAP", 0.0)
    result = export(run.run_dir, tmp_path / "out", "--format", "gguf", "--verify")
    assert result.exit_code == 1
    assert "DIFFERENT (first at token 3" in result.output
    cert = cert_of(tmp_path / "out")
    assert not cert["ok"] and not cert["greedy"]["ok"] and cert["logits"]["ok"]


@pytest.mark.parametrize(
    "kind, args, message",
    [
        ("full", ("--format", "hf", "--dtype", "q8_0"), "export dtype 'q8_0' is for format 'gguf' only"),
        ("adapter", ("--format", "gguf"), "export format 'gguf' does not apply to method.kind 'adapter'"),
    ],
)
def test_an_export_gguf_cannot_hold_is_refused_in_one_line_and_writes_nothing(kind, args, message, tmp_path):
    run = mr.trained(kind)
    result = export(run.run_dir, tmp_path / "out", *args)
    assert result.exit_code == 1 and message in result.output
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.partial-*"))


def test_generation_config_carries_the_end_of_turn_id_when_the_tokenizer_eos_is_another(tmp_path):
    import data_testlib

    tok = data_testlib.make_tokenizer()
    tok.eos_token = "<|endoftext|>"
    tok.save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 0}))
    certificate.carry_stop_ids(tmp_path, tmp_path)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert json.loads((tmp_path / "generation_config.json").read_text())["eos_token_id"] == [0, im_end]


def test_run_writes_one_export_per_serving_target(tmp_path):
    path = mr.write_spec("lora", "lora-targets", export='format = "hf"\ntargets = ["gguf", "peft", "vllm"]')
    run = mr.run_spec(path, "lora")
    assert (run.run_dir / "export" / "config.json").is_file()  # export.format, and what vLLM loads
    assert (run.run_dir / "export-gguf" / "model.gguf").is_file() and (
        run.run_dir / "export-gguf" / "Modelfile"
    ).is_file()
    assert (run.run_dir / "export-peft" / "adapter_config.json").is_file()
    assert not (run.run_dir / "export-hf").exists()
    for d in ("export", "export-gguf", "export-peft"):
        manifest = json.loads((run.run_dir / d / "ftc_export.json").read_text())
        assert manifest["certificate"]["stops"]["ok"]


def test_weights_check_names_a_tensor_the_file_holds_differently(tmp_path):
    import jax

    from ftc.backends.jax.io import export as export_lib
    from ftc.backends.jax.io.gguf_export_format import weights_check

    trained = export_lib.load_run(mr.trained("full").run_dir)
    result = export_lib.write_export(trained, tmp_path / "out", format="gguf", dtype="float32")
    assert weights_check(trained.model, result.out_dir, trained.params)["ok"]
    norm = jax.tree_util.tree_map_with_path(
        lambda path, x: x + 1e-3 if jax.tree_util.keystr(path).startswith("['norm']") else x,  # the final norm
        trained.params,
    )
    found = weights_check(trained.model, result.out_dir, norm)
    assert not found["ok"] and found["at"] == "output_norm.weight" and abs(found["max_abs_diff"] - 1e-3) < 1e-6
