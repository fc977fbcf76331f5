"""The MoE families (mixtral, qwen2_moe, qwen3_moe) against transformers' PyTorch models, and the
dropless expert FFN (models/moe.py) against a dense reference that runs every expert on every token."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util
from hf_decoders import hf_logits, max_diff_on_real_tokens, padded_batch
from moe_testlib import MOE_CASES, make_moe_model

from ftc.backends.jax.io import hf_checkpoint, safetensors_read
from ftc.backends.jax.models import family_for, mixtral, moe, qwen2_moe, qwen3_moe
from ftc.backends.jax.objectives import router_aux


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """case -> (hf model, its save_pretrained directory, LoadedModel)."""
    out = {}
    for case in MOE_CASES:
        model = make_moe_model(case)
        path = tmp_path_factory.mktemp(case)
        model.save_pretrained(path)
        out[case] = (model, path, hf_checkpoint.load_model(path))
    return out


def _apply(lm, input_ids, arch=None, **kw):
    module = lm.family.build(arch or lm.arch, jnp.float32)
    kw = {k: v if k == "mutable" else jnp.asarray(v) for k, v in kw.items()}
    return jax.jit(module.apply, static_argnames=("mutable",))({"params": lm.params}, jnp.asarray(input_ids), **kw)


def _flat(tree):
    return traverse_util.flatten_dict(tree, sep="/")


@pytest.mark.parametrize("case", MOE_CASES)
def test_logits_match_transformers_on_a_padded_batch(saved, case):
    model, _, lm = saved[case]
    input_ids, mask, positions = padded_batch()
    theirs = hf_logits(model, input_ids, mask, positions)
    ours = np.asarray(_apply(lm, input_ids, attention_mask=mask, positions=positions))
    diff = max_diff_on_real_tokens(ours, theirs, mask)
    print(f"{case}: max |logits diff| = {diff:.2e}")
    assert diff <= 1e-4
    if lm.arch.sliding_window is not None:
        # The window matters on this batch (T=10 > window 4), so the test would catch its absence.
        flags = (False,) * lm.arch.num_layers
        no_window = dataclasses.replace(lm.arch, sliding_window=None, sliding_layers=flags)
        wrong = np.asarray(_apply(lm, input_ids, no_window, attention_mask=mask, positions=positions))
        assert max_diff_on_real_tokens(wrong, theirs, mask) > 1e-3


def test_config_reads_each_familys_moe_settings(saved):
    arch = {case: lm.arch for case, (_, _, lm) in saved.items()}
    assert all(a.moe.num_experts == 4 and a.moe.experts_per_token == 2 for a in arch.values())
    assert arch["mixtral"].moe.norm_topk_prob and arch["mixtral"].moe.route_weights_float32
    assert arch["mixtral"].sliding_layers == (True, True)
    assert arch["qwen2_moe"].moe.shared_expert_intermediate_size == 96 and arch["qwen2_moe"].qkv_bias
    assert not arch["qwen2_moe"].moe.norm_topk_prob and arch["qwen2_moe"].sliding_layers == (True, False)
    assert arch["qwen3_moe"].qk_norm and arch["qwen3_moe"].moe.norm_topk_prob
    assert arch["qwen3_moe"].moe.expert_intermediate_size == 64 and arch["qwen3_moe"].head_dim == 32


@pytest.mark.parametrize("module", [mixtral, qwen2_moe, qwen3_moe], ids=lambda m: m.FAMILY.name)
def test_missing_config_keys_take_transformers_defaults(module):
    import transformers as tf

    model_type = module.FAMILY.name
    defaults = tf.AutoConfig.for_model(model_type).to_dict()
    assert module.config_from_hf({"model_type": model_type}) == module.config_from_hf(defaults)


@pytest.mark.parametrize("case", MOE_CASES)
def test_router_aux_loss_equals_transformers_output_router_logits(saved, case):
    model, _, lm = saved[case]
    input_ids, mask, positions = padded_batch(seed=1)
    with torch.no_grad():
        theirs = model(
            torch.as_tensor(input_ids).long(),
            attention_mask=torch.as_tensor(mask),
            position_ids=torch.as_tensor(positions).long(),
            output_router_logits=True,
        ).aux_loss
    _, state = _apply(lm, input_ids, attention_mask=mask, positions=positions, mutable=("intermediates",))
    ours = router_aux.load_balancing_loss(router_aux.router_totals(state["intermediates"]))
    print(f"{case}: aux loss {float(ours):.7f} vs transformers {float(theirs):.7f}")
    np.testing.assert_allclose(float(ours), float(theirs), rtol=1e-6)


@pytest.mark.parametrize("case", MOE_CASES)
def test_sft_loss_with_router_aux_equals_transformers_training_loss(case, tmp_path):
    """transformers' loss with labels and output_router_logits = cross-entropy + coef * aux; the
    objective's loss_with_aux is the same number on the same right-padded batch."""
    model = make_moe_model(case, seed=2, output_router_logits=True, router_aux_loss_coef=0.3)
    model.save_pretrained(tmp_path)
    lm = hf_checkpoint.load_model(tmp_path)
    rng = np.random.default_rng(3)
    ids = rng.integers(0, 256, (3, 12)).astype(np.int32)
    real = np.ones_like(ids)
    real[1, 8:] = 0
    real[2, 5:] = 0
    labels = np.where(real == 1, ids, -100)
    with torch.no_grad():
        out = model(
            torch.as_tensor(ids).long(), attention_mask=torch.as_tensor(real), labels=torch.as_tensor(labels).long()
        )
    batch = {
        "input_ids": ids,
        "targets": np.concatenate([ids[:, 1:], np.zeros((3, 1), np.int32)], axis=1) * real,
        "weights": np.concatenate([real[:, 1:], np.zeros((3, 1), np.int32)], axis=1).astype(np.float32),
        "segment_ids": real,
        "positions": np.broadcast_to(np.arange(12, dtype=np.int32), (3, 12)) * real,
    }
    coef = router_aux.coefficient(_spec_with_coef(None), lm.arch.moe)
    assert coef == 0.3  # config.json's, because it sets output_router_logits
    objective = router_aux.causal_lm_with_router_aux(coef)
    module = lm.family.build(lm.arch, jnp.float32)
    sums = objective.sums(module, lm.params, jax.tree.map(jnp.asarray, batch), jax.random.key(0))
    metrics = objective.summarize(sums)
    np.testing.assert_allclose(float(metrics["loss_with_aux"]), float(out.loss), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["aux_loss"]), float(out.aux_loss), rtol=1e-5)
    np.testing.assert_allclose(
        float(metrics["loss"]), float(out.loss) - 0.3 * float(out.aux_loss), rtol=1e-5
    )  # the language-model loss alone


