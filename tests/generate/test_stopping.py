"""What ends a generation and what fixes its randomness, as a user meets them: the EOS ids come
from generation_config.json, config.json and the tokenizer (and a row stops where transformers'
`generate` stops on the same directory); `--stop` cuts the streamed text; `--seed` makes sampled
text reproducible; `--dtype bfloat16` holds weights and cache in bfloat16."""

import json
import shutil

import jax
import pytest
import torch
import train_testlib as tl
import transformers
from click.testing import CliRunner
from generate_testlib import hf_greedy

from ftc.backends.jax.generate import session
from ftc.backends.jax.generate.sampler import STOP, GenerateConfig, generate
from ftc.backends.jax.generate.source import load_source
from ftc.cli import main

PROMPT = "the quick brown fox"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tl.make_model_dir(tmp_path_factory.mktemp("model"))


def _free_tokens(src, n=12):
    ids = session.prompt_ids(src, PROMPT, raw=True)
    return ids, generate(src.sampler(), src.params, [ids], jax.random.key(0), GenerateConfig(n))[0].tokens


def _with_eos(model_dir, dest, generation_eos, config_eos):
    shutil.copytree(model_dir, dest)
    gen = json.loads((dest / "generation_config.json").read_text())
    (dest / "generation_config.json").write_text(json.dumps({**gen, "eos_token_id": generation_eos}))
    config = json.loads((dest / "config.json").read_text())
    (dest / "config.json").write_text(json.dumps({**config, "eos_token_id": config_eos}))
    return dest


def test_eos_ids_are_generation_config_then_config_then_tokenizer(model_dir, tmp_path):
    free = _free_tokens(load_source(model_dir))[1]
    stop_at, never = free[2], 299 if 299 not in free else 298  # a token the model emits third
    edited = _with_eos(model_dir, tmp_path / "eos", [stop_at, never], 1)
    src = load_source(edited)
    tokenizer_eos = src.tokenizer.eos_token_id
    assert tokenizer_eos not in (stop_at, never, 1)
    assert src.eos_ids == (stop_at, never, 1, tokenizer_eos)

    ids = session.prompt_ids(src, PROMPT, raw=True)
    out = generate(src.sampler(), src.params, [ids], jax.random.key(0), GenerateConfig(12, eos_ids=src.eos_ids))[0]
    assert out.tokens == free[:3] and out.finish == STOP
    # transformers reads the same generation_config.json and stops at the same token.
    model = transformers.AutoModelForCausalLM.from_pretrained(edited, dtype=torch.float32).eval()
    assert hf_greedy(model, [ids], 12, eos_token_id=model.generation_config.eos_token_id) == [list(out.tokens)]

    result = CliRunner().invoke(main, ["generate", str(edited), "--prompt", PROMPT, "--raw", "--max-new-tokens", 12])
    assert result.exit_code == 0, result.output
    assert "3 tokens (stop)" in result.output


def test_the_tokenizers_eos_alone_ends_generation_when_the_configs_name_none(model_dir, tmp_path):
    edited = _with_eos(model_dir, tmp_path / "eos", None, None)
    src = load_source(edited)
    assert src.eos_ids == (src.tokenizer.eos_token_id,)


def test_a_stop_string_on_the_command_line_cuts_the_streamed_text(model_dir):
    src = load_source(model_dir)
    text = src.tokenizer.decode(_free_tokens(src)[1], skip_special_tokens=True)
    stop = text[4:6]
    assert text.find(stop) == 4
    args = ["generate", model_dir, "--prompt", PROMPT, "--raw", "--max-new-tokens", 12]
    result = CliRunner().invoke(main, [*args, "--stop", stop, "--stop", "never appears"])
    assert result.exit_code == 0, result.output
    assert result.stdout == text[:4] + "\n"
    assert "(stop_string)" in result.output


def test_a_file_rows_completion_tokens_end_at_its_stop_string_as_the_streamed_count_does(model_dir, tmp_path):
    src = load_source(model_dir)
    free = _free_tokens(src, 20)[1]
    text = src.tokenizer.decode(free, skip_special_tokens=True)
    stop = text[4:6]
    through = next(n for n in range(1, 21) if stop in src.tokenizer.decode(free[:n], skip_special_tokens=True))
    assert through < 16  # a batch checks its stops every 16 tokens: the row runs on past it
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": PROMPT}) + "\n")
    common = ["--raw", "--max-new-tokens", 20, "--stop", stop]
    out = tmp_path / "o.jsonl"
    result = CliRunner().invoke(main, ["generate", model_dir, "--file", prompts, "--out", out, *common])
    assert result.exit_code == 0, result.output
    row = json.loads(out.read_text())
    assert (row["completion"], row["finish_reason"]) == (text[:4], "stop_string")
    assert row["completion_tokens"] == through
    streamed = CliRunner().invoke(main, ["generate", model_dir, "--prompt", PROMPT, *common])
    assert f"{through} tokens (stop_string)" in streamed.output
    # an EOS a few tokens past the stop, inside the batch's 16: the row still ended at its stop text
    eos = next(k for k in range(through + 1, 16) if free[k] not in free[:k])
    eos_dir = tmp_path / "eos"
    _with_eos(model_dir, eos_dir, int(free[eos]), int(free[eos]))
    result = CliRunner().invoke(main, ["generate", str(eos_dir), "--file", prompts, "--out", out, "--force", *common])
    assert result.exit_code == 0, result.output
    row = json.loads(out.read_text())
    assert (row["completion"], row["finish_reason"], row["completion_tokens"]) == (text[:4], "stop_string", through)


def test_the_same_seed_samples_the_same_text_and_another_seed_other_text(model_dir):
    def sample(seed):
        args = ["generate", model_dir, "--prompt", PROMPT, "--raw", "--max-new-tokens", 16]
        result = CliRunner().invoke(main, [*args, "--temperature", "1.0", "--seed", str(seed)])
        assert result.exit_code == 0, result.output
        return result.stdout

    first = sample(5)
    assert sample(5) == first
    assert sample(6) != first
    greedy = CliRunner().invoke(main, ["generate", model_dir, "--prompt", PROMPT, "--raw", "--max-new-tokens", 16])
    assert greedy.stdout != first  # temperature 1 did sample


def test_bfloat16_holds_the_weights_and_the_cache_in_bfloat16(model_dir):
    src = load_source(model_dir, dtype="bfloat16")
    assert {str(x.dtype) for x in jax.tree.leaves(src.params)} == {"bfloat16"}
    sampler = src.sampler()
    assert str(sampler.dtype) == "bfloat16"
    ids = session.prompt_ids(src, PROMPT, raw=True)
    out = generate(sampler, src.params, [ids, ids[:5]], jax.random.key(0), GenerateConfig(8))
    assert [len(c.tokens) for c in out] == [8, 8]
    again = generate(sampler, src.params, [ids[:5], ids[:5]], jax.random.key(0), GenerateConfig(8))
    assert again == [out[1], out[1]]  # what a row generates does not depend on its neighbour
