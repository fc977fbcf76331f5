"""`ftc lint` of a GRPO spec: a group of one, an answer-needing reward on rows without an answer or
on a format without answers, a batch that is no whole number of groups, a bad regex, no rewards
-- each refused with the key path; and the `prompt` data format's rows."""

from __future__ import annotations

import json

import pytest
from data_testlib import write_jsonl

from ftc.backends.jax.data.formats import prompt
from ftc.backends.jax.data.read import BadRow
from ftc.spec import lint_file

GOOD = """ftc = 1
name = "g"
[model]
base = "/nonexistent/model"
max_seq_len = 64
[data]
format = "prompt"
train = "{train}"
[training]
objective = "grpo"
steps = 4
batch_size = 8
micro_batch_size = 8
learning_rate = 1e-5
grpo_group_size = 4
grpo_max_new_tokens = 16
grpo_rewards = [{{ kind = "numeric" }}, {{ kind = "regex", pattern = "Answer: \\\\d+", weight = 0.5 }}]
"""


def _errors(tmp_path, text: str, rows=None) -> dict[str, str]:
    train = tmp_path / "prompts.jsonl"
    write_jsonl(train, rows or [{"messages": [{"role": "user", "content": "1+1?"}], "answer": "2"}])
    path = tmp_path / "g.toml"
    path.write_text(text.format(train=train))
    return {i.key_path: i.message for i in lint_file(str(path)) if i.severity == "error"}


def test_a_good_grpo_spec_lints_clean(tmp_path):
    assert _errors(tmp_path, GOOD) == {}


def test_a_group_of_one_is_refused_at_its_key_path(tmp_path):
    errors = _errors(tmp_path, GOOD.replace("grpo_group_size = 4", "grpo_group_size = 1"))
    assert errors["training.grpo_group_size"] == "must be >= 2, got 1", errors


def test_an_answer_reward_on_rows_without_answers_names_the_reward_and_the_rows(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "hi"}]}, {"messages": [{"role": "user", "content": "x"}]}]
    errors = _errors(tmp_path, GOOD, rows)
    message = errors["training.grpo_rewards[0].kind"]
    assert "2 training row(s) have no" in message and "prompts.jsonl:1" in message and "prompts.jsonl:2" in message
    # A reward that needs no answer is fine on the same rows.
    assert _errors(tmp_path, GOOD.replace('{{ kind = "numeric" }}, ', ""), rows) == {}


def test_cross_key_rules_name_their_keys(tmp_path):
    assert "training.batch_size" in _errors(tmp_path, GOOD.replace("batch_size = 8", "batch_size = 6"))
    assert "training.grpo_max_new_tokens" in _errors(tmp_path, GOOD.replace("= 16", "= 64"))
    bad_regex = GOOD.replace('"Answer: \\\\d+"', '"(unclosed"')
    assert "training.grpo_rewards[1].pattern" in _errors(tmp_path, bad_regex)
    assert "training.grpo_rewards" in _errors(tmp_path, GOOD.replace("grpo_rewards = [", "grpo_rewards = [] #"))
    chat = _errors(tmp_path, GOOD.replace('format = "prompt"', 'format = "chat"'))
    assert "needs data.format 'prompt'" in chat["training.objective"]
    assert "has no answer field" in chat["training.grpo_rewards[0].kind"]


def test_prompt_rows_hold_messages_and_an_optional_answer():
    row = {"messages": [{"role": "user", "content": "2+2?"}], "answer": 4, "id": "x"}
    assert prompt.normalise(row) == {"messages": [{"role": "user", "content": "2+2?"}], "answer": "4", "text": None}
    assert prompt.normalise({"messages": [{"role": "user", "content": "hi"}]})["answer"] is None
    with pytest.raises(BadRow, match="ends with an assistant message"):
        prompt.normalise(
            json.loads('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}')
        )
    with pytest.raises(BadRow, match="'answer' is"):
        prompt.normalise({"messages": [{"role": "user", "content": "a"}], "answer": [1]})


def test_a_reward_weight_past_float32_is_refused_at_its_key_path(tmp_path):
    """Rewards are float32: a weight of 1e39 (finite in TOML's float64) makes every total inf."""
    errors = _errors(tmp_path, GOOD.replace("weight = 0.5", "weight = 1e39"))
    assert errors["training.grpo_rewards[1].weight"].startswith("expected a number within float32's range"), errors


def test_a_base_models_tokenizer_without_a_chat_template_takes_text_prompts_as_they_are(tmp_path):
    """TRL's standard GRPO rows ({"prompt": "text"}) on a base model: the text is the prompt, as TRL
    uses it. They were refused with `ftc generate`'s advice (--raw) and no row named; a prompt of
    messages still needs the template, and says so naming its row."""
    from data_testlib import make_tokenizer

    from ftc.backends.jax.data.read import DataError, read_rows

    tok = make_tokenizer()
    tok.chat_template = None
    rows = [{"prompt": "The capital of France is", "answer": "Paris"}, {"messages": [{"role": "user", "content": "x"}]}]
    read = read_rows(write_jsonl(tmp_path / "p.jsonl", rows), format="prompt", on_bad_row="error").rows
    (tokens,) = prompt.FORMAT.tokenize(tok, read[:1], None, None)
    assert tokens.ids.tolist() == tok("The capital of France is", add_special_tokens=True)["input_ids"]
    assert not tokens.weights.any()
    with pytest.raises(DataError, match=r"p\.jsonl:2: the tokenizer has no chat template, and a prompt of messages"):
        prompt.FORMAT.tokenize(tok, read[1:], None, None)