def _spec_with_coef(coef):
    return type("Spec", (), {"training": type("Training", (), {"router_aux_loss_coef": coef})()})()


def test_aux_coefficient_follows_transformers_unless_the_spec_sets_it(saved):
    moe_arch = saved["mixtral"][2].arch.moe
    assert not moe_arch.output_router_logits
    assert router_aux.coefficient(_spec_with_coef(None), moe_arch) == 0.0  # transformers adds none
    assert router_aux.coefficient(_spec_with_coef(0.02), moe_arch) == 0.02
    on = dataclasses.replace(moe_arch, output_router_logits=True)
    assert router_aux.coefficient(_spec_with_coef(None), on) == on.router_aux_loss_coef == 0.001


# ---------------------------------------------------------------- the expert FFN


def _dense_reference(x_ND, idx_NK, w_NK, gate_up, down, act):
    """Every expert on every token, weighted by the routing: what dropless routing must equal."""
    h = jnp.einsum("nd,edcf->necf", x_ND, gate_up)  # [N, E, 2, F]
    y_NED = jnp.einsum("nef,efd->ned", act(h[:, :, 0]) * h[:, :, 1], down)
    route_NE = jnp.sum(jax.nn.one_hot(idx_NK, gate_up.shape[0]) * w_NK[..., None], axis=1)
    return jnp.einsum("ne,ned->nd", route_NE, y_NED)


