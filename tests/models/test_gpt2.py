import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_decoders import max_diff_on_real_tokens, padded_batch
from safetensors.numpy import load_file

from ftc.backends.jax.io import hf_checkpoint
from ftc.backends.jax.methods import adapter as adapters
from ftc.backends.jax.models import family_for, gpt2

TINY = dict(vocab_size=256, n_positions=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=2)
CASES = {
    "tied": dict(),
    # Untied head, per-layer attention scaling, erf gelu, explicit n_inner: every switch flipped.
    "untied-scaled": dict(
        tie_word_embeddings=False,
        scale_attn_by_inverse_layer_idx=True,
        activation_function="gelu",
        n_inner=48,
        layer_norm_epsilon=1e-6,
    ),
}


def _perturbed(model):
    # Random init leaves norms at 1 and biases at 0: perturb everything so no layout error hides.
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def _hf_model(case, cls_name="GPT2LMHeadModel"):
    import transformers as tf

    torch.manual_seed(0)
    return _perturbed(getattr(tf, cls_name)(tf.GPT2Config(**TINY, **CASES[case])))


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    """case -> (hf model, its directory, LoadedModel)."""
    out = {}
    for case in CASES:
        model = _hf_model(case)
        path = tmp_path_factory.mktemp(case)
        model.save_pretrained(path)
        out[case] = (model, path, hf_checkpoint.load_model(path))
    return out


def _apply(lm, input_ids, **kw):
    module = lm.family.build(lm.arch, jnp.float32)
    kw = {k: v if v is None or isinstance(v, str) else jnp.asarray(v) for k, v in kw.items()}
    return np.asarray(module.apply({"params": lm.params}, jnp.asarray(input_ids), **kw))


def _hf_logits(model, input_ids, mask=None, positions=None):
    t = lambda a: None if a is None else torch.as_tensor(np.asarray(a, np.int64))
    with torch.no_grad():
        return model(t(input_ids), attention_mask=t(mask), position_ids=t(positions)).logits.numpy()


@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers_with_left_and_right_padding(loaded, case):
    model, _, lm = loaded[case]
    assert lm.family is family_for({"model_type": "gpt2"})
    input_ids, mask, positions = padded_batch()
    diff = max_diff_on_real_tokens(
        _apply(lm, input_ids, attention_mask=mask, positions=positions),
        _hf_logits(model, input_ids, mask, positions),
        mask,
    )
    print(f"gpt2 {case}: max |logits diff| = {diff:.2e}")
    assert diff <= 1e-4
    # Without positions both sides count 0..T-1.
    right = mask[:2]
    diff_default = max_diff_on_real_tokens(
        _apply(lm, input_ids[:2], attention_mask=right), _hf_logits(model, input_ids[:2], right), right
    )
    assert diff_default <= 1e-4


def test_token_type_ids_are_embedded_with_the_token_table_like_transformers(loaded):
    model, _, lm = loaded["tied"]
    ids = np.random.default_rng(1).integers(0, 256, (2, 8)).astype(np.int32)
    types = np.random.default_rng(2).integers(0, 3, (2, 8)).astype(np.int32)
    with torch.no_grad():
        theirs = model(
            torch.as_tensor(ids, dtype=torch.long), token_type_ids=torch.as_tensor(types, dtype=torch.long)
        ).logits.numpy()
    assert np.abs(_apply(lm, ids, token_type_ids=types) - theirs).max() <= 1e-4


def test_packed_segments_never_attend_across_segments(loaded):
    _, _, lm = loaded["untied-scaled"]
    rng = np.random.default_rng(3)
    a, b = rng.integers(0, 256, 7).astype(np.int32), rng.integers(0, 256, 5).astype(np.int32)
    packed = np.concatenate([a, b, np.zeros(2, np.int32)])[None]
    segment_ids = np.array([[1] * 7 + [2] * 5 + [0] * 2], np.int32)
    # Without `positions`, positions restart per segment (layers.default_positions).
    packed_logits = _apply(lm, packed, segment_ids=segment_ids)
    np.testing.assert_allclose(packed_logits[0, :7], _apply(lm, a[None])[0], atol=1e-5)
    np.testing.assert_allclose(packed_logits[0, 7:12], _apply(lm, b[None])[0], atol=1e-5)
    assert np.isfinite(packed_logits).all()


def test_hidden_output_is_final_layer_norm_state_under_the_tied_head(loaded):
    _, _, lm = loaded["tied"]
    ids = np.arange(6, dtype=np.int32)[None]
    hidden = _apply(lm, ids, output="hidden")
    assert hidden.shape == (1, 6, 32)
    np.testing.assert_allclose(hidden @ np.asarray(lm.params["wte"]).T, _apply(lm, ids), atol=1e-5)
    assert "lm_head" not in lm.params and "lm_head" in loaded["untied-scaled"][2].params
    with pytest.raises(ValueError, match="pooled"):
        _apply(lm, ids, output="pooled")


@pytest.mark.parametrize("case", CASES)
def test_export_reloads_in_transformers_with_the_same_logits(loaded, case, tmp_path):
    import transformers as tf

    _, _, lm = loaded[case]
    out = hf_checkpoint.save_hf(tmp_path / "export", lm, dtype="float32")
    reloaded = tf.GPT2LMHeadModel.from_pretrained(out).eval()
    assert reloaded.config.architectures == ["GPT2LMHeadModel"]
    assert reloaded.config.tie_word_embeddings == lm.arch.tie_word_embeddings
    input_ids, mask, positions = padded_batch(seed=7)
    diff = max_diff_on_real_tokens(
        _apply(lm, input_ids, attention_mask=mask, positions=positions),
        _hf_logits(reloaded, input_ids, mask, positions),
        mask,
    )
    assert diff <= 1e-4


