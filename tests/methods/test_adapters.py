"""Bottleneck adapters: a transformation of the model, trained alone, reloaded by PyTorch hooks."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers
from flax import linen as nn
from jax.sharding import PartitionSpec as P
from method_testlib import config as method_config

from ftc.backends import torch_adapters
from ftc.backends.jax.io import hf_checkpoint
from ftc.backends.jax.methods import adapter as adapters
from ftc.backends.jax.models.shapes import abstract_boxed_params, param_infos
from ftc.backends.jax.train import mesh as mesh_lib
from ftc.backends.jax.train import step as ts
from ftc.backends.jax.train.optimizer import merge_params, split_params, trainable_mask
from ftc.compiler import sharding_rules


def adapter_config(**keys) -> adapters.AdapterConfig:
    """[method] kind = "adapter" with `keys`, the rest the schema's defaults."""
    return method_config(adapters.AdapterConfig, "adapter", **keys)


def _llama(tmp_path):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(tmp_path / "llama")
    return model, hf_checkpoint.load_model(tmp_path / "llama")


def _bert(tmp_path):
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
    )
    model = transformers.BertModel(config).eval()
    model.save_pretrained(tmp_path / "bert")
    return model, hf_checkpoint.load_model(tmp_path / "bert")


def _batch(seed=0, B=2, T=12):
    rs = np.random.RandomState(seed)
    ids = rs.randint(3, 256, (B, T)).astype(np.int32)
    mask = np.ones((B, T), np.int32)
    mask[1, T - 4 :] = 0  # one padded row
    return ids, mask


def _train(adapted, params, ids, mask, output, steps=4):
    """A few AdamW steps (with weight decay, which would move any leaked base weight) the way the
    training core takes them: grads for the trainable subtree only, frozen leaves passed through."""
    mask_tree = trainable_mask(params, adapters.is_trainable)
    trainable, frozen = split_params(params, mask_tree)
    tx = optax.adamw(3e-2, weight_decay=0.1)
    opt_state = tx.init(trainable)

    def loss_fn(tr):
        out = adapted.apply({"params": merge_params(tr, frozen, mask_tree)}, ids, attention_mask=mask, output=output)
        # An encoder has no LM loss: push one hidden feature up (LayerNorm keeps the rest bounded).
        return (
            -jnp.mean(out[..., 0].astype(jnp.float32))
            if output == "hidden"
            else optax.softmax_cross_entropy_with_integer_labels(out[:, :-1], ids[:, 1:]).mean()
        )

    @jax.jit
    def step(trainable, opt_state):
        loss, grads = jax.value_and_grad(loss_fn)(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    losses = []
    for _ in range(steps):
        trainable, opt_state, loss = step(trainable, opt_state)
        losses.append(float(loss))
    return merge_params(trainable, frozen, mask_tree), losses


@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer"])
def test_adapted_llama_starts_equal_to_base_and_counts_by_formula(tmp_path, placement):
    _, loaded = _llama(tmp_path)
    module = loaded.family.build(loaded.arch, jnp.float32)
    config = adapter_config(placement=placement, reduction_factor=8)
    adapted = adapters.adapt(loaded.family, loaded.arch, module, config)
    params = adapters.init_params(adapted, loaded.params, jax.random.key(0))
    ids, mask = _batch()
    base = module.apply({"params": loaded.params}, ids, attention_mask=mask)
    out = adapted.apply({"params": params}, ids, attention_mask=mask)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(base))

    # 2·D·r + r + D per adapter; houlsby has two per layer, pfeiffer one.
    D, L, r = 64, 2, 64 // 8
    expected = (2 if placement == "houlsby" else 1) * L * (2 * D * r + r + D)
    flags = jax.tree.leaves(trainable_mask(params, adapters.is_trainable))
    trainable = sum(x.size for x, m in zip(jax.tree.leaves(params), flags) if m)
    assert trainable == expected == adapters.num_trainable(adapted.plan, D)

    # What the compiler plans from: adapter weights appear with logical axes, stacked over layers.
    infos = {i.path: i for i in param_infos(abstract_boxed_params(adapted))}
    down = infos["layers/mlp/down_proj/ftc_adapter/down/kernel"]
    assert down.shape == (L, D, r) and down.axes == ("layers", "embed", None)
    assert sum(np.prod(i.shape) for p, i in infos.items() if adapters.is_trainable(p)) == expected
    assert ("layers/self_attn/o_proj/ftc_adapter/up/kernel" in infos) == (placement == "houlsby")


