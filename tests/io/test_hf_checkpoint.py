import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util
from hf_decoders import CASES, hf_logits, make_hf_model, max_diff_on_real_tokens, padded_batch
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ftc.backends.jax.io import hf_checkpoint, safetensors_read
from ftc.backends.jax.models import llama


def _logits(lm, input_ids, **kw):
    module = lm.family.build(lm.arch, jnp.float32)
    kw = {k: jnp.asarray(v) for k, v in kw.items()}
    return np.asarray(jax.jit(module.apply)({"params": lm.params}, jnp.asarray(input_ids), **kw))


def _flat(tree):
    return traverse_util.flatten_dict(tree, sep="/")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """case -> (hf model, its save_pretrained directory)."""
    out = {}
    for case in CASES:
        model = make_hf_model(case, seed=1)
        path = tmp_path_factory.mktemp(case)
        model.save_pretrained(path)
        out[case] = (model, path)
    return out


@pytest.mark.parametrize("case", CASES)
def test_export_reloads_in_transformers_with_the_same_logits(saved, case, tmp_path):
    import transformers as tf

    model, path = saved[case]
    lm = hf_checkpoint.load_model(path)
    hf_checkpoint.save_hf(tmp_path, lm, dtype="float32")
    reloaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is type(model)
    assert reloaded.config.rope_parameters == model.config.rope_parameters
    assert reloaded.config.tie_word_embeddings == model.config.tie_word_embeddings
    assert getattr(reloaded.config, "layer_types", None) == getattr(model.config, "layer_types", None)
    assert getattr(reloaded.config, "sliding_window", None) == getattr(model.config, "sliding_window", None)
    ours_sd, theirs_sd = reloaded.state_dict(), model.state_dict()
    assert ours_sd.keys() == theirs_sd.keys()
    for name, tensor in theirs_sd.items():  # the exported weights are transformers' own, bit for bit
        assert torch.equal(ours_sd[name], tensor), name
    input_ids, mask, positions = padded_batch(seed=2)
    theirs = hf_logits(model, input_ids, mask, positions)
    # Not == 0: two copies of one model's weights at other addresses may take other SIMD paths
    # (seen once under load, qwen2).
    assert max_diff_on_real_tokens(hf_logits(reloaded, input_ids, mask, positions), theirs, mask) <= 1e-6
    assert (
        max_diff_on_real_tokens(_logits(lm, input_ids, attention_mask=mask, positions=positions), theirs, mask) <= 1e-4
    )
    if model.config.tie_word_embeddings:
        header = safetensors_read.SafetensorsFile(tmp_path / "model.safetensors").header
        assert "lm_head.weight" not in header


@pytest.mark.parametrize("case", ["llama", "qwen3", "gemma"])
def test_import_export_import_is_bitwise(saved, case, tmp_path):
    _, path = saved[case]
    first = hf_checkpoint.load_model(path)
    hf_checkpoint.save_hf(tmp_path, first, dtype="float32")
    second = hf_checkpoint.load_model(tmp_path)
    assert second.arch == first.arch
    a, b = _flat(first.params), _flat(second.params)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]), err_msg=key)
    # The exported tensors are byte-identical to the ones transformers wrote.
    ours = safetensors_read.SafetensorsCheckpoint(tmp_path)
    theirs = safetensors_read.SafetensorsCheckpoint(path)
    assert set(ours.where) == set(theirs.where)
    for name in theirs.where:
        np.testing.assert_array_equal(ours.get(name), theirs.get(name), err_msg=name)


def test_exported_tensor_data_starts_64_byte_aligned_in_every_shard(saved, tmp_path):
    """PyTorch's CPU kernels choose their path by pointer alignment, so a memory-mapped export whose
    data started 8-aligned gave logits 3e-7 away from its source model (Qwen2-MoE, grouped_mm)."""
    import struct

    _, path = saved["llama-tied-llama3-rope"]
    out = hf_checkpoint.save_hf(tmp_path, hf_checkpoint.load_model(path), dtype="float32", max_shard_bytes=50_000)
    files = sorted(out.glob("*.safetensors"))
    assert len(files) > 1
    for f in files:
        (n,) = struct.unpack("<Q", f.read_bytes()[:8])
        assert (8 + n) % hf_checkpoint.DATA_ALIGNMENT == 0, f.name
        assert safetensors_read.SafetensorsFile(f).header  # still a valid file