@pytest.mark.parametrize("impl", ["blocks", "ragged"])
@pytest.mark.parametrize("routing", ["random", "all-to-two-experts"])
def test_expert_ffn_is_dropless_and_matches_the_dense_reference_with_gradients(impl, routing):
    E, D, F, N, K = 6, 16, 24, 50, 2
    keys = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(keys[0], (N, D))
    gate_up = jax.random.normal(keys[1], (E, D, 2, F)) * 0.2
    down = jax.random.normal(keys[2], (E, F, D)) * 0.2
    if routing == "random":
        idx = jnp.argsort(jax.random.uniform(keys[3], (N, E)), axis=-1)[:, :K]
    else:  # every token to experts 4 and 1: groups far over any capacity a balanced split would give
        idx = jnp.broadcast_to(jnp.array([4, 1]), (N, K))
    w = jax.random.uniform(keys[4], (N, K))

    def ours(x, gate_up, down):
        return moe.local_experts_ffn(x, idx, w, gate_up, down, jax.nn.silu, impl=impl)

    def ref(x, gate_up, down):
        return _dense_reference(x, idx, w, gate_up, down, jax.nn.silu)

    np.testing.assert_allclose(jax.jit(ours)(x, gate_up, down), ref(x, gate_up, down), atol=1e-5)
    loss = lambda f: lambda *a: jnp.sum(jnp.sin(f(*a)))  # noqa: E731
    g_ours = jax.jit(jax.grad(loss(ours), argnums=(0, 1, 2)))(x, gate_up, down)
    g_ref = jax.grad(loss(ref), argnums=(0, 1, 2))(x, gate_up, down)
    for a, b in zip(g_ours, g_ref):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_expert_ffn_skips_experts_held_elsewhere():
    """With `offset`, only the pairs routed to experts offset..offset+E count: summing the shares
    of two halves gives the whole (what the expert-parallel reduce-scatter adds up)."""
    E, D, F, N, K = 4, 8, 12, 20, 2
    keys = jax.random.split(jax.random.key(1), 5)
    x = jax.random.normal(keys[0], (N, D))
    gate_up = jax.random.normal(keys[1], (E, D, 2, F))
    down = jax.random.normal(keys[2], (E, F, D))
    idx = jnp.argsort(jax.random.uniform(keys[3], (N, E)), axis=-1)[:, :K]
    w = jax.random.uniform(keys[4], (N, K))
    whole = moe.local_experts_ffn(x, idx, w, gate_up, down, jax.nn.silu)
    halves = [
        moe.local_experts_ffn(x, idx, w, gate_up[s], down[s], jax.nn.silu, offset=s.start)
        for s in (slice(0, 2), slice(2, 4))
    ]
    np.testing.assert_allclose(halves[0] + halves[1], whole, atol=1e-5)


def test_packed_segments_route_and_attend_as_if_alone(saved):
    _, _, lm = saved["qwen3_moe"]
    rng = np.random.default_rng(3)
    a, b = rng.integers(0, 256, 7).astype(np.int32), rng.integers(0, 256, 5).astype(np.int32)
    packed = np.concatenate([a, b, np.zeros(2, np.int32)])[None]
    segment_ids = np.array([[1] * 7 + [2] * 5 + [0] * 2], np.int32)
    packed_logits = np.asarray(_apply(lm, packed, segment_ids=segment_ids))
    np.testing.assert_allclose(packed_logits[0, :7], np.asarray(_apply(lm, a[None]))[0], atol=1e-5)
    np.testing.assert_allclose(packed_logits[0, 7:12], np.asarray(_apply(lm, b[None]))[0], atol=1e-5)
    # Padding is no token for the load-balancing loss.
    _, state = _apply(lm, packed, segment_ids=segment_ids, mutable=("intermediates",))
    assert float(router_aux.router_totals(state["intermediates"])["tokens"]) == 12 * lm.arch.num_layers


@pytest.mark.slow  # ~50 s under load: three compilations of a value-and-grad
def test_remat_keeps_logits_gradients_and_router_statistics(saved):
    _, _, lm = saved["qwen2_moe"]
    ids = jnp.asarray(np.random.default_rng(4).integers(0, 256, (2, 8)), jnp.int32)

    def loss(params, arch):
        logits, state = lm.family.build(arch).apply({"params": params}, ids, mutable=["intermediates"])
        aux = router_aux.load_balancing_loss(router_aux.router_totals(state["intermediates"]))
        return jax.nn.logsumexp(logits, -1).mean() + aux

    grad_fn = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    base_loss, base_grads = grad_fn(lm.params, lm.arch)
    for remat in ("full", "dots"):
        new_loss, new_grads = grad_fn(lm.params, dataclasses.replace(lm.arch, remat=remat))
        np.testing.assert_allclose(new_loss, base_loss, rtol=1e-6)
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6), new_grads, base_grads)


