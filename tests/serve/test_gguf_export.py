"""GGUF export: for every family with a llama.cpp layout, a tiny model's GGUF file loaded back by
transformers' GGUF loader (where it reads the architecture) and by ftc's own GGUF import computes
ftc's logits (float32: float tolerance; q8_0 / q4_0 / f16 / bf16: the same tolerance against ftc on
the weights the file holds, and a stated distance from the unrounded model); the tokenizer, the
chat template, the EOS and end-of-turn ids are in the metadata; the Modelfile's TEMPLATE pieces
re-make the chat template."""

from __future__ import annotations

import dataclasses
import json

import data_testlib
import gguf
import pytest
import torch
import transformers as tf

from ftc.backends.jax.io import gguf_export, gguf_export_format, gguf_export_vocab, gguf_import, hf_checkpoint, verify
from ftc.backends.jax.io.export_common import ExportError
from ftc.backends.jax.io.gguf_export_format import TRANSFORMERS_READS, stored_params

TINY = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=320,
    intermediate_size=128,
    max_position_embeddings=64,
)
CASES = {
    "llama": lambda: tf.LlamaConfig(**TINY),
    # transformers reads no attention_bias from GGUF metadata: checked by ftc's import only
    "llama-bias": lambda: tf.LlamaConfig(**TINY, attention_bias=True, mlp_bias=True),
    "mistral": lambda: tf.MistralConfig(**TINY, sliding_window=None),
    "qwen2": lambda: tf.Qwen2Config(**TINY, use_sliding_window=False),
    # head_dim 128: transformers' GGUF loader assumes it for Qwen3 (it does not read key_length)
    "qwen3": lambda: tf.Qwen3Config(**TINY, head_dim=128),
    "gemma": lambda: tf.GemmaConfig(**TINY, head_dim=32),
}
BATCH = verify.fixed_batch(320, batch=2, seq_len=12, seed=3)
TOL = 1e-4


def model_dir(tmp_path, case: str, tie: bool | None = None):
    torch.manual_seed(0)
    config = CASES[case]()
    if tie is not None:
        config.tie_word_embeddings = tie
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # norms start at 1 and biases at 0: perturb so a misplaced one shows
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    out = tmp_path / case
    model.save_pretrained(out)
    data_testlib.make_tokenizer().save_pretrained(out)
    return out


def export(directory, out, dtype: str):
    loaded = hf_checkpoint.load_model(directory)
    out.mkdir(parents=True, exist_ok=True)
    tok = gguf_export.write_gguf(
        out / gguf_export.GGUF_FILE,
        model_type=loaded.arch.model_type,
        arch=loaded.arch,
        tensors=hf_checkpoint._hf_tensors_of(loaded.family, loaded.arch, loaded.params),
        tokenizer_dir=directory,
        dtype=dtype,
        name="tiny",
    )
    gguf_export.write_modelfile(out, tok)
    return loaded, tok


def largest_difference(ftc_logits, reference) -> float:
    diff, scale = verify.compare(ftc_logits, reference, BATCH)
    return diff / max(1.0, scale)


def reloaded_by_ftc_import(path, tmp_path):
    hf_dir = tmp_path / "imported"
    gguf_import.convert_gguf(path, hf_dir)
    return verify.load_reference(hf_dir, causal=True), hf_dir


@pytest.mark.parametrize("case", sorted(CASES))
def test_float32_gguf_reloads_with_ftc_logits_and_ends_turns_where_the_chat_template_does(case, tmp_path):
    directory = model_dir(tmp_path, case)
    loaded, _ = export(directory, tmp_path / "out", "float32")
    path = tmp_path / "out" / gguf_export.GGUF_FILE
    fields = gguf.GGUFReader(str(path)).fields
    im_end = data_testlib.make_tokenizer().convert_tokens_to_ids("<|im_end|>")
    assert (
        fields["tokenizer.ggml.eot_token_id"].contents() == fields["tokenizer.ggml.eos_token_id"].contents() == im_end
    )
    ours = verify.ftc_outputs(loaded, BATCH, "logits")
    by_ftc, _ = reloaded_by_ftc_import(path, tmp_path)
    assert largest_difference(ours, verify.reference_outputs(by_ftc, BATCH, "logits")) < TOL
    if case != "llama-bias" and gguf_export.LAYOUTS[case].arch in TRANSFORMERS_READS:
        by_tf = tf.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
        assert largest_difference(ours, verify.reference_outputs(by_tf, BATCH, "logits")) < TOL