def test_llama_adapters_train_in_the_training_core_on_a_2x2x2_mesh_and_reload_in_pytorch(tmp_path):
    """The real path: plan partitions from logical axes, (2,2,2) mesh, build_steps with the
    adapters' trainable predicate; then the export reloads through PyTorch hooks."""
    torch_model, loaded = _llama(tmp_path)
    module = loaded.family.build(loaded.arch, jnp.float32)
    config = adapter_config(placement="houlsby", reduction_factor=8, non_linearity="gelu")
    adapted = adapters.adapt(loaded.family, loaded.arch, module, config)

    infos = param_infos(abstract_boxed_params(adapted))
    mesh_shape = {"data": 2, "fsdp": 2, "tensor": 2}
    partitions = {i.path: sharding_rules.param_partition(i.axes, i.shape, mesh_shape)[0] for i in infos}
    mesh = mesh_lib.make_mesh(2, 2, 2)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nn.unbox(abstract_boxed_params(adapted)))
    mask = trainable_mask(abstract, adapters.is_trainable)
    tx = optax.adamw(3e-2, weight_decay=0.1)  # weight decay would move any leaked base weight
    state_sh = ts.state_shardings(mesh, ts.abstract_state(abstract, tx, mask), partitions)
    base = hf_checkpoint.load_model(tmp_path / "llama", shardings=adapters.base_params(state_sh["params"])).params
    params = adapters.init_params(adapted, base, jax.random.key(1), shardings=state_sh["params"])
    down = params["layers"]["mlp"]["down_proj"]["ftc_adapter"]["down"]["kernel"]
    assert down.sharding.spec == P(None, "fsdp", None)
    state = jax.jit(lambda p: ts.init_state(p, tx, mask, 0), out_shardings=state_sh)(params)
    steps = ts.build_steps(adapted, tx, optax.constant_schedule(3e-2), mask, mesh, state_sh, accum_steps=1)

    ids = np.random.RandomState(0).randint(3, 256, (8, 13)).astype(np.int32)
    batch = {
        "input_ids": ids[:, :-1],
        "targets": ids[:, 1:],
        "weights": np.ones((8, 12), np.float32),
        "segment_ids": np.ones((8, 12), np.int32),
        "positions": np.tile(np.arange(12, dtype=np.int32), (8, 1)),
    }
    losses = []
    for _ in range(4):
        state, metrics = steps.train(state, steps.put_train_batch(batch))
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0]
    trained = jax.device_get(state["params"])

    # The base is bitwise unchanged; the adapters moved and matter.
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(base), adapters.base_params(trained))
    assert np.abs(trained["layers"]["mlp"]["down_proj"]["ftc_adapter"]["up"]["kernel"]).max() > 1e-3
    ids, mask_ = _batch()
    ours = np.asarray(adapted.apply({"params": trained}, ids, attention_mask=mask_))
    plain = np.asarray(module.apply({"params": loaded.params}, ids, attention_mask=mask_))
    assert np.abs(ours - plain).max() > 1e-2

    out_dir = adapters.export_adapters(adapted.plan, trained, tmp_path / "export")
    handles = torch_adapters.load_adapters(torch_model, out_dir)
    with torch.no_grad():
        theirs = torch_model(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask_)).logits.numpy()
    real = mask_.astype(bool)
    assert np.abs(theirs - ours)[real].max() < 1e-4
    torch_adapters.remove_adapters(torch_model, handles)
    with torch.no_grad():
        unhooked = torch_model(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask_)).logits.numpy()
    assert np.abs(unhooked - plain)[real].max() < 1e-4

    # Export -> import gives the same weights back.
    fresh = adapters.init_params(adapted, loaded.params, jax.random.key(7))
    back = adapters.import_adapters(adapted.plan, out_dir, fresh)
    jax.tree.map(np.testing.assert_array_equal, trained, jax.tree.map(np.asarray, back))


def test_bert_pfeiffer_adapters_reload_into_bert_model_hooks(tmp_path):
    torch_model, loaded = _bert(tmp_path)
    module = loaded.family.build(loaded.arch, jnp.float32)
    config = adapter_config(placement="pfeiffer", reduction_factor=4, non_linearity="relu")
    adapted = adapters.adapt(loaded.family, loaded.arch, module, config)
    assert [s.hf_modules[0] for s in adapted.plan.sites] == ["encoder.layer.0.output.dense"]
    params = adapters.init_params(adapted, loaded.params, jax.random.key(2))
    ids, mask = _batch(seed=1)
    before = jax.tree.map(np.asarray, loaded.params)
    trained, _ = _train(adapted, params, ids, mask, "hidden")
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, adapters.base_params(trained)))

    ours = np.asarray(adapted.apply({"params": trained}, ids, attention_mask=mask, output="hidden"))
    base = np.asarray(module.apply({"params": loaded.params}, ids, attention_mask=mask, output="hidden"))
    assert np.abs(ours - base).max() > 1e-2

    out_dir = adapters.export_adapters(adapted.plan, trained, tmp_path / "export")
    torch_adapters.load_adapters(torch_model, out_dir)
    with torch.no_grad():
        theirs = torch_model(
            torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask)
        ).last_hidden_state.numpy()
    real = mask.astype(bool)
    assert np.abs(theirs - ours)[real].max() < 1e-4

    # A task head over the same encoder finds the modules under its "bert." prefix.
    head_model = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "bert", num_labels=3).eval()
    assert len(torch_adapters.load_adapters(head_model, out_dir)) == 2


def test_adapter_config_errors_name_the_key():
    with pytest.raises(ValueError, match=r"\[method\].placement='parallel'"):
        adapter_config(placement="parallel")
    with pytest.raises(ValueError, match=r"\[method\].non_linearity"):
        adapter_config(non_linearity="softmax")
    with pytest.raises(ValueError, match=r"reduction_factor=128 leaves no bottleneck for hidden size 64"):
        adapter_config(reduction_factor=128).bottleneck(64)


@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer"])
def test_adapters_on_a_mixture_of_experts_model_are_refused_naming_the_methods_that_fit(placement):
    # the MoE FFN has no single output projection: the refusal said only "no ffn output projection
    # ftc recognises" with a regex, reading like an ftc bug rather than what to do instead
    from moe_testlib import moe_config

    from ftc.backends.jax.models import family_for

    hf_config = moe_config("mixtral").to_dict()
    family = family_for(hf_config)
    arch = family.config_from_hf(hf_config)
    with pytest.raises(ValueError, match=r'kind="adapter": .*mixture-of-experts.*kind = "lora" / "qlora"'):
        adapters.plan_adapters(family, arch, adapter_config(placement=placement))