def test_bfloat16_export_loads_in_transformers(saved, tmp_path):
    import transformers as tf

    model, path = saved["llama-tied-llama3-rope"]
    hf_checkpoint.save_hf(tmp_path, hf_checkpoint.load_model(path), dtype="bfloat16")
    header = safetensors_read.SafetensorsFile(tmp_path / "model.safetensors").header
    assert {entry["dtype"] for entry in header.values()} == {"BF16"}
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    reloaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path, dtype="auto").eval()
    assert reloaded.dtype == torch.bfloat16
    assert reloaded.model.embed_tokens.weight.equal(model.model.embed_tokens.weight.to(torch.bfloat16))
    # And ftc reads its own bf16 export back (into float32 params) with the same numbers.
    back = hf_checkpoint.load_model(tmp_path)
    np.testing.assert_array_equal(
        np.asarray(back.params["embed_tokens"]["embedding"]),
        model.model.embed_tokens.weight.detach().to(torch.bfloat16).float().numpy(),
    )


@pytest.mark.parametrize("stored", [torch.bfloat16, torch.float16])
def test_half_precision_checkpoints_load_exactly(saved, stored, tmp_path):
    model, _ = saved["qwen2"]
    model.to(stored).save_pretrained(tmp_path)
    model.to(torch.float32)
    lm = hf_checkpoint.load_model(tmp_path, dtype=jnp.float32)
    q = np.asarray(lm.params["layers"]["self_attn"]["q_proj"]["bias"])
    expected = model.model.layers[1].self_attn.q_proj.bias.detach().to(stored).float().numpy().reshape(4, 16)
    assert q.dtype == np.float32
    np.testing.assert_array_equal(q[1], expected)


def test_sharded_checkpoints_load_and_export_with_an_index(saved, tmp_path):
    import transformers as tf

    model, path = saved["llama"]
    sharded_in = tmp_path / "in"
    model.save_pretrained(sharded_in, max_shard_size="40KB")
    assert (sharded_in / "model.safetensors.index.json").exists()
    single, sharded = hf_checkpoint.load_model(path), hf_checkpoint.load_model(sharded_in)
    for key, value in _flat(single.params).items():
        np.testing.assert_array_equal(np.asarray(value), np.asarray(_flat(sharded.params)[key]))

    out = hf_checkpoint.save_hf(tmp_path / "out", sharded, dtype="float32", max_shard_bytes=50_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and not (out / "model.safetensors").exists()
    assert files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    reloaded = tf.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = np.arange(8, dtype=np.int32)[None]
    np.testing.assert_array_equal(hf_logits(reloaded, ids), hf_logits(model, ids))


def test_shardings_place_each_param_on_a_device_mesh(saved, tmp_path):
    if jax.device_count() < 8:
        pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=8 (tests/conftest.py sets it)")
    _, path = saved["qwen3"]
    plain = hf_checkpoint.load_model(path)
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("fsdp", "tensor"))
    rules = {"embed": "fsdp", "mlp": "tensor", "heads": "tensor", "vocab": "tensor"}
    axes = hf_checkpoint.logical_axes(plain.family, plain.arch)
    shardings = jax.tree.map(
        lambda names: NamedSharding(mesh, P(*(rules.get(n) for n in names))),
        axes,
        is_leaf=lambda x: isinstance(x, tuple),
    )
    sharded = hf_checkpoint.load_model(path, shardings=shardings)
    flat_sharded, flat_shardings = _flat(sharded.params), _flat(shardings)
    q = flat_sharded["layers/self_attn/q_proj/kernel"]
    assert q.sharding.spec == P(None, "fsdp", "tensor", None)
    assert q.addressable_shards[0].data.shape == (2, 32, 1, 32)
    for key, value in _flat(plain.params).items():
        assert flat_sharded[key].sharding.is_equivalent_to(flat_shardings[key], value.ndim), key
        np.testing.assert_array_equal(np.asarray(flat_sharded[key]), np.asarray(value), err_msg=key)
    # The sharded model computes the same logits (up to reduction order)...
    ids = np.arange(8, dtype=np.int32)[None]
    np.testing.assert_allclose(_logits(sharded, ids), _logits(plain, ids), atol=1e-5)
    # ...and export gathers its params back into the original checkpoint, bitwise.
    hf_checkpoint.save_hf(tmp_path, sharded, dtype="float32")
    exported, original = safetensors_read.SafetensorsCheckpoint(tmp_path), safetensors_read.SafetensorsCheckpoint(path)
    for name in original.where:
        np.testing.assert_array_equal(exported.get(name), original.get(name), err_msg=name)