@pytest.mark.parametrize("dtype", ["q8_0", "q4_0", "float16", "bfloat16"])
def test_quantised_gguf_computes_ftc_on_the_weights_it_holds(dtype, tmp_path):
    directory = model_dir(tmp_path, "llama", tie=False)
    loaded, _ = export(directory, tmp_path / "out", dtype)
    path = tmp_path / "out" / gguf_export.GGUF_FILE
    reader = gguf.GGUFReader(str(path))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == gguf_export.QTYPES[dtype] and types["blk.0.attn_norm.weight"] == "F32"
    if dtype == "q4_0":  # the embedding and the LM head keep 8 bits
        assert types["token_embd.weight"] == types["output.weight"] == "Q8_0"
    rounded = dataclasses.replace(loaded, params=stored_params(loaded, loaded.params, dtype))
    by_tf = tf.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    reference = verify.reference_outputs(by_tf, BATCH, "logits")
    assert largest_difference(verify.ftc_outputs(rounded, BATCH, "logits"), reference) < TOL
    # and the stated distance of the file from the unrounded model (tiny random weights, logits ~1)
    moved = largest_difference(verify.ftc_outputs(loaded, BATCH, "logits"), reference)
    assert moved < {"q8_0": 0.02, "q4_0": 0.2, "float16": 2e-3, "bfloat16": 0.02}[dtype]


def test_gguf_metadata_carries_tokenizer_chat_template_eos_and_end_of_turn(tmp_path):
    directory = model_dir(tmp_path, "qwen2")
    _, tok = export(directory, tmp_path / "out", "float32")
    reader = gguf.GGUFReader(str(tmp_path / "out" / gguf_export.GGUF_FILE))
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.tokens")}
    hf_tok = tf.AutoTokenizer.from_pretrained(directory)
    im_end = hf_tok.convert_tokens_to_ids("<|im_end|>")
    assert fields["general.architecture"] == "qwen2"
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert fields["tokenizer.ggml.eos_token_id"] == hf_tok.eos_token_id == im_end
    assert fields["tokenizer.ggml.eot_token_id"] == im_end  # what ChatML writes after an answer
    assert fields["tokenizer.chat_template"] == hf_tok.chat_template
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    assert len(tokens) == 320 and tokens[im_end] == "<|im_end|>" and tokens[-1] == "[PAD319]"
    # transformers' own GGUF tokenizer conversion (what ftc's import uses) gives the same ids
    _, hf_dir = reloaded_by_ftc_import(tmp_path / "out" / gguf_export.GGUF_FILE, tmp_path)
    again = tf.AutoTokenizer.from_pretrained(hf_dir)
    text = "<|im_start|>user\nhello there, quick fox 2024!<|im_end|>\n"
    assert again(text)["input_ids"] == hf_tok(text)["input_ids"]
    assert again.chat_template == hf_tok.chat_template
    modelfile = (tmp_path / "out" / gguf_export.MODELFILE).read_text()
    assert modelfile.startswith("FROM ./model.gguf\n") and 'PARAMETER stop "<|im_end|>"' in modelfile
    assert 'TEMPLATE """' in modelfile and "{{ .Content }}" in modelfile


CONVERSATIONS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}],
]
DEFAULT_SYSTEM = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are helpful.<|im_end|>\n{% endif %}"
    + data_testlib.CHATML
)


@pytest.mark.parametrize("template", [data_testlib.CHATML, DEFAULT_SYSTEM], ids=["chatml", "default-system"])
def test_ollama_template_pieces_render_what_the_chat_template_renders(template):
    tok = data_testlib.make_tokenizer()
    tok.chat_template = template
    pieces = gguf_export_vocab.turn_pieces(tok, template)
    assert pieces is not None
    for messages in CONVERSATIONS:
        for generation in (False, True):
            expected = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
            assert gguf_export_vocab.render_pieces(pieces, messages, generation) == expected


@pytest.mark.parametrize(
    "case, change, message",
    [
        ("mistral", dict(sliding_window=8), "sliding_window=8"),
        ("llama", dict(hidden_act="gelu"), "hidden_act 'gelu'"),
    ],
)
def test_a_model_llama_cpp_would_compute_differently_is_refused(case, change, message, tmp_path):
    directory = model_dir(tmp_path, case)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(gguf_export.GgufExportError, match=message):
        export(directory, tmp_path / "out", "float32")