@pytest.mark.parametrize("case", CASES)
def test_import_export_import_is_bitwise(loaded, case, tmp_path):
    _, path, lm = loaded[case]
    out = hf_checkpoint.save_hf(tmp_path / "export", lm, dtype="float32")
    original, exported = load_file(path / "model.safetensors"), load_file(out / "model.safetensors")
    names = [n for spec in gpt2.hf_tensors(lm.arch).values() for n in spec.names]
    assert sorted(exported) == sorted(names)
    for name in names:
        assert exported[name].dtype == original[name].dtype and np.array_equal(exported[name], original[name]), name
    again = hf_checkpoint.load_model(out)
    assert again.arch == lm.arch
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), again.params, lm.params)


def test_bare_gpt2model_checkpoint_loads_and_matches_last_hidden_state(tmp_path):
    model = _hf_model("tied", "GPT2Model")
    model.save_pretrained(tmp_path)
    lm = hf_checkpoint.load_model(tmp_path)
    assert lm.arch.hf_prefix == ""
    input_ids, mask, positions = padded_batch(seed=2)
    t = lambda a: torch.as_tensor(np.asarray(a, np.int64))
    with torch.no_grad():
        theirs = model(t(input_ids), attention_mask=t(mask), position_ids=t(positions)).last_hidden_state.numpy()
    ours = _apply(lm, input_ids, attention_mask=mask, positions=positions, output="hidden")
    assert max_diff_on_real_tokens(ours, theirs, mask) <= 1e-4


def test_every_param_has_logical_axes_and_fused_qkv_is_split_by_head(loaded):
    _, _, lm = loaded["tied"]
    axes = hf_checkpoint.logical_axes(lm.family, lm.arch)
    assert axes["layers"]["attn"]["c_attn"]["kernel"] == ("layers", "embed", None, "heads", "head_dim")
    assert axes["wte"] == ("vocab", "embed") and axes["wpe"] == ("position", "embed")
    assert lm.params["layers"]["attn"]["c_attn"]["kernel"].shape == (2, 32, 3, 4, 8)
    # Adapters find GPT-2's output projections by their HF names.
    config = adapters.AdapterConfig(placement="houlsby", reduction_factor=16, non_linearity="relu")
    plan = adapters.plan_adapters(lm.family, lm.arch, config)
    assert {s.module_path for s in plan.sites} == {("layers", "attn", "c_proj"), ("layers", "mlp", "c_proj")}


def test_config_refuses_what_it_does_not_compute():
    with pytest.raises(ValueError, match="add_cross_attention"):
        gpt2.config_from_hf({"model_type": "gpt2", "add_cross_attention": True})
    with pytest.raises(ValueError, match="activation_function='prelu'"):
        gpt2.config_from_hf({"model_type": "gpt2", "activation_function": "prelu"})
    with pytest.raises(ValueError, match="remat"):
        dataclasses.replace(gpt2.config_from_hf({"model_type": "gpt2"}), remat="sometimes")


def test_several_eos_ids_are_kept_through_export():
    """A list of end ids (a chat fine-tune's config) was refused: 'GPT-2 export keeps a single eos id'."""
    arch = gpt2.config_from_hf({"model_type": "gpt2", "eos_token_id": [50256, 50257]})
    assert gpt2.hf_config(arch)["eos_token_id"] == [50256, 50257]
    assert gpt2.hf_config(gpt2.config_from_hf({"model_type": "gpt2", "eos_token_id": [7]}))["eos_token_id"] == 7
    hash(arch)  # a flax module attribute


def test_missing_config_keys_take_transformers_defaults():
    import transformers as tf

    assert gpt2.config_from_hf({"model_type": "gpt2"}) == gpt2.config_from_hf(tf.GPT2Config().to_dict())


def test_remat_keeps_loss_and_gradients(loaded):
    _, _, lm = loaded["untied-scaled"]
    ids = jnp.asarray(np.random.default_rng(4).integers(0, 256, (2, 8)), jnp.int32)

    def loss(params, arch):
        return jax.nn.logsumexp(gpt2.build(arch).apply({"params": params}, ids), -1).mean()

    base_loss, base_grads = jax.value_and_grad(loss)(lm.params, lm.arch)
    new_loss, new_grads = jax.value_and_grad(loss)(lm.params, dataclasses.replace(lm.arch, remat="dots"))
    np.testing.assert_allclose(new_loss, base_loss, rtol=1e-6)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6), new_grads, base_grads)


def test_bfloat16_compute_stays_close_to_float32(loaded):
    _, _, lm = loaded["tied"]
    ids = jnp.asarray(np.random.default_rng(5).integers(0, 256, (1, 8)), jnp.int32)
    f32 = np.asarray(gpt2.build(lm.arch, jnp.float32).apply({"params": lm.params}, ids))
    bf16 = gpt2.build(lm.arch, jnp.bfloat16).apply({"params": lm.params}, ids)
    assert bf16.dtype == jnp.bfloat16
    assert np.abs(np.asarray(bf16, np.float32) - f32).max() < 0.1


def test_bare_gpt2model_export_is_read_back_by_resolving_the_transformer_prefix(tmp_path):
    model = _hf_model("tied", "GPT2Model")
    model.save_pretrained(tmp_path / "src")
    lm = hf_checkpoint.load_model(tmp_path / "src")
    again = hf_checkpoint.load_model(hf_checkpoint.save_hf(tmp_path / "export", lm, dtype="float32"))
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), again.params, lm.params)
