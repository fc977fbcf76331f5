"""`[export] targets`: `ftc lint` reports, before training, each setting a listed serving target
cannot load, at its key path with the target's rule; one test per rule, and specs that serve pass."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from ftc.cli import main
from ftc.spec import targets

BASE = """ftc = 1
name = "t"
[model]
base = "{base}"
[data]
format = "chat"
train = "tfds:a/b:train"
[method]
{method}
[export]
{export}
"""


def model_dir(tmp_path, **config):
    d = tmp_path / "base"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "max_position_embeddings": 4096, **config}))
    return d


def lint(tmp_path, method: str, export: str, base=None) -> tuple[int, list[dict]]:
    spec = tmp_path / "spec.toml"
    spec.write_text(BASE.format(base=base or model_dir(tmp_path), method=method, export=export))
    result = CliRunner().invoke(main, ["lint", "--format", "json", str(spec)])
    assert result.exit_code in (0, 1), result.output
    issues = [i for f in json.loads(result.output)["files"] for i in f["issues"]]
    return result.exit_code, issues


def one(issues, severity="error") -> dict:
    mine = [i for i in issues if i["severity"] == severity]
    assert len(mine) == 1, issues
    return mine[0]


RULES = [
    # (method, export, key path, words of the rule, severity)
    (
        'kind = "lora"\nrank = 1024',
        'format = "peft"\ntargets = ["vllm"]',
        "method.rank",
        "largest max_lora_rank (512",
        "error",
    ),
    ('kind = "lora"\nrank = 64', 'format = "peft"\ntargets = ["vllm"]', "method.rank", "--max-lora-rank 64", "warning"),
    ('kind = "qlora"\nrank = 8', 'format = "peft"\ntargets = ["vllm"]', "method.kind", "NF4 base", "warning"),
    ('kind = "adapter"', 'targets = ["vllm"]', "method.kind", "no vLLM form", "error"),
    ('kind = "adapter"', 'targets = ["transformers"]', "method.kind", "torch_adapters", "error"),
    ('kind = "full"', 'targets = ["peft"]', "method.kind", "PEFT adapters for method.kind 'lora' or 'qlora'", "error"),
    ('kind = "adapter"', 'targets = ["gguf"]', "method.kind", "cannot be merged", "error"),
    ('kind = "lora"', 'format = "hf"\ndtype = "q4_0"', "export.dtype", "needs export.format = 'gguf'", "error"),
]


@pytest.mark.parametrize("method, export, path, words, severity", RULES)
def test_each_target_rule_is_reported_at_its_key_path(method, export, path, words, severity, tmp_path):
    code, issues = lint(tmp_path, method, export)
    issue = one(issues, severity)
    assert issue["key_path"] == path and words in issue["message"]
    assert code == (1 if severity == "error" else 0)


@pytest.mark.parametrize(
    "config, words",
    [
        ({"model_type": "gpt2"}, "model_type 'gpt2' has no GGUF layout"),
        ({"model_type": "mistral", "sliding_window": 1024}, "sliding_window=1024"),
        ({"model_type": "llama", "hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ],
)
@pytest.mark.parametrize("target", ["gguf", "ollama"])
def test_a_base_llama_cpp_cannot_serve_is_reported_at_model_base(config, words, target, tmp_path):
    base = model_dir(tmp_path, **config)
    code, issues = lint(tmp_path, 'kind = "full"', f'format = "gguf"\ntargets = ["{target}"]', base=base)
    issue = one(issues)
    assert code == 1 and issue["key_path"] == "model.base" and words in issue["message"]
    assert issue["message"].startswith(f"target {target!r}")


def test_a_sentencepiece_style_tokenizer_is_reported_for_gguf(tmp_path):
    base = model_dir(tmp_path)
    spm = {"model": {"type": "BPE", "byte_fallback": True, "vocab": {}, "merges": []}, "pre_tokenizer": None}
    (base / "tokenizer.json").write_text(json.dumps(spm))
    code, issues = lint(tmp_path, 'kind = "full"', 'format = "gguf"\ntargets = ["gguf"]', base=base)
    issue = one(issues)
    assert code == 1 and issue["key_path"] == "model.base" and "byte fallback" in issue["message"]


def test_specs_every_target_serves_lint_clean(tmp_path):
    code, issues = lint(
        tmp_path, 'kind = "lora"\nrank = 16', 'format = "peft"\ntargets = ["transformers", "peft", "vllm"]'
    )
    assert code == 0 and not [i for i in issues if i["severity"] == "error"], issues
    code, issues = lint(tmp_path, 'kind = "qlora"', 'format = "gguf"\ndtype = "q8_0"\ntargets = ["gguf", "ollama"]')
    assert code == 0 and not issues, issues


def test_an_unknown_target_is_a_schema_error_naming_the_choices(tmp_path):
    code, issues = lint(tmp_path, 'kind = "full"', 'targets = ["tgi"]')
    assert code == 1 and "vllm" in one(issues)["message"]


def test_lint_knows_the_gguf_layouts_the_exporter_writes():
    from ftc.backends.jax.io.gguf_export import LAYOUTS

    assert set(targets.GGUF_MODEL_TYPES) == set(LAYOUTS)
    assert targets.GGUF_ACTIVATIONS == {k: v.act for k, v in LAYOUTS.items() if v.act != "silu"}