def test_abstract_params_and_logical_axes_describe_the_loaded_params(saved):
    _, path = saved["qwen2"]
    lm = hf_checkpoint.load_model(path)
    abstract = hf_checkpoint.abstract_params(lm.family, lm.arch, jnp.bfloat16)
    axes = traverse_util.flatten_dict(
        hf_checkpoint.logical_axes(lm.family, lm.arch), sep="/", is_leaf=lambda k, v: isinstance(v, tuple)
    )
    flat = _flat(lm.params)
    assert _flat(abstract).keys() == flat.keys() == axes.keys()
    for key, value in flat.items():
        assert _flat(abstract)[key].shape == value.shape and _flat(abstract)[key].dtype == jnp.bfloat16
        assert len(axes[key]) == value.ndim, key
    assert axes["layers/self_attn/k_proj/kernel"] == ("layers", "embed", "kv_heads", "head_dim")
    assert axes["layers/self_attn/q_proj/bias"] == ("layers", "heads", "head_dim")


def test_pickle_checkpoints_are_refused(saved, tmp_path):
    model, _ = saved["llama"]
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match=r"pytorch_model\.bin.*safetensors only"):
        hf_checkpoint.load_model(tmp_path)


def test_custom_code_configs_are_refused(saved, tmp_path):
    _, path = saved["llama"]
    config = json.loads((path / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config\.json: key 'auto_map'.*trust_remote_code.*llama"):
        hf_checkpoint.load_model(tmp_path)


def test_unsupported_architecture_names_the_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "falcon", "architectures": ["FalconForCausalLM"]}))
    with pytest.raises(
        ValueError, match=r"model_type='falcon'.*supports model_type in: .*gemma.*llama.*mistral.*qwen2.*qwen3"
    ):
        hf_checkpoint.load_model(tmp_path)


def test_missing_tensor_is_named(saved, tmp_path):
    from safetensors.numpy import save_file

    model, path = saved["llama"]
    model.config.save_pretrained(tmp_path)
    checkpoint = safetensors_read.SafetensorsCheckpoint(path)
    tensors = {n: np.array(checkpoint.get(n)) for n in checkpoint.where if n != "model.layers.1.mlp.up_proj.weight"}
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        hf_checkpoint.load_model(tmp_path)


def test_export_writes_generation_config_and_tokenizer(saved, tmp_path):
    import transformers as tf
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        ["hello world", "fine tuning compiler"] * 20, vocab_size=300, special_tokens=["<s>", "</s>"]
    )
    tokenizer = tf.PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>")
    tokenizer.save_pretrained(tmp_path / "tok")
    _, path = saved["llama"]
    out = hf_checkpoint.save_hf(tmp_path / "out", hf_checkpoint.load_model(path), tokenizer_dir=tmp_path / "tok")
    generation = tf.GenerationConfig.from_pretrained(out)
    assert (generation.bos_token_id, generation.eos_token_id) == (1, 2)
    assert tf.AutoTokenizer.from_pretrained(out)("hello world").input_ids == tokenizer("hello world").input_ids


def test_export_accepts_a_tuple_and_legacy_rope_readers_see_the_same_rope(saved, tmp_path):
    _, path = saved["llama-tied-llama3-rope"]
    lm = hf_checkpoint.load_model(path)
    hf_checkpoint.save_hf(tmp_path, (lm.family, lm.arch, lm.params, {}), dtype="float32")
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["rope_scaling"]["rope_type"] == "llama3" and config["rope_theta"] == 500000.0
    legacy = {k: v for k, v in config.items() if k != "rope_parameters"}
    assert llama.config_from_hf(legacy) == lm.arch