@pytest.mark.parametrize("case", ["qwen3", "gemma"])
def test_attention_biases_llama_cpp_does_not_build_are_refused(case, monkeypatch, tmp_path):
    """llama.cpp's qwen3 and gemma graphs have no q/k/v/o biases (and refuse a file holding
    tensors they do not create); transformers builds them from attention_bias=true."""
    base = CASES[case]
    monkeypatch.setitem(CASES, case, lambda: type(base())(**{**base().to_dict(), "attention_bias": True}))
    directory = model_dir(tmp_path, case)
    assert "o_proj.bias" in (directory / "model.safetensors").read_bytes()[:20000].decode("latin-1")
    with pytest.raises(gguf_export.GgufExportError, match=f"attention_bias=true: llama.cpp's {case} graph"):
        export(directory, tmp_path / "out", "float32")


def test_a_family_with_no_gguf_layout_is_refused_by_its_model_type(tmp_path):
    import generate_testlib

    _, loaded = generate_testlib.saved("gpt2", tmp_path / "gpt2")  # its arch names no model_type
    with pytest.raises(ExportError, match="cannot export GGUF: model_type 'gpt2' has no GGUF layout"):
        gguf_export_format.layout_for(loaded)


def test_a_tokenizer_gguf_cannot_hold_is_refused_naming_the_file(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    directory = model_dir(tmp_path, "llama")
    words = Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]").save_pretrained(directory)
    with pytest.raises(gguf_export.GgufExportError, match=r"tokenizer.json: a WordLevel tokenizer"):
        export(directory, tmp_path / "out", "float32")


@pytest.mark.parametrize("case", sorted(CASES))
def test_hf_export_generation_config_stops_at_the_chat_templates_end_of_turn(case, tmp_path):
    import types

    from ftc.backends.jax.io import export_common

    directory = model_dir(tmp_path, case)
    tok = data_testlib.make_tokenizer()
    tok.eos_token = "<|endoftext|>"  # the tokenizer's EOS is not what ends an assistant turn
    tok.save_pretrained(directory)
    loaded = hf_checkpoint.load_model(directory)
    trained = types.SimpleNamespace(
        model=types.SimpleNamespace(family=loaded.family, arch=loaded.arch),
        hf_config=loaded.hf_config,
        model_dir=directory,
        tokenizer_dir=directory,
    )
    export_common.save_hf(trained, tmp_path / "hf", loaded.params, "float32")
    eos = json.loads((tmp_path / "hf" / "generation_config.json").read_text())["eos_token_id"]
    stops = eos if isinstance(eos, list) else [eos]
    assert tok.convert_tokens_to_ids("<|im_end|>") in stops and tok.eos_token_id in stops
    served = tf.GenerationConfig.from_pretrained(tmp_path / "hf")
    assert tok.convert_tokens_to_ids("<|im_end|>") in served.eos_token_id


@pytest.mark.parametrize(
    "case, config",
    [
        # transformers' GGUF loader reads no RoPE scaling: it built plain RoPE and verify failed a good file
        (
            "llama",
            dict(
                rope_parameters={
                    "rope_type": "llama3",
                    "rope_theta": 500000.0,
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 16,
                }
            ),
        ),
        ("llama", dict(rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0})),
        ("llama", dict(attention_bias=True)),  # it dropped the biases
        ("qwen3", dict(head_dim=32)),  # it assumes head_dim 128: the load crashed ("ignore_mismatched_sizes")
    ],
    ids=["llama3-rope", "linear-rope", "llama-bias", "qwen3-head-dim-32"],
)
def test_verify_reloads_a_gguf_transformers_would_misread_through_ftcs_import(case, config, monkeypatch, tmp_path):
    import types

    base = CASES[case]
    monkeypatch.setitem(CASES, case, lambda: type(base())(**{**base().to_dict(), **config}))
    loaded, _ = export(model_dir(tmp_path, case), tmp_path / "out", "float32")
    assert gguf_export_format.loader_name(loaded).startswith("ftc GGUF import")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    reference = gguf_export_format.reload(types.SimpleNamespace(model=loaded), tmp_path / "out", scratch, True)
    ours = verify.ftc_outputs(loaded, BATCH, "logits")
    assert largest_difference(ours, verify.reference_outputs(reference, BATCH, "logits")) < TOL


def test_verify_reloads_a_plain_llama_gguf_through_transformers(tmp_path):
    loaded, _ = export(model_dir(tmp_path, "llama"), tmp_path / "out", "float32")
    assert gguf_export_format.loader_name(loaded).startswith("transformers GGUF loader")
