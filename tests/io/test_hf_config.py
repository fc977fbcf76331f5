"""A config.json a model cannot be built from is refused when it is read, naming the file and the
key, instead of failing later inside jax (before: an internal error for vocab_size 0, a string
size or a vocabulary past int32; a message about `scan` lengths for a negative layer count)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from ftc.backends.jax.io.hf_config import config_problems, read_hf_config
from ftc.cli import main

TINY_LLAMA = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 320,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-6,
}

BAD = [
    ({"vocab_size": 0}, "vocab_size: expected an integer from 1 to 2147483647, got 0"),
    ({"hidden_size": "32"}, "hidden_size: expected a positive integer, got '32'"),
    ({"hidden_size": 32.0}, "hidden_size: expected a positive integer, got 32.0"),
    ({"num_hidden_layers": -1}, "num_hidden_layers: expected an integer from 1 to 2147483647, got -1"),
    ({"num_hidden_layers": True}, "num_hidden_layers: expected a positive integer, got true"),
    ({"vocab_size": 10**12}, "vocab_size: expected an integer from 1 to 2147483647, got 1000000000000"),
    ({"rms_norm_eps": -1}, "rms_norm_eps: expected a positive number, got -1"),
    ({"rope_scaling": "yes"}, "rope_scaling: expected a JSON object or null, got 'yes'"),
    ({"num_attention_heads": 5}, "num_attention_heads (5) must be a multiple of num_key_value_heads (2)"),
    ({"hidden_act": "swishy"}, "hidden_act='swishy' is not supported"),
    ({"model_type": "mamba"}, "unsupported architecture model_type='mamba'"),
    # A window of 0 masked every key (finite, meaningless logits); transformers crashes on it.
    ({"model_type": "mistral", "sliding_window": 0}, "sliding_window=0: expected a positive integer"),
    (
        {"model_type": "qwen2", "use_sliding_window": True, "max_window_layers": 0, "sliding_window": -4},
        "sliding_window=-4",
    ),
    ({"model_type": "mixtral", "num_local_experts": 2, "sliding_window": 0}, "sliding_window=0: expected"),
    # Rotary embeddings turn pairs of a head's dimensions; both were internal errors inside jax.
    ({"head_dim": 7}, "head_dim=7: rotary embeddings need an even head size"),
    ({"hidden_size": 2, "num_key_value_heads": 4}, "hidden_size // num_attention_heads=0: rotary"),
]


def _model_dir(tmp_path, **changes):
    (tmp_path / "config.json").write_text(json.dumps(TINY_LLAMA | changes))
    return tmp_path


@pytest.mark.parametrize("changes, says", BAD, ids=[next(iter(c)) + "-" + str(i) for i, (c, _) in enumerate(BAD)])
def test_a_config_no_model_can_be_built_from_is_named_with_its_file_and_key(tmp_path, changes, says):
    with pytest.raises(ValueError) as error:
        read_hf_config(_model_dir(tmp_path, **changes))
    message = str(error.value)
    assert message.startswith(f"{tmp_path / 'config.json'}: ") and says in message, message


def test_a_window_the_config_switches_off_may_be_zero(tmp_path):
    # transformers 5 writes Qwen2-MoE's sliding_window as 0 when use_sliding_window is false.
    off = {
        "model_type": "qwen2_moe",
        "num_experts": 2,
        "num_experts_per_tok": 1,
        "use_sliding_window": False,
        "sliding_window": 0,
    }
    assert read_hf_config(_model_dir(tmp_path, **off))["sliding_window"] == 0


def test_every_bad_value_is_named_at_once():
    problems = config_problems(TINY_LLAMA | {"vocab_size": 0, "hidden_size": "x", "layer_norm_eps": float("nan")})
    assert [p.split(":")[0] for p in problems] == ["vocab_size", "hidden_size", "layer_norm_eps"]


def test_null_sizes_transformers_derives_are_kept(tmp_path):
    config = read_hf_config(_model_dir(tmp_path, num_key_value_heads=None, head_dim=None))
    assert config["num_key_value_heads"] is None and config["hidden_size"] == 32


def test_ftc_plan_names_the_config_and_exits_1(tmp_path):
    model = _model_dir(tmp_path, vocab_size=0)
    spec = tmp_path / "s.toml"
    spec.write_text(
        f'ftc = 1\nname = "s"\n[model]\nbase = "{model}"\nmax_seq_len = 16\n'
        f'[data]\nformat = "chat"\ntrain = "{tmp_path}/train.jsonl"\n[training]\nsteps = 1\n'
        "batch_size = 8\nmicro_batch_size = 8\n"
    )
    result = CliRunner().invoke(main, ["plan", str(spec)])
    assert result.exit_code == 1, result.output
    assert f"{model / 'config.json'}: vocab_size: expected an integer from 1" in result.output
    assert "internal error" not in result.output and "Traceback" not in result.output
