"""OpenAI chat rows as people export them: tool use (an assistant's `tool_calls` with null
content, `tool` messages, the row's `tools`) reads and trains the calls; content parts that are
not text, a row of another format and a tokenizer without a chat template are each named."""

import json

import pytest
from data_testlib import chat, make_tokenizer, spec_data_options, write_jsonl

from ftc.backends.jax.data import tokenize
from ftc.backends.jax.data.datasets import build_datasets
from ftc.backends.jax.data.read import DataError, read_rows

# ChatML that writes tool calls (as Qwen2.5's template does) and the tools given.
TOOL_TEMPLATE = (
    "{% if tools %}{{ '<|im_start|>system\ntools: ' + (tools | map(attribute='function.name') | join(',')) + "
    "'<|im_end|>\n' }}{% endif %}"
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] }}"
    "{% for c in m.tool_calls or [] %}<tool_call>{{ {'name': c.function.name, 'arguments': c.function.arguments}"
    " | tojson }}</tool_call>{% endfor %}{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CALL = {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}
TOOL_ROW = {
    "messages": [
        {"role": "user", "content": "weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        {"role": "assistant", "content": "It is sunny."},
    ],
    "tools": [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}],
}


def tool_tokenizer():
    tok = make_tokenizer()
    tok.chat_template = TOOL_TEMPLATE
    return tok


def supervised_text(tok, item) -> str:
    return tok.decode([t for t, w in zip(item.ids, item.weights) if w > 0])


def test_an_openai_tool_call_conversation_trains_the_call_and_the_answer_not_the_tool_result(tmp_path):
    path = write_jsonl(tmp_path / "tools.jsonl", [TOOL_ROW])
    rows = read_rows(path, format="chat", on_bad_row="error").rows
    call = rows[0].data["messages"][1]
    assert call["content"] == "" and call["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert rows[0].data["messages"][2]["tool_call_id"] == "c1"
    tok = tool_tokenizer()
    [item] = tokenize.tokenize_rows(rows, format="chat", tokenizer=tok, train_on="assistant")
    assert tok.decode(item.ids).startswith("<|im_start|>system\ntools: weather<|im_end|>")
    assert supervised_text(tok, item) == (
        '<tool_call>{"name": "weather", "arguments": {"city": "Paris"}}</tool_call><|im_end|>It is sunny.<|im_end|>'
    )
    # The default data.clean.roles takes OpenAI's tool role, and a call-only turn is not "empty".
    options = spec_data_options("chat", train=path, tokenizer=tok, max_seq_len=128)
    assert build_datasets(**options, batch_size=1).stats.train_sequences == 1
    only_call = write_jsonl(tmp_path / "call.jsonl", [{"messages": TOOL_ROW["messages"][:2]}])
    options = spec_data_options("chat", train=only_call, tokenizer=tok, max_seq_len=128)
    assert build_datasets(**options, batch_size=1).stats.train_sequences == 1


def test_a_template_that_drops_tool_calls_is_refused_naming_the_row(tmp_path):
    path = write_jsonl(tmp_path / "tools.jsonl", [TOOL_ROW])
    rows = read_rows(path, format="chat", on_bad_row="error").rows
    with pytest.raises(DataError, match=rf"^{path}:1: messages\[1\] calls tools, and the tokenizer's chat template"):
        tokenize.tokenize_rows(rows, format="chat", tokenizer=make_tokenizer(), train_on="assistant")


@pytest.mark.parametrize(
    "call,problem",
    [
        ("not a list", "'messages[1].tool_calls' is a string, expected an array of tool calls"),
        ([{"id": "x"}], '\'messages[1].tool_calls[0].function\' is null, expected {"name", "arguments"}'),
        (
            [{"function": {"name": "f", "arguments": "{oops"}}],
            "'messages[1].tool_calls[0].function.arguments' is a string that is not JSON",
        ),
        (
            [{"function": {"arguments": "{}"}}],
            "missing key 'messages[1].tool_calls[0].function.name', expected a string",
        ),
    ],
)
def test_a_malformed_tool_call_is_named_by_its_key_path(tmp_path, call, problem):
    row = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": None, "tool_calls": call}]}
    with pytest.raises(DataError) as e:
        read_rows(write_jsonl(tmp_path / "t.jsonl", [row]), format="chat", on_bad_row="error")
    assert e.value.problems[0].split(": ", 1)[1].startswith(problem)


def test_content_parts_join_their_text_and_an_image_part_is_named(tmp_path):
    parts = [{"type": "text", "text": "hello"}, {"type": "text", "text": " there"}]
    image = [{"type": "text", "text": "what is this?"}, {"type": "image_url", "image_url": {"url": "x.png"}}]
    rows = [
        {"messages": [{"role": "user", "content": "hi", "name": "bob"}, {"role": "assistant", "content": parts}]},
        {"messages": [{"role": "user", "content": image}, {"role": "assistant", "content": "a cat"}]},
    ]
    with pytest.raises(DataError) as e:
        read_rows(write_jsonl(tmp_path / "p.jsonl", rows), format="chat", on_bad_row="error")
    assert e.value.problems == (
        f'{tmp_path / "p.jsonl"}:2: \'messages[0].content[1].type\' is "image_url", expected "text" '
        "(ftc trains on text only)",
    )
    kept = read_rows(str(tmp_path / "p.jsonl"), format="chat", on_bad_row="skip").rows
    assert kept[0].data["messages"][1]["content"] == "hello there"


def test_a_row_of_another_format_says_which_format_reads_it(tmp_path):
    rows = [
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]},
        {"instruction": "say hi", "input": "", "output": "hi"},
        {"prompt": "a", "completion": "b"},
        {"something": "else"},
    ]
    with pytest.raises(DataError) as e:
        read_rows(write_jsonl(tmp_path / "m.jsonl", rows), format="chat", on_bad_row="error")
    hints = [p.rsplit("messages", 1)[1] for p in e.value.problems]
    assert hints == [
        " (it reads as data.format = 'sharegpt')",
        " (it reads as data.format = 'alpaca')",
        " (it reads as data.format = 'completion' or 'prompt')",
        "",
    ]


