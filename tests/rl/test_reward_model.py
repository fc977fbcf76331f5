"""The `model` reward: an HF *ForSequenceClassification directory (a tiny BERT and a tiny Llama
built from configs, offline tokenizers) scored in JAX equals transformers' PyTorch probability of
the chosen label on the same texts; a GRPO run with a model reward trains; lint refuses a
directory that is missing or not a classifier, and a label that does not fit, at the key path."""

from __future__ import annotations

import json

import numpy as np
import pytest
import train_testlib as tl
from data_testlib import make_tokenizer, write_jsonl

from ftc.backends.jax.rl import reward_model, rewards
from ftc.spec import lint_file

LABELS = {0: "negative", 1: "neutral", 2: "positive"}
CONVERSATIONS = [
    [{"role": "user", "content": "how are you doing today?"}],
    [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is your favourite colour?"}],
    [{"role": "user", "content": "hello there"}],
] * 4
COMPLETIONS = [
    "I am doing well, thank you for asking.",
    "blue",
    "",
    "the quick brown fox jumps over the lazy dog " * 3,
    "mine is blue. what is yours?",
    "hello!",
    "0 1 2 3 4 5 6 7 8 9",
    "thank you",
    "I am doing well",
    "the lazy dog",
    "?!",
    "how are you",
]


def _bert_dir(path, num_labels=3, **config):
    import torch
    import transformers as tf

    torch.manual_seed(1)
    id2label = {i: LABELS[i] for i in range(num_labels)} if num_labels == 3 else None
    cfg = tf.BertConfig(
        vocab_size=320,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=num_labels,
        **({"id2label": id2label, "label2id": {v: k for k, v in id2label.items()}} if id2label else {}),
        **config,
    )
    tf.BertForSequenceClassification(cfg).eval().save_pretrained(path, safe_serialization=True)
    tok = make_tokenizer()
    tok.chat_template = None  # a plain-text classifier: the conversation's texts joined
    tok.save_pretrained(path)
    return path


def _llama_dir(path, num_labels=2):
    import torch
    import transformers as tf

    torch.manual_seed(2)
    tok = make_tokenizer()
    cfg = tf.LlamaConfig(**tl.TINY, num_labels=num_labels, pad_token_id=tok.pad_token_id)
    tf.LlamaForSequenceClassification(cfg).eval().save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)  # with its ChatML template: the conversation is rendered by it
    return path


def _torch_logits(path, scorer, conversations, completions):
    """transformers' logits on the texts the scorer scores, padded as a batch (right padding)."""
    import torch
    import transformers as tf

    model = tf.AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    tok = tf.AutoTokenizer.from_pretrained(path)
    out = []
    for text, special in scorer.texts(conversations, completions):
        enc = tok([text], add_special_tokens=special, return_tensors="pt", truncation=True, max_length=64)
        with torch.no_grad():
            out.append(model(**enc).logits[0].double().numpy())
    return np.stack(out)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("reward-models")
    return {"bert": _bert_dir(root / "bert"), "llama": _llama_dir(root / "llama"), "root": root}


def _softmax(x):
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("label, index", [("positive", 2), (0, 0), ("neutral", 1)])
def test_bert_reward_equals_transformers_softmax_probability_of_the_label(dirs, label, index):
    scorer = reward_model.RewardModel(str(dirs["bert"]), label)
    got = scorer(CONVERSATIONS, COMPLETIONS)
    want = _softmax(_torch_logits(dirs["bert"], scorer, CONVERSATIONS, COMPLETIONS))[:, index]
    assert got.shape == (12,) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)
    assert scorer.texts(CONVERSATIONS[:1], COMPLETIONS[:1]) == [
        ("how are you doing today?\n\nI am doing well, thank you for asking.", True)
    ]