# ---------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("case", MOE_CASES)
def test_export_reloads_in_transformers_and_round_trips_bitwise(saved, case, tmp_path):
    import transformers as tf

    model, path, lm = saved[case]
    hf_checkpoint.save_hf(tmp_path, lm, dtype="float32")
    reloaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is type(model)
    for key in ("num_experts_per_tok", "router_aux_loss_coef", "layer_types", "sliding_window", "norm_topk_prob"):
        assert getattr(reloaded.config, key, None) == getattr(model.config, key, None), key
    input_ids, mask, positions = padded_batch(seed=2)
    theirs = hf_logits(model, input_ids, mask, positions)
    assert max_diff_on_real_tokens(hf_logits(reloaded, input_ids, mask, positions), theirs, mask) == 0.0
    second = hf_checkpoint.load_model(tmp_path)
    assert second.arch == lm.arch
    a, b = _flat(lm.params), _flat(second.params)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]), err_msg=key)
    # Per-expert tensors, byte-identical to the ones transformers wrote.
    ours, theirs_ckpt = safetensors_read.SafetensorsCheckpoint(tmp_path), safetensors_read.SafetensorsCheckpoint(path)
    assert set(ours.where) == set(theirs_ckpt.where)
    for name in theirs_ckpt.where:
        np.testing.assert_array_equal(ours.get(name), theirs_ckpt.get(name), err_msg=name)


def test_sharded_bfloat16_export_reloads(saved, tmp_path):
    import transformers as tf

    model, _, lm = saved["mixtral"]
    hf_checkpoint.save_hf(tmp_path, lm, dtype="bfloat16", max_shard_bytes=40_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    again = hf_checkpoint.load_model(tmp_path)
    for key, value in _flat(lm.params).items():
        expected = np.asarray(jnp.asarray(value, jnp.bfloat16).astype(jnp.float32))
        np.testing.assert_array_equal(np.asarray(_flat(again.params)[key]), expected, err_msg=key)
    assert tf.AutoModelForCausalLM.from_pretrained(tmp_path).config.num_local_experts == 4


@pytest.mark.parametrize("case", ["mixtral", "qwen2_moe"])
def test_a_checkpoint_stored_in_transformers_fused_layout_loads_the_same(saved, case, tmp_path):
    """`mlp.experts.gate_up_proj` [E, 2F, D] / `down_proj` [E, D, F] / `mlp.gate.weight`, as
    transformers holds them in memory (and some converted checkpoints store them)."""
    from safetensors.torch import save_file

    model, path, lm = saved[case]
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    assert "model.layers.0.mlp.experts.gate_up_proj" in state
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    fused = hf_checkpoint.load_model(tmp_path)
    for key, value in _flat(lm.params).items():
        np.testing.assert_array_equal(np.asarray(_flat(fused.params)[key]), np.asarray(value), err_msg=key)


def test_unsupported_moe_configs_name_what_ftc_supports():
    with pytest.raises(ValueError, match="mixtral.*qwen2_moe.*qwen3_moe|mixtral, .*qwen3_moe"):
        family_for({"model_type": "olmoe", "architectures": ["OlmoeForCausalLM"]})
    with pytest.raises(ValueError, match=r"mlp_only_layers=\[1\].*mixes dense and MoE layers"):
        qwen2_moe.config_from_hf({"model_type": "qwen2_moe", "mlp_only_layers": [1]})
    with pytest.raises(ValueError, match="decoder_sparse_step=2"):
        qwen3_moe.config_from_hf({"model_type": "qwen3_moe", "decoder_sparse_step": 2})
    # transformers' rule: an mlp_only_layers entry past the last layer makes no layer dense.
    past_the_end = {"model_type": "qwen3_moe", "num_hidden_layers": 2, "mlp_only_layers": [2, 5]}
    assert qwen3_moe.config_from_hf(past_the_end).num_layers == 2
    with pytest.raises(ValueError, match="num_experts_per_tok=9"):
        mixtral.config_from_hf({"model_type": "mixtral", "num_experts_per_tok": 9})


def test_experts_carry_the_expert_logical_axis(saved):
    _, _, lm = saved["qwen2_moe"]
    from ftc.backends.jax.models import shapes

    axes = _flat_axes(shapes.logical_axes(lm.family, lm.arch))
    assert axes["layers/mlp/experts/gate_up_proj/kernel"] == ("layers", "expert", "embed", None, "mlp")
    assert axes["layers/mlp/experts/down_proj/kernel"] == ("layers", "expert", "mlp", "embed")
    assert axes["layers/mlp/gate/kernel"] == ("layers", "embed", None)
    assert axes["layers/mlp/shared_expert/up_proj/kernel"] == ("layers", "embed", "mlp")


def _flat_axes(tree):
    return traverse_util.flatten_dict(tree, sep="/", is_leaf=lambda k, v: isinstance(v, tuple))