def test_a_tokenizer_without_a_chat_template_is_one_error_for_chat_rows(tmp_path):
    tok = make_tokenizer()
    tok.chat_template = None
    path = write_jsonl(tmp_path / "c.jsonl", [chat("user", "hi", "assistant", "hello")])
    options = spec_data_options("chat", train=path, tokenizer=tok, max_seq_len=64)
    with pytest.raises(DataError, match=rf"^{path}:1: the tokenizer has no chat template.*set model.tokenizer"):
        build_datasets(**options, batch_size=1)
    completion = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "hi", "completion": json.dumps("hello")}])
    options = spec_data_options("completion", train=completion, tokenizer=tok, max_seq_len=64)
    assert build_datasets(**options, batch_size=1).stats.train_sequences == 1  # no template needed


def test_messages_written_as_json_text_read_as_the_messages(tmp_path):
    messages = chat("user", "hi", "assistant", "hello")["messages"]
    path = tmp_path / "m.csv"
    path.write_text('messages\n"' + json.dumps(messages).replace('"', '""') + "\"\n\"[{'role': 'user'}]\"\n")
    result = read_rows(str(path), format="chat", on_bad_row="skip")
    assert [r.data for r in result.rows] == [{"messages": messages}]
    assert result.skipped == (
        f"{path}:3: 'messages' is a string that is not a JSON array, expected an array of messages",
    )


def test_a_bare_list_of_messages_as_a_row_says_to_wrap_it(tmp_path):
    path = write_jsonl(tmp_path / "b.jsonl", [chat("user", "hi", "assistant", "hello")["messages"]])
    with pytest.raises(DataError) as e:
        read_rows(path, format="chat", on_bad_row="error")
    assert e.value.problems == (
        f'{path}:1: row is an array, expected a JSON object (a bare list of messages: write {{"messages": [...]}})',
    )


def test_preference_responses_that_repeat_an_explicit_prompt_are_not_rendered_with_it_twice(tmp_path):
    prompt = [{"role": "user", "content": "q"}]
    repeated = {
        "prompt": prompt,
        "chosen": prompt + [{"role": "assistant", "content": "a"}],
        "rejected": prompt + [{"role": "assistant", "content": "b"}],
    }
    plain = {
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": "a"}],
        "rejected": [{"role": "assistant", "content": "b"}],
    }
    ultrafeedback = {**repeated, "prompt": "q"}  # the prompt as text, the responses whole conversations
    path = write_jsonl(tmp_path / "p.jsonl", [repeated, plain, ultrafeedback])
    rows = read_rows(path, format="preference", on_bad_row="error").rows
    assert rows[0].data == rows[1].data == rows[2].data == plain
