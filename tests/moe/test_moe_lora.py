"""LoRA and QLoRA on the MoE families: per-expert factors on the fused expert weights, exported as
a PEFT adapter (`target_parameters`) that PEFT loads with ftc's logits, and merged."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import transformers
from lora_testlib import batch, flat, lora_config, qlora_config, randomize_factors, torch_logits, train
from moe_testlib import MOE_CASES, make_moe_model

from ftc.backends.jax.io import hf_checkpoint
from ftc.backends.jax.methods import lora, lora_params, qlora


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    out = {}
    for case in MOE_CASES:
        path = tmp_path_factory.mktemp(case)
        make_moe_model(case, seed=5).save_pretrained(path)
        out[case] = (path, hf_checkpoint.load_model(path))
    return out


def _base_logits(loaded, ids, mask):
    return np.asarray(loaded.family.build(loaded.arch).apply({"params": loaded.params}, ids, attention_mask=mask))


def _jitted(method):
    """params, ids, mask -> logits of the method's model, compiled once (eager MoE layers are slow)."""
    return jax.jit(lambda params, ids, mask: method.apply(params, ids, attention_mask=mask))


@pytest.mark.parametrize(
    "case,targets",
    [
        ("mixtral", "all-linear"),  # attention + every expert projection (w1/w3 fused as gate_up)
        # + the shared expert and its gate (fast suite: tests/moe/test_moe_run.py's LoRA run)
        pytest.param("qwen2_moe", "all-linear", marks=pytest.mark.slow),
        ("qwen3_moe", ("q_proj", "v_proj", "experts.down_proj")),  # one expert parameter of two
    ],
)
def test_peft_adapter_with_expert_factors_loads_in_peft_and_merges_with_equal_logits(models, tmp_path, case, targets):
    path, loaded = models[case]
    method = lora.init_method(loaded, lora_config(rank=3, alpha=9, targets=targets), jax.random.key(0))
    experts = [s for s in method.plan.lora_sites if s.experts]
    assert experts and all(s.experts == 4 for s in experts)
    assert not any(s.param_path == "layers/mlp/gate" for s in method.plan.lora_sites)  # never the router
    params = randomize_factors(method.params, seed=3)
    ids, mask = batch(seed=1)
    real = mask.astype(bool)
    run = _jitted(method)
    ours = np.asarray(run(params, ids, mask))
    assert np.abs(ours - _base_logits(loaded, ids, mask))[real].max() > 1e-2  # the adapter matters
    # Without the expert factors the logits differ: they take part.
    no_experts = jax.tree_util.tree_map_with_path(
        lambda p, x: (
            jnp.zeros_like(x) if "experts" in jax.tree_util.keystr(p) and lora.CHILD in jax.tree_util.keystr(p) else x
        ),
        params,
    )
    assert np.abs(ours - np.asarray(run(no_experts, ids, mask)))[real].max() > 1e-3

    adapter = lora.save_peft_adapter(
        tmp_path / "adapter", loaded.family, loaded.arch, method.plan, params, base_model_name_or_path=str(path)
    )
    written = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert written["target_parameters"] == sorted({s.hf_modules[0].split(".", 3)[-1] for s in experts})
    assert set(written) <= set(peft.LoraConfig().to_dict())
    base = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    peft_model = peft.PeftModel.from_pretrained(base, adapter).eval()
    diff = np.abs(torch_logits(peft_model, ids, mask) - ours)[real].max()
    print(f"{case}: PEFT adapter max |logits diff| = {diff:.2e}")
    assert diff < 1e-4, diff

    back = lora.load_peft_adapter(adapter, loaded.family, loaded.arch, method.plan, method.params)
    jax.tree.map(np.testing.assert_array_equal, flat(params), flat(back))

    lora_params.save_merged(
        tmp_path / "merged", loaded.family, loaded.arch, method.plan, params, loaded.hf_config, dtype="float32"
    )
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    diff = np.abs(torch_logits(merged, ids, mask) - ours)[real].max()
    assert diff < 1e-4, diff