def test_prompt_rows_all_skipped_as_malformed_are_refused_naming_the_rows(tmp_path):
    """data.on_bad_row = "skip" with no good row left: the run said `max() arg is an empty sequence`."""
    import train_testlib as tl
    from data_testlib import make_tokenizer

    from ftc.backends.jax.data.read import DataError
    from ftc.backends.jax.rl.loop import prompt_data

    train = write_jsonl(tmp_path / "bad.jsonl", [{"foo": 1}, {"messages": []}])
    spec = tl.spec(
        {
            "data": {"format": "prompt", "on_bad_row": "skip"},
            "training": {
                "objective": "grpo",
                "grpo_group_size": 4,
                "grpo_rewards": [{"kind": "length", "max_tokens": 3}],
            },
            "model": {"max_seq_len": 128},
        },
        train=str(train),
    )
    with pytest.raises(DataError, match=r"bad\.jsonl: no prompt rows left: all 2 were malformed") as e:
        prompt_data(spec, make_tokenizer())
    assert "bad.jsonl:2: 'messages' is an empty array" in str(e.value)


@pytest.mark.parametrize(
    ("setting", "key"),
    [
        ('validation = "{train}"', "data.validation"),
        ("validation_split = 0.2", "data.validation_split"),
    ],
)
def test_validation_keys_an_rl_run_would_ignore_are_refused_at_their_key_path(tmp_path, setting, key):
    """An RL run has no validation pass: data.validation, training.eval_every and [eval] samples
    linted clean and were then ignored (no validation metric was ever written)."""
    text = GOOD.replace('train = "{train}"', f'train = "{{train}}"\n{setting}')
    text = text.replace("learning_rate = 1e-5", "learning_rate = 1e-5\neval_every = 2") + "[eval]\nsamples = 2\n"
    errors = _errors(tmp_path, text)
    for path in (key, "training.eval_every", "eval.samples"):
        assert errors[path].startswith("training.objective = 'grpo' has no validation pass yet"), errors


def _prompt_data(tmp_path, rows, **clean):
    import train_testlib as tl
    from data_testlib import make_tokenizer

    from ftc.backends.jax.rl.loop import prompt_data

    train = write_jsonl(tmp_path / "p.jsonl", rows)
    spec = tl.spec(
        {
            "data": {"format": "prompt", "clean": clean},
            "training": {
                "objective": "grpo",
                "grpo_group_size": 4,
                "grpo_max_new_tokens": 16,
                "grpo_rewards": [{"kind": "numeric"}],
            },
            "model": {"max_seq_len": 64},
        },
        train=str(train),
    )
    return prompt_data(spec, make_tokenizer())


def test_prompt_rows_are_cleaned_as_data_clean_says(tmp_path):
    """data.clean was ignored for prompt rows: duplicates and empty prompts were sampled, an
    unknown role reached the chat template, and overlong = "drop" still refused a long prompt."""
    from ftc.backends.jax.data.read import DataError

    user = lambda text: {"messages": [{"role": "user", "content": text}], "answer": "1"}  # noqa: E731
    long = user("long " * 80)
    rows = [user("one?"), user("one?"), user("  "), user("two?"), long]
    with pytest.raises(DataError, match=r'p\.jsonl:5: the prompt has \d+ tokens.*data\.clean\.overlong = "drop"'):
        _prompt_data(tmp_path, rows)
    data = _prompt_data(tmp_path, rows, overlong="drop")
    assert data.where == (f"{tmp_path}/p.jsonl:1", f"{tmp_path}/p.jsonl:4")
    assert data.stats.dropped == {"duplicate": 1, "empty": 1, "overlong": 1}
    assert "dropped 1 empty, 1 duplicate, 1 overlong" in data.stats.summary()
    assert len(_prompt_data(tmp_path, rows[:4], dedupe=False, drop_empty=False).ids) == 4
    with pytest.raises(DataError, match="unknown message roles"):
        _prompt_data(tmp_path, [{"messages": [{"role": "human", "content": "hi"}], "answer": "1"}])


def test_prompt_rows_all_cleaned_away_are_counted_by_reason(tmp_path):
    """It printed the dict of counts ("dropped: {'duplicate': 1, ...}")."""
    from ftc.backends.jax.data.read import DataError

    user = lambda text: {"messages": [{"role": "user", "content": text}], "answer": "1"}  # noqa: E731
    with pytest.raises(DataError) as caught:
        _prompt_data(tmp_path, [user("  "), user("long " * 80)], overlong="drop")
    assert str(caught.value).startswith(
        f"{tmp_path}/p.jsonl: no prompt rows left after cleaning (kept 0 of 2, 1 empty, 1 overlong)"
    ), caught.value
