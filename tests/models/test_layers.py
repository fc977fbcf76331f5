import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from ftc.backends.jax.models import layers


def test_positions_restart_per_segment():
    pos = layers.positions_from_segments(jnp.array([[1, 1, 1, 2, 2, 0, 0]]))
    np.testing.assert_array_equal(np.asarray(pos), [[0, 1, 2, 0, 1, 0, 1]])


@pytest.mark.parametrize(
    "rope_parameters",
    [
        {"rope_type": "default", "rope_theta": 10000.0},
        {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
        {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ],
)
def test_rope_inverse_frequencies_match_transformers(rope_parameters):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = LlamaConfig(hidden_size=256, num_attention_heads=4, rope_parameters=dict(rope_parameters))
    expected = LlamaRotaryEmbedding(config).inv_freq.numpy()
    rope = layers.Rope.from_hf(config.to_dict())
    np.testing.assert_allclose(rope.inv_freq(64), expected, rtol=1e-6)
    assert layers.Rope.from_hf({"rope_parameters": rope.to_hf()}) == rope


def test_rope_reads_legacy_rope_theta_and_rope_scaling():
    rope = layers.Rope.from_hf({"rope_theta": 1e6, "rope_scaling": {"type": "linear", "factor": 2.0}})
    assert rope == layers.Rope(theta=1e6, kind="linear", factor=2.0)
    with pytest.raises(ValueError, match="rope_type='yarn'"):
        layers.Rope.from_hf({"rope_parameters": {"rope_type": "yarn", "factor": 2.0}})


@pytest.mark.parametrize(
    "keys",
    [
        # Both keys, disagreeing: transformers takes rope_scaling whole and the top-level rope_theta.
        dict(
            rope_parameters={"rope_type": "default", "rope_theta": 1e6}, rope_scaling={"type": "linear", "factor": 4.0}
        ),
        # A top-level original_max_position_embeddings wins over the dict's (Phi-3 style configs).
        dict(
            original_max_position_embeddings=32,
            rope_theta=5e5,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        ),
    ],
    ids=["rope_scaling-beside-rope_parameters", "top-level-original_max_position_embeddings"],
)
def test_rope_reads_config_json_keys_with_transformers_precedence(tmp_path, keys):
    import json

    from transformers import AutoConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    raw = dict(model_type="llama", hidden_size=64, num_attention_heads=4, max_position_embeddings=128, **keys)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    expected = LlamaRotaryEmbedding(AutoConfig.from_pretrained(tmp_path)).inv_freq.numpy()
    np.testing.assert_allclose(layers.Rope.from_hf(raw).inv_freq(16), expected, rtol=1e-6)


def test_rope_refusals_name_the_config_json_key_present():
    with pytest.raises(ValueError, match=r"rope_scaling\.type='dynamic'"):
        layers.Rope.from_hf({"rope_scaling": {"type": "dynamic", "factor": 2.0}})
    with pytest.raises(ValueError, match=r"rope_parameters\.partial_rotary_factor=0\.5"):
        layers.Rope.from_hf({"rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.5}})


# Every stateless function of transformers' ACT2FN (prelu and xielu learn parameters; hardswish,
# laplace and sqrtsoftplus no supported model uses). Before: only the first 8, the rest refused.
ACT2FN_NAMES = (
    "silu", "swish", "gelu", "gelu_pytorch_tanh", "gelu_new", "gelu_fast", "relu", "quick_gelu",
    "gelu_python", "gelu_accurate", "gelu_python_tanh", "gelu_10", "relu6", "relu2", "leaky_relu", "mish",
    "tanh", "sigmoid", "linear",
)  # fmt: skip


def test_the_activation_table_is_act2fns_stateless_functions():
    assert set(layers.ACTIVATIONS) == set(ACT2FN_NAMES)


@pytest.mark.parametrize("name", ACT2FN_NAMES)
def test_every_activation_a_config_may_name_matches_transformers_act2fn(name):
    from transformers.activations import ACT2FN

    x = np.linspace(-30, 30, 6001, dtype=np.float32)
    ours = np.asarray(layers.ACTIVATIONS[name](jnp.asarray(x)))
    theirs = ACT2FN[name](torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=3e-6)


def test_rotary_application_matches_transformers():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    rng = np.random.default_rng(1)
    x_BTNH = rng.normal(size=(2, 5, 3, 8)).astype(np.float32)
    positions = np.array([[0, 1, 2, 3, 4], [3, 4, 5, 0, 1]])
    inv_freq = layers.Rope().inv_freq(8)
    cos, sin = layers.rope_cos_sin(jnp.asarray(positions), inv_freq, jnp.float32)
    ours = np.asarray(layers.apply_rope(jnp.asarray(x_BTNH), cos, sin))
    x_t = torch.from_numpy(x_BTNH).transpose(1, 2)
    theirs, _ = apply_rotary_pos_emb(x_t, x_t, torch.tensor(np.asarray(cos)), torch.tensor(np.asarray(sin)))
    np.testing.assert_allclose(ours, theirs.transpose(1, 2).numpy(), atol=1e-6)


@pytest.mark.parametrize("unit_offset", [False, True])
def test_rms_norm_matches_transformers(unit_offset):
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, 3, 16)).astype(np.float32)
    w = rng.normal(size=(16,)).astype(np.float32)
    ref = GemmaRMSNorm(16, eps=1e-6) if unit_offset else LlamaRMSNorm(16, eps=1e-6)
    with torch.no_grad():
        ref.weight.copy_(torch.from_numpy(w))
        expected = ref(torch.from_numpy(x)).numpy()
    ours = layers.RMSNorm(eps=1e-6, unit_offset=unit_offset).apply({"params": {"weight": jnp.asarray(w)}}, x)
    np.testing.assert_allclose(np.asarray(ours), expected, atol=1e-6)


def test_parameters_carry_logical_axes():
    variables = layers.Dense((4, 8), in_axes=("embed",), out_axes=("heads", "head_dim"), use_bias=True).init(
        jax.random.key(0), jnp.ones((1, 2, 16))
    )
    kernel = variables["params"]["kernel"]
    assert kernel.names == ("embed", "heads", "head_dim") and kernel.value.shape == (16, 4, 8)
    assert variables["params"]["bias"].names == ("heads", "head_dim")