def test_llama_reward_reads_the_chat_rendered_conversation_at_its_last_token_like_transformers(dirs):
    scorer = reward_model.RewardModel(str(dirs["llama"]))  # two labels: the last is the default
    assert scorer.label == 1
    got = scorer(CONVERSATIONS, COMPLETIONS)
    want = _softmax(_torch_logits(dirs["llama"], scorer, CONVERSATIONS, COMPLETIONS))[:, 1]
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)
    text, special = scorer.texts(CONVERSATIONS[:1], ["blue"])[0]
    assert text.endswith("<|im_start|>assistant\nblue<|im_end|>\n") and special is False
    only = reward_model.RewardModel(str(dirs["llama"]), text="completion")
    assert only.texts(CONVERSATIONS[:1], ["blue"]) == [("blue", True)]
    assert not np.allclose(only(CONVERSATIONS, COMPLETIONS), got)


def test_a_one_label_reward_model_gives_its_logit_and_ends_with_the_pad_token_as_transformers_reads(dirs):
    path = _llama_dir(dirs["root"] / "llama1", num_labels=1)
    scorer = reward_model.RewardModel(str(path))
    want = _torch_logits(path, scorer, CONVERSATIONS, COMPLETIONS)[:, 0]
    np.testing.assert_allclose(scorer(CONVERSATIONS, COMPLETIONS), want, rtol=0, atol=2e-5)
    # A text whose last token is the pad id: transformers reads the last non-pad token; so does ftc.
    ids = np.array([[5, 6, scorer.pad_id, 9], [5, scorer.pad_id, scorer.pad_id, 0]])
    assert reward_model.last_read_positions(ids, np.array([3, 3]), scorer.pad_id).tolist() == [1, 0]


def test_rewards_score_weighs_a_model_reward_with_the_others(dirs):
    declared = rewards.parse(
        [
            {"kind": "model", "path": str(dirs["bert"]), "label": "positive", "name": "rm", "weight": 2.0},
            {"kind": "regex", "pattern": "blue"},
        ]
    )
    scorer = reward_model.load(declared[0])
    tokens = [len(c) for c in COMPLETIONS]
    total, parts = rewards.score(
        declared, COMPLETIONS, tokens, [None] * 12, conversations=CONVERSATIONS, models={"rm": scorer}
    )
    np.testing.assert_allclose(total, 2.0 * parts["rm"] + parts["regex"], rtol=1e-6)
    np.testing.assert_array_equal(parts["rm"], scorer(CONVERSATIONS, COMPLETIONS))
    with pytest.raises(ValueError, match="needs its loaded scorer"):
        rewards.score(declared, COMPLETIONS, tokens, [None] * 12)


def test_the_backend_refuses_what_it_cannot_score(dirs, tmp_path):
    with pytest.raises(reward_model.RewardModelError, match="not a directory"):
        reward_model.RewardModel(str(tmp_path / "none"))
    with pytest.raises(reward_model.RewardModelError, match="3 labels .* name the one"):
        reward_model.RewardModel(str(dirs["bert"]))
    causal = tl.make_model_dir(tmp_path / "causal")
    with pytest.raises(reward_model.RewardModelError, match="LlamaForCausalLM.*a model reward reads"):
        reward_model.RewardModel(causal)


# ---------------------------------------------------------------- lint

SPEC = """ftc = 1
name = "g"
[model]
base = "/nonexistent/model"
max_seq_len = 64
[data]
format = "prompt"
train = "prompts.jsonl"
[training]
objective = "grpo"
steps = 4
batch_size = 16
grpo_group_size = 8
grpo_max_new_tokens = 16
grpo_rewards = [{reward}]
"""


