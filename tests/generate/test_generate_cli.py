"""`ftc generate` and `ftc chat` on a tiny Llama with a chat template: streamed text, prompt files
in and completions out (batching does not change them), an interactive chat with /reset and /exit,
and bad input refused with file:line, a non-zero exit and nothing written."""

import json

import jax
import pytest
import train_testlib as tl
from click.testing import CliRunner
from data_testlib import chat, write_jsonl

from ftc.backends.jax.generate import session
from ftc.backends.jax.generate.sampler import GenerateConfig, generate
from ftc.backends.jax.generate.source import load_source
from ftc.backends.jax.generate.text import StopStrings, decode
from ftc.cli import main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tl.make_model_dir(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def source(model_dir):
    return load_source(model_dir)


def _run(*args, input=None):
    return CliRunner().invoke(main, [str(a) for a in args], input=input)


def test_generate_streams_the_greedy_completion_of_a_chat_prompt(model_dir, source):
    result = _run("generate", model_dir, "--prompt", "hello there", "--max-new-tokens", 6)
    assert result.exit_code == 0, result.output
    ids = session.prompt_ids(source, "hello there", raw=False)
    assert source.tokenizer.decode(ids).startswith("<|im_start|>user\nhello there<|im_end|>")
    expected = generate(
        source.sampler(), source.params, [ids], jax.random.key(0), GenerateConfig(6, eos_ids=source.eos_ids)
    )
    text = decode(source.tokenizer, expected[0].tokens)
    assert text and text in result.stdout
    assert "6 tokens (length) from a" in result.output


def test_generate_file_writes_every_row_with_its_completion_whatever_the_batch(model_dir, tmp_path):
    rows = [
        chat("user", "hello there", id=1),
        {"prompt": "the quick brown", "completion": "fox", "id": 2},
        chat("system", "be brief", "user", "how are you", "assistant", "fine", id=3),
        {"prompt": "blue", "id": 4},
    ]
    prompts = write_jsonl(tmp_path / "prompts.jsonl", rows)
    outs = []
    for batch in (1, 3):
        out = tmp_path / f"out{batch}.jsonl"
        result = _run(
            "generate", model_dir, "--file", prompts, "--out", out, "--batch-size", batch,
            "--max-new-tokens", 5, "--temperature", 1.0, "--seed", 3,
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        outs.append([json.loads(line) for line in out.read_text().splitlines()])
    assert outs[0] == outs[1]
    assert [r["id"] for r in outs[0]] == [1, 2, 3, 4]
    for r in outs[0]:
        assert (r["finish_reason"], r["completion_tokens"]) in (
            ("length", 5),
            ("stop", 1),
            ("stop", 2),
            ("stop", 3),
            ("stop", 4),
            ("stop", 5),
        )
        assert r["prompt_tokens"] > 0 and isinstance(r["completion"], str)
    assert outs[0][2]["messages"][-1] == {"role": "assistant", "content": "fine"}  # the row as read


def test_a_stop_string_cuts_the_completion_before_it(source):
    config = GenerateConfig(12, eos_ids=source.eos_ids)
    ids = session.prompt_ids(source, "hello there", raw=False)
    free = generate(source.sampler(), source.params, [ids], jax.random.key(0), config)[0]
    text = decode(source.tokenizer, free.tokens)
    stop = text[3:5]
    rows = [session.PromptRow("x:1", {}, "hello there", None)]
    out = session.complete_rows(
        source, source.sampler(), source.params, rows, 0, config, StopStrings(source.tokenizer, [stop]), progress=False
    )
    assert out[0]["completion"] == text[: text.find(stop)]
    assert out[0]["finish_reason"] in ("stop_string", "stop")


@pytest.mark.parametrize(
    "rows, message",
    [
        ([], "no prompt rows (the file is empty)"),
        ([chat("user", "hi"), {"text": "no prompt here"}], "prompts.jsonl:2: no 'messages' or 'prompt' key"),
        (['{"prompt": "a"', {"messages": []}], "prompts.jsonl:1: invalid JSON"),
        (
            [{"messages": [{"role": "assistant", "content": "x"}]}],
            "prompts.jsonl:1: 'messages' holds only an assistant",
        ),
        ([{"prompt": "word " * 40}], "prompts.jsonl:1: the prompt has"),  # the tiny model has 64 positions
    ],
    ids=["empty", "no-messages", "bad-json", "only-assistant", "too-long"],
)
def test_bad_prompt_files_are_refused_with_file_and_line_and_nothing_written(model_dir, tmp_path, rows, message):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", rows)
    out = tmp_path / "out.jsonl"
    result = _run("generate", model_dir, "--file", prompts, "--out", out, "--max-new-tokens", 2)
    assert result.exit_code == 1
    assert message in result.output
    assert "Traceback" not in result.output
    assert not out.exists()


def test_bad_sources_and_usage_are_refused(model_dir, tmp_path):
    result = _run("generate", tmp_path / "nowhere", "--prompt", "hi")
    assert result.exit_code == 1 and "error:" in result.output and "nowhere" in result.output
    assert _run("generate", model_dir).exit_code == 2  # neither --prompt nor --file
    result = _run("generate", model_dir, "--prompt", "  ")
    assert result.exit_code == 1 and "error: --prompt is empty" in result.output
    import transformers

    bert = transformers.BertConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    transformers.BertModel(bert).save_pretrained(tmp_path / "bert")
    for command in ("generate", "chat"):
        result = _run(command, tmp_path / "bert", *(["--prompt", "hi"] if command == "generate" else []))
        assert result.exit_code == 1 and "it is a bert model, not a causal language model" in result.output
        assert "internal error" not in result.output
    (tmp_path / "taken.jsonl").write_text("keep me\n")
    prompts = write_jsonl(tmp_path / "p.jsonl", [chat("user", "hi")])
    result = _run("generate", model_dir, "--file", prompts, "--out", tmp_path / "taken.jsonl")
    assert result.exit_code == 2 and "--force" in result.output
    assert (tmp_path / "taken.jsonl").read_text() == "keep me\n"


def test_chat_keeps_the_history_until_reset_and_exits(model_dir, source):
    result = _run(
        "chat", model_dir, "--max-new-tokens", 4, input="hello there\nhow are you\n/reset\nblue\n/exit\nnever\n"
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.count("\n") >= 4 and "(history cleared)" in result.stdout
    # The same turns through the library: the second turn sees the first, the third does not.
    config = GenerateConfig(4, eos_ids=source.eos_ids)
    seen = []

    def write(text):
        seen.append(text)

    history = session.chat(
        source,
        source.sampler(),
        source.params,
        ["hello there", "how are you"],
        write,
        0,
        config,
        StopStrings(source.tokenizer, []),
    )
    assert [m["role"] for m in history] == ["user", "assistant", "user", "assistant"]
    history = session.chat(
        source,
        source.sampler(),
        source.params,
        ["hello there", "/reset", "blue"],
        write,
        0,
        config,
        StopStrings(source.tokenizer, []),
    )
    assert [m["content"] for m in history if m["role"] == "user"] == ["blue"]