def test_expert_factors_count_per_expert_and_only_they_train(models):
    _, loaded = models["mixtral"]
    method = lora.init_method(loaded, lora_config(rank=2, alpha=4, targets="all-linear"), jax.random.key(0))
    sites = {s.param_path: s for s in method.plan.lora_sites}
    gate_up = sites["layers/mlp/experts/gate_up_proj"]
    assert gate_up.kernel_shape == (64, 2, 128) and gate_up.lead == (2, 4)
    a = method.params["layers"]["mlp"]["experts"]["gate_up_proj"][lora.CHILD]["a"]
    assert a.shape == (2, 4, 64, 2)  # [layers, experts, in, r]
    assert lora_params.method_summary(method.params).trainable == lora_params.expected_trainable(method.plan)
    ids, mask = batch(seed=2)
    trained, losses = train(method, method.params, jnp.asarray(ids), jnp.asarray(mask), steps=3)
    assert losses[-1] < losses[0]
    before, after = flat(method.params), flat(trained)
    moved = [k for k in before if not np.array_equal(before[k], after[k])]
    assert moved and all(lora.CHILD in k for k in moved)
    assert any("experts/gate_up_proj/ftc_lora/b" in k for k in moved)


def test_dropout_on_expert_factors_is_refused_as_peft_refuses_it(models):
    _, loaded = models["qwen3_moe"]
    with pytest.raises(ValueError, match=r"dropout=0.1.*expert.*set dropout = 0 or leave the experts out"):
        lora.plan_lora(loaded.family, loaded.arch, lora_config(dropout=0.1, targets="all-linear"))
    plan = lora.plan_lora(loaded.family, loaded.arch, lora_config(dropout=0.1, targets=("q_proj", "o_proj")))
    assert not any(s.experts for s in plan.lora_sites)


def test_qlora_stores_experts_as_nf4_and_its_adapter_loads_on_the_dequantised_base(models, tmp_path):
    _, loaded = models["qwen2_moe"]
    config = qlora_config(rank=2, alpha=4, quant_block_size=32, double_quant=True)
    method = qlora.init_method(loaded, config, jax.random.key(0), dtype=jnp.float32)
    experts = method.params["layers"]["mlp"]["experts"]["down_proj"]
    assert "kernel" not in experts and experts[lora.QUANT_CHILD]["codes"].dtype == jnp.uint8
    assert experts[lora.QUANT_CHILD]["codes"].shape == (2, 4, 64 // 2, 64)  # [L, E, F / 2, D]
    params = randomize_factors(method.params, seed=4)
    ids, mask = batch(seed=3)
    real = mask.astype(bool)
    run = _jitted(method)
    ours = np.asarray(run(params, ids, mask))
    # A fresh QLoRA model computes the NF4-dequantised base, which stays near the original.
    fresh = np.asarray(run(method.params, ids, mask))
    dequantised = qlora.dequantized_base(method.plan, params)
    module = loaded.family.build(loaded.arch)
    np.testing.assert_allclose(
        fresh, np.asarray(module.apply({"params": dequantised}, ids, attention_mask=mask)), rtol=1e-5, atol=1e-5
    )
    original = _base_logits(loaded, ids, mask)
    assert 0 < np.linalg.norm((fresh - original)[real]) / np.linalg.norm(original[real]) < 0.3

    base_dir = tmp_path / "base"
    hf_checkpoint.save_hf(base_dir, (loaded.family, loaded.arch, dequantised, loaded.hf_config), dtype="float32")
    adapter = qlora.save_peft_adapter(
        tmp_path / "adapter", loaded.family, loaded.arch, method.plan, params, base_model_name_or_path=str(base_dir)
    )
    peft_model = peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(base_dir).eval(), adapter
    ).eval()
    assert np.abs(torch_logits(peft_model, ids, mask) - ours)[real].max() < 1e-4
    qlora.save_merged(
        tmp_path / "merged", loaded.family, loaded.arch, method.plan, params, loaded.hf_config, dtype="float32"
    )
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert np.abs(torch_logits(merged, ids, mask) - ours)[real].max() < 1e-4
