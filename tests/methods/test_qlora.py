"""QLoRA: NF4 storage of the frozen base (nf4.py) under LoRA, trained alone, exported like LoRA."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import pytest
from flax import linen as nn
from jax.sharding import PartitionSpec as P
from lora_testlib import CLASSES, batch, flat, make_model, qlora_config, randomize_factors, torch_logits, train
from scipy.stats import norm

from ftc.backends.jax.io import hf_checkpoint
from ftc.backends.jax.methods import lora, nf4, qlora
from ftc.backends.jax.models.shapes import abstract_boxed_params, param_infos
from ftc.backends.jax.train import mesh as mesh_lib
from ftc.backends.jax.train import step as ts
from ftc.backends.jax.train.optimizer import trainable_mask
from ftc.compiler import sharding_rules
from ftc.spec import schema_walk

# Largest distance from a point of [-1, 1] to its nearest NF4 level: half the widest gap (-1 .. -0.696).
HALF_GAP = float(np.max(np.diff(nf4.NF4)) / 2)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    out = {}
    for case in ("llama", "gpt2"):
        path = tmp_path_factory.mktemp(case)
        out[case] = (path, make_model(case, path))
    return out


def test_nf4_levels_are_bitsandbytes_normal_quantiles():
    """QLoRA's construction (bitsandbytes create_normal_map, offset 0.9677083): 8 positive and 7
    negative normal quantiles plus zero, scaled to [-1, 1]."""
    offset = 0.9677083
    positive = norm.ppf(np.linspace(offset, 0.5, 9)[:-1])
    negative = -norm.ppf(np.linspace(offset, 0.5, 8)[:-1])
    levels = np.sort(np.concatenate([positive, [0.0], negative]))
    levels /= levels.max()
    np.testing.assert_allclose(nf4.NF4, levels, atol=2e-7)
    assert nf4.NF4[7] == 0.0 and nf4.NF4[0] == -1.0 and nf4.NF4[15] == 1.0


def test_nf4_round_trip_error_is_within_half_a_level_gap_of_each_block_absmax():
    rs = np.random.RandomState(0)
    w = rs.standard_t(df=4, size=(3, 128, 2, 24)).astype(np.float32) * 0.02  # heavy-tailed, stacked
    q = nf4.quantize(jnp.asarray(w), 1, 1, block_size=64)
    assert q["codes"].shape == (3, 64, 2, 24) and q["codes"].dtype == jnp.uint8
    assert q["absmax"].shape == (3, 2, 2, 24)
    back = np.asarray(nf4.dequantize(q, 1, (128,)))
    absmax = np.abs(w.reshape(3, 2, 64, 2, 24)).max(axis=2, keepdims=True)
    err = np.abs(back - w).reshape(3, 2, 64, 2, 24)
    assert (err <= HALF_GAP * absmax * (1 + 1e-6)).all()
    rel_rms = float(np.sqrt(np.mean((back - w) ** 2)) / np.std(w))
    print(
        f"NF4 block 64: max |err| / block absmax = {float((err / absmax).max()):.4f} "
        f"(bound {HALF_GAP:.4f}), rms err / std = {rel_rms:.4f}"
    )
    assert rel_rms < 0.12
    # On normal weights NF4 beats a uniform 4-bit grid over the same [-absmax, absmax] blocks.
    g = rs.randn(64, 512).astype(np.float32)
    q_g = nf4.quantize(jnp.asarray(g), 0, 1, block_size=64)
    nf4_rms = np.sqrt(np.mean((np.asarray(nf4.dequantize(q_g, 0, (64,))) - g) ** 2))
    scale = np.abs(g.reshape(1, 64, 512)).max(axis=1, keepdims=True) / 7.5
    uniform = (np.clip(np.floor(g / scale + 0.5), -8, 7) + 0.0) * scale  # 16 evenly spaced levels
    uniform_rms = np.sqrt(np.mean((uniform.reshape(64, 512) - g) ** 2))
    print(f"normal weights: NF4 rms err {nf4_rms:.4f} vs uniform 4-bit {uniform_rms:.4f}")
    assert nf4_rms < uniform_rms

    # Values on the levels come back exactly; the pair packs first-in-high-nibble; zero blocks stay zero.
    exact = np.concatenate([nf4.NF4, nf4.NF4[::-1]]).reshape(32, 1) * np.float32(0.5)
    q = nf4.quantize(jnp.asarray(exact), 0, 1, block_size=32)
    np.testing.assert_array_equal(np.asarray(nf4.dequantize(q, 0, (32,))), exact)
    assert int(q["codes"][0, 0]) == (0 << 4) | 1 and int(q["codes"][8, 0]) == (15 << 4) | 14
    zeros = nf4.quantize(jnp.zeros((64, 3)), 0, 1, block_size=64)
    np.testing.assert_array_equal(np.asarray(nf4.dequantize(zeros, 0, (64,))), 0.0)


def test_double_quantised_scales_stay_within_their_int8_step():
    rs = np.random.RandomState(1)
    w = rs.randn(2, 256, 40).astype(np.float32)
    single = nf4.quantize(jnp.asarray(w), 1, 1, block_size=32)
    double = nf4.quantize(jnp.asarray(w), 1, 1, block_size=32, double_quant=True)
    assert double["absmax_q"].dtype == jnp.int8 and double["absmax_scale"].shape == (2, 2)  # 8*40 = 320 -> 2 groups
    np.testing.assert_array_equal(np.asarray(double["codes"]), np.asarray(single["codes"]))
    got, want = np.asarray(nf4.absmax_of(double, 1)), np.asarray(single["absmax"])
    step = np.repeat(np.asarray(double["absmax_scale"]), 256, axis=1)[:, :320].reshape(want.shape)
    assert (np.abs(got - want) <= step / 2 * (1 + 1e-5) + 1e-7).all()
    assert np.abs(got - want).max() / want.max() < 0.01
    err = np.abs(np.asarray(nf4.dequantize(double, 1, (256,))) - w)
    assert err.max() <= (HALF_GAP + 0.01) * np.abs(w).max()


@pytest.mark.parametrize("double_quant,bound", [(False, 0.29), (True, 0.26)])
def test_quantised_base_takes_under_0_3_of_its_bf16_bytes(models, double_quant, bound):
    _, loaded = models["llama"]
    config = qlora_config(rank=4, alpha=8, double_quant=double_quant)
    method = qlora.init_method(loaded, config, jax.random.key(0), dtype=jnp.float32)
    stored = {p: x for p, x in flat(method.params).items() if lora.QUANT_CHILD in p.split("/")}
    measured = sum(x.nbytes for x in stored.values())
    weights = sum(int(np.prod(s.kernel_shape)) * len(s.hf_modules) for s in method.plan.quant_sites)
    summary = qlora.method_summary(method.params)
    assert (summary.quantized_bytes, summary.quantized_weights) == (measured, weights)
    ratio = measured / (2 * weights)
    whole = summary.base_bytes / (2 * summary.total - 2 * summary.trainable)
    print(
        f"double_quant={double_quant}: NF4 kernels {measured} B = {ratio:.4f} x bf16; "
        f"whole frozen base (embeddings/norms float32) {whole:.4f} x bf16"
    )
    assert ratio <= bound
    # Every linear layer in the blocks is stored quantised, the float kernel gone; the LM head is not.
    paths = set(flat(method.params))
    assert len(method.plan.quant_sites) == 7
    for s in method.plan.quant_sites:
        assert s.param_path + "/kernel" not in paths and s.param_path + "/ftc_nf4/codes" in paths
    assert "lm_head/kernel" in paths


def test_qlora_model_computes_the_dequantised_base_and_stays_near_the_original(models):
    _, loaded = models["llama"]
    method = qlora.init_method(loaded, qlora_config(rank=4, alpha=8), jax.random.key(0), dtype=jnp.float32)
    ids, mask = batch()
    real = mask.astype(bool)
    ours = np.asarray(method.apply(method.params, ids, attention_mask=mask))
    module = loaded.family.build(loaded.arch)
    dequantised = qlora.dequantized_base(method.plan, method.params)
    np.testing.assert_allclose(
        ours, np.asarray(module.apply({"params": dequantised}, ids, attention_mask=mask)), rtol=1e-5, atol=1e-5
    )
    original = np.asarray(module.apply({"params": loaded.params}, ids, attention_mask=mask))
    max_abs = float(np.abs(ours - original)[real].max())
    rel = float(np.linalg.norm((ours - original)[real]) / np.linalg.norm(original[real]))
    print(
        f"QLoRA (NF4, block 64) vs unquantised logits: max abs {max_abs:.4f} "
        f"(logit scale {np.abs(original[real]).max():.3f}), relative L2 {rel:.4f}"
    )
    # A random 2-layer net carries the ~9% weight error (rms / std, NF4 on normal weights) into its
    # logits; smaller blocks must shrink it.
    assert 0 < rel < 0.3
    # Block 8 is below the schema's sizes (the spec's choice); NF4 storage itself takes any even size.
    finer = lora.init_method(
        loaded,
        qlora_config(rank=4, alpha=8).lora,
        jax.random.key(0),
        dtype=jnp.float32,
        quant=lora.QuantConfig(block_size=8, double_quant=False),
    )
    out8 = np.asarray(finer.apply(finer.params, ids, attention_mask=mask))
    rel8 = float(np.linalg.norm((out8 - original)[real]) / np.linalg.norm(original[real]))
    print(f"  block 8: relative L2 {rel8:.4f}")
    assert rel8 < 0.8 * rel

    # bfloat16 compute runs and stays near the float32 result.
    bf16 = qlora.adapt(
        loaded.family, loaded.arch, loaded.family.build(loaded.arch, jnp.bfloat16), qlora_config(rank=4, alpha=8)
    )
    out16 = np.asarray(bf16.apply({"params": method.params}, ids, attention_mask=mask), np.float32)
    assert np.linalg.norm((out16 - ours)[real]) / np.linalg.norm(ours[real]) < 0.05


def test_qlora_training_moves_only_the_lora_factors(models):
    _, loaded = models["llama"]
    config = qlora_config(rank=4, alpha=8, double_quant=True, targets=("q_proj", "v_proj", "down_proj"))
    method = qlora.init_method(loaded, config, jax.random.key(0), dtype=jnp.float32)
    ids, mask = batch()
    before = flat(method.params)
    trained, losses = train(method, method.params, ids, mask)
    assert losses[-1] < losses[0]
    after = flat(trained)
    assert any(p.endswith("ftc_nf4/absmax_q") for p in after)
    for path in before:
        if qlora.is_trainable(path):
            assert np.abs(after[path] - before[path]).max() > 1e-3, path
        else:
            assert after[path].dtype == before[path].dtype
            np.testing.assert_array_equal(after[path], before[path], err_msg=path)


@pytest.mark.parametrize("case", ["llama", "gpt2"])
def test_qlora_adapter_loads_in_peft_on_the_dequantised_base_and_merges(models, tmp_path, case):
    _, loaded = models[case]
    config = qlora_config(rank=4, alpha=8, double_quant=case == "gpt2")
    method = qlora.init_method(loaded, config, jax.random.key(0), dtype=jnp.float32)
    params = randomize_factors(method.params, seed=3)
    ids, mask = batch(seed=2)
    real = mask.astype(bool)
    ours = np.asarray(method.apply(params, ids, attention_mask=mask))

    hf_checkpoint.save_hf(
        tmp_path / "base",
        (loaded.family, loaded.arch, qlora.dequantized_base(method.plan, params), loaded.hf_config),
        dtype="float32",
    )
    adapter = qlora.save_peft_adapter(
        tmp_path / "adapter",
        loaded.family,
        loaded.arch,
        method.plan,
        params,
        base_model_name_or_path=str(tmp_path / "base"),
    )
    base = CLASSES[case].from_pretrained(tmp_path / "base").eval()
    peft_model = peft.PeftModel.from_pretrained(base, adapter).eval()
    diff = np.abs(torch_logits(peft_model, ids, mask) - ours)[real].max()
    assert diff < 1e-4, diff

    qlora.save_merged(
        tmp_path / "merged", loaded.family, loaded.arch, method.plan, params, loaded.hf_config, dtype="float32"
    )
    merged = CLASSES[case].from_pretrained(tmp_path / "merged").eval()
    diff = np.abs(torch_logits(merged, ids, mask) - ours)[real].max()
    assert diff < 1e-4, diff


def test_block_size_that_does_not_divide_a_layer_is_refused_with_the_layer_named(models):
    _, loaded = models["llama"]  # its down_proj reads 128 inputs
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.down_proj.*not a multiple.*quant_block_size=256"):
        qlora.plan_qlora(loaded.family, loaded.arch, qlora_config(quant_block_size=256))
    with pytest.raises(ValueError, match="quant_block_size"):
        qlora_config(quant_block_size=63)


def test_qlora_block_sizes_are_the_schemas_enum():
    """The config takes exactly the sizes the spec contract allows (a hand-built 48 or 16 too)."""
    allowed = schema_walk.node_at(("method", "quant_block_size"))["enum"]
    assert [b for b in (8, 16, 32, 48, 64, 96, 128, 256, 512) if _accepted(b)] == allowed == [32, 64, 128, 256]
    with pytest.raises(ValueError, match=r"quant_block_size=48: expected one of 32, 64, 128, 256"):
        qlora_config(quant_block_size=48)


def _accepted(block_size: int) -> bool:
    try:
        qlora_config(quant_block_size=block_size)
    except ValueError:
        return False
    return True


def test_qlora_trains_in_the_training_core_on_a_2x2x2_mesh(models):
    """Plan partitions from the transformed model's logical axes, NF4 storage sharded like its
    kernel, build_steps with the LoRA predicate: the uint8/int8 base passes through untouched."""
    _, loaded = models["llama"]
    config = qlora_config(rank=4, alpha=8, double_quant=True)
    model = qlora.adapt(loaded.family, loaded.arch, loaded.family.build(loaded.arch, jnp.float32), config)
    boxed = abstract_boxed_params(model)
    infos = param_infos(boxed)
    mesh_shape = {"data": 2, "fsdp": 2, "tensor": 2}
    partitions = {i.path: sharding_rules.param_partition(i.axes, i.shape, mesh_shape)[0] for i in infos}
    mesh = mesh_lib.make_mesh(2, 2, 2)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nn.unbox(boxed))
    mask = trainable_mask(abstract, qlora.is_trainable)
    tx = optax.adamw(3e-2, weight_decay=0.1)
    state_sh = ts.state_shardings(mesh, ts.abstract_state(abstract, tx, mask), partitions)
    params = lora.init_params(model, loaded.params, jax.random.key(1), shardings=state_sh["params"])
    codes = params["layers"]["mlp"]["up_proj"]["ftc_nf4"]["codes"]
    assert codes.dtype == jnp.uint8 and codes.sharding.spec == P(None, "fsdp", "tensor")
    state = jax.jit(lambda p: ts.init_state(p, tx, mask, 0), out_shardings=state_sh)(params)
    steps = ts.build_steps(model, tx, optax.constant_schedule(3e-2), mask, mesh, state_sh, accum_steps=2)
    ids = np.random.RandomState(0).randint(3, 256, (8, 13)).astype(np.int32)
    train_batch = {
        "input_ids": ids[:, :-1],
        "targets": ids[:, 1:],
        "weights": np.ones((8, 12), np.float32),
        "segment_ids": np.ones((8, 12), np.int32),
        "positions": np.tile(np.arange(12, dtype=np.int32), (8, 1)),
    }
    before = flat(jax.device_get(params))
    losses = []
    for _ in range(3):
        state, metrics = steps.train(state, steps.put_train_batch(train_batch))
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0]
    after = flat(jax.device_get(state["params"]))
    for path, value in before.items():
        if not qlora.is_trainable(path):
            np.testing.assert_array_equal(after[path], value, err_msg=path)