def _lint(tmp_path, reward: str) -> dict[str, str]:
    write_jsonl(tmp_path / "prompts.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    path = tmp_path / "g.toml"
    path.write_text(SPEC.format(reward=reward))
    return {i.key_path: i.message for i in lint_file(str(path)) if i.severity == "error"}


def test_lint_accepts_a_model_reward_with_its_path_relative_to_the_spec(dirs, tmp_path):
    (tmp_path / "rm").symlink_to(dirs["bert"])
    assert _lint(tmp_path, '{ kind = "model", path = "rm", label = "positive" }') == {}
    assert _lint(tmp_path, f'{{ kind = "model", path = "{dirs["llama"]}" }}') == {}


@pytest.mark.parametrize(
    "reward, key, message",
    [
        ('{ kind = "model", path = "missing" }', "path", "no such directory: .*missing"),
        ('{ kind = "model" }', "path", "needs path"),
        ('{ kind = "model", path = "causal" }', "path", r"names \['LlamaForCausalLM'\], not a \*ForSequenceClassif"),
        ('{ kind = "model", path = "bert" }', "label", "3 labels .*0 = 'negative'.*name the one"),
        ('{ kind = "model", path = "bert", label = 3 }', "label", "label 3 is not an index of the model's 3"),
        ('{ kind = "model", path = "bert", label = "happy" }', "label", "'happy' is not one of the model's labels"),
        ('{ kind = "model", path = "llama", label = "LABEL_2" }', "label", "not one of the model's labels"),
        ('{ kind = "model", path = "pickled" }', "path", "no model.safetensors .*never pickle"),
        ('{ kind = "model", path = "bert", label = "positive", text = "prompt" }', "text", "one of"),
        ('{ kind = "regex", pattern = "x", path = "bert" }', "path", "not an option of a 'regex' reward"),
    ],
)
def test_lint_refuses_a_bad_model_reward_at_its_key_path(dirs, tmp_path, reward, key, message):
    (tmp_path / "bert").symlink_to(dirs["bert"])
    (tmp_path / "llama").symlink_to(dirs["llama"])
    tl.make_model_dir(tmp_path / "causal")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    config = json.loads((dirs["bert"] / "config.json").read_text())
    (pickled / "config.json").write_text(json.dumps({**config, "id2label": {"0": "a", "1": "b"}}))
    (pickled / "pytorch_model.bin").write_bytes(b"not read")
    errors = _lint(tmp_path, reward)
    where = f"training.grpo_rewards[0].{key}"
    assert where in errors, errors
    import re

    assert re.search(message, errors[where]), errors[where]


# ---------------------------------------------------------------- a run

RUN = """ftc = 1
name = "rm"
output_dir = "{root}/runs"
[model]
base = "{root}/base"
max_seq_len = 40
dtype = "float32"
[data]
format = "prompt"
train = "{root}/prompts.jsonl"
[training]
objective = "grpo"
steps = 4
batch_size = 8
micro_batch_size = 8
learning_rate = 1e-2
log_every = 1
grpo_group_size = 4
grpo_updates_per_rollout = 2
grpo_max_new_tokens = 6
grpo_rewards = [{{ kind = "model", path = "{rm}", name = "rm" }}]
schedule = {{ kind = "constant", warmup_steps = 0 }}
[checkpoint]
every = 100
[logging]
progress = false
"""


@pytest.mark.slow
def test_a_grpo_run_with_a_model_reward_trains_and_logs_it(dirs, tmp_path):
    from ftc.backends.jax import pipeline as run_lib
    from ftc.spec import load_spec

    tl.make_model_dir(tmp_path / "base")
    write_jsonl(tmp_path / "prompts.jsonl", [{"messages": [{"role": "user", "content": f"say {i}"}]} for i in range(4)])
    path = tmp_path / "rm.toml"
    path.write_text(RUN.format(root=tmp_path, rm=dirs["llama"]))
    spec = load_spec(str(path))
    assert run_lib.run(spec, echo=lambda s: None)["step"] == 4
    with open(f"{spec.run_dir}/metrics.jsonl") as f:
        rows = [r for r in map(json.loads, f) if r["split"] == "train"]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    means = [r["rewards/rm/mean"] for r in rows]
    # The only reward: the total is the model's probability of its last label, a value in (0, 1)
    # that varies within a group (so GRPO has advantages to train on).
    assert all(0.0 < m < 1.0 for m in means) and means == [r["reward"] for r in rows]
    assert all(r["rewards/rm/std"] > 0 and np.isfinite(r["loss"]) for r in rows)
    assert rows[0]["reward"] != rows[2]["reward"]  # the second rollout sampled other completions
