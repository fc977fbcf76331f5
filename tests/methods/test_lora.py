"""LoRA: a transformation of any family's model, trained alone, exported in PEFT's format and merged."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from lora_testlib import CLASSES, batch, flat, lora_config, make_model, randomize_factors, torch_logits, train

from ftc.backends.jax.methods import lora, lora_params

CASES = ("llama", "qwen2", "gpt2")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """case -> (saved model dir, LoadedModel), built once for the module."""
    out = {}
    for case in CASES:
        path = tmp_path_factory.mktemp(case)
        out[case] = (path, make_model(case, path))
    return out


def _base_logits(loaded, ids, mask):
    return np.asarray(loaded.family.build(loaded.arch).apply({"params": loaded.params}, ids, attention_mask=mask))


@pytest.mark.parametrize("case", CASES)
def test_fresh_lora_model_equals_its_base_exactly(models, case):
    _, loaded = models[case]
    method = lora.init_method(loaded, lora_config(rank=4, alpha=8), jax.random.key(0))
    ids, mask = batch()
    ours = np.asarray(method.apply(method.params, ids, attention_mask=mask))
    np.testing.assert_array_equal(ours, _base_logits(loaded, ids, mask))
    # A is random (PEFT's kaiming-uniform bound 1/sqrt(in)), B is zero.
    a = method.params["layers"]["mlp"][("down_proj" if case != "gpt2" else "c_proj")][lora.CHILD]["a"]
    fan_in = a.shape[1]
    assert 0.5 / np.sqrt(fan_in) < np.abs(np.asarray(a)).max() <= 1 / np.sqrt(fan_in)


@pytest.mark.parametrize("case", CASES)
def test_trainable_count_is_rank_times_in_plus_out_per_adapted_layer(models, case):
    """Counted against the PyTorch model's own nn.Linear / Conv1D shapes."""
    path, loaded = models[case]
    r = 4
    method = lora.init_method(loaded, lora_config(rank=r, alpha=8), jax.random.key(0))
    torch_model = CLASSES[case].from_pretrained(path)
    expected = 0
    for name, module in torch_model.named_modules():
        if ".h." in name or ".layers." in name:
            if isinstance(module, torch.nn.Linear):
                expected += r * (module.in_features + module.out_features)
            elif type(module).__name__ == "Conv1D":
                expected += r * sum(module.weight.shape)
    summary = lora.method_summary(method.params)
    assert summary.trainable == expected == lora.expected_trainable(method.plan)
    base_count = sum(p.numel() for p in torch_model.parameters())
    assert summary.total == base_count + expected
    assert summary.base_bytes == 4 * sum(int(np.prod(x.shape)) for x in jax.tree.leaves(loaded.params))
    trainable = sum(np.prod(x.shape) for p, x in flat(method.params).items() if lora.is_trainable(p))
    assert trainable == expected


def test_training_moves_only_the_lora_factors(models):
    _, loaded = models["llama"]
    method = lora.init_method(loaded, lora_config(rank=4, alpha=8, dropout=0.1), jax.random.key(0))
    ids, mask = batch()
    before = flat(method.params)
    trained, losses = train(method, method.params, ids, mask)
    assert losses[-1] < losses[0]
    after = flat(trained)
    assert set(before) == set(after)
    for path in before:
        if lora.is_trainable(path):
            assert np.abs(after[path] - before[path]).max() > 1e-3, path  # A and B both moved
        else:
            np.testing.assert_array_equal(after[path], before[path], err_msg=path)  # bitwise


@pytest.mark.parametrize(
    "case,targets,rslora",
    [
        ("llama", "all-linear", False),
        ("llama", ("q_proj", "self_attn.o_proj", "mlp/down_proj"), True),
        ("qwen2", "all-linear", True),  # q/k/v carry biases
        ("gpt2", "all-linear", False),  # Conv1D weights ([in, out]) and a fused [D, 3, N, H] c_attn
        ("gpt2", ("c_attn", "attn.c_proj"), False),  # attn.c_proj without mlp.c_proj
    ],
)
def test_peft_adapter_loads_in_peft_and_merged_export_in_transformers_with_equal_logits(
    models, tmp_path, case, targets, rslora
):
    path, loaded = models[case]
    config = lora_config(rank=4, alpha=12, rslora=rslora, targets=targets)
    method = lora.init_method(loaded, config, jax.random.key(0))
    params = randomize_factors(method.params, seed=3)
    ids, mask = batch(seed=1)
    ours = np.asarray(method.apply(params, ids, attention_mask=mask))
    real = mask.astype(bool)
    assert np.abs(ours - _base_logits(loaded, ids, mask))[real].max() > 1e-2  # the adapter matters

    adapter_dir = lora.save_peft_adapter(
        tmp_path / "adapter", loaded.family, loaded.arch, method.plan, params, base_model_name_or_path=str(path)
    )
    written = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (written["r"], written["lora_alpha"], written["use_rslora"], written["task_type"]) == (
        4,
        12,
        rslora,
        "CAUSAL_LM",
    )
    assert set(written) <= set(peft.LoraConfig().to_dict())  # every key is one PEFT knows
    base = CLASSES[case].from_pretrained(path).eval()
    peft_model = peft.PeftModel.from_pretrained(base, adapter_dir).eval()
    n_lora = sum(1 for n, _ in peft_model.named_parameters() if "lora_A" in n)
    assert n_lora == sum(len(s.hf_modules) for s in method.plan.lora_sites)
    diff = np.abs(torch_logits(peft_model, ids, mask) - ours)[real].max()
    assert diff < 1e-4, diff

    lora_params.save_merged(
        tmp_path / "merged", loaded.family, loaded.arch, method.plan, params, loaded.hf_config, dtype="float32"
    )
    merged = CLASSES[case].from_pretrained(tmp_path / "merged").eval()
    diff = np.abs(torch_logits(merged, ids, mask) - ours)[real].max()
    assert diff < 1e-4, diff


def test_peft_adapter_reads_back_bitwise(models, tmp_path):
    _, loaded = models["gpt2"]
    method = lora.init_method(loaded, lora_config(rank=3, alpha=6), jax.random.key(0))
    params = randomize_factors(method.params, seed=5)
    lora.save_peft_adapter(tmp_path, loaded.family, loaded.arch, method.plan, params, base_model_name_or_path="x")
    back = lora.load_peft_adapter(tmp_path, loaded.family, loaded.arch, method.plan, method.params)
    jax.tree.map(np.testing.assert_array_equal, flat(params), flat(back))
    other = lora.plan_lora(loaded.family, loaded.arch, lora_config(rank=3, alpha=7))
    with pytest.raises(ValueError, match="lora_alpha"):
        lora.load_peft_adapter(tmp_path, loaded.family, loaded.arch, other, method.params)


def test_rslora_scales_by_alpha_over_sqrt_rank(models):
    _, loaded = models["llama"]
    assert lora_config(rank=16, alpha=32).scale == 2.0
    assert lora_config(rank=16, alpha=32, rslora=True).scale == 8.0
    ids, mask = batch()
    base = _base_logits(loaded, ids, mask)
    deltas = {}
    for rslora in (False, True):
        method = lora.init_method(
            loaded, lora_config(rank=16, alpha=1e-3, rslora=rslora, targets=("v_proj",)), jax.random.key(0)
        )
        params = randomize_factors(method.params, seed=1)
        deltas[rslora] = np.asarray(method.apply(params, ids, attention_mask=mask)) - base
    # A tiny alpha keeps the model in its linear regime: the change scales with the LoRA scale (4x).
    ratio = np.abs(deltas[True]).sum() / np.abs(deltas[False]).sum()
    assert abs(ratio - 4.0) < 0.01, ratio


def test_targets_select_by_name_path_or_regex_and_report_what_exists(models):
    _, loaded = models["llama"]
    family, arch = loaded.family, loaded.arch

    def chosen(targets):
        return sorted(s.param_path for s in lora.plan_lora(family, arch, lora_config(targets=targets)).lora_sites)

    all_linear = chosen("all-linear")
    assert len(all_linear) == 7 and not any("lm_head" in p for p in all_linear)
    assert chosen(("q_proj", "v_proj")) == ["layers/self_attn/q_proj", "layers/self_attn/v_proj"]
    assert chosen(("mlp/up_proj",)) == ["layers/mlp/up_proj"]
    assert chosen((r"model\.layers\.\d+\.mlp\.(gate|up)_proj",)) == ["layers/mlp/gate_proj", "layers/mlp/up_proj"]
    assert chosen((r".*_proj",)) == all_linear
    assert chosen(("lm_head",)) == ["lm_head"]  # named explicitly, it is a target like any other
    with pytest.raises(ValueError, match="matches no linear layer.*q_proj"):
        chosen(("query",))
    with pytest.raises(ValueError, match="every layer|all layers"):
        chosen((r"model\.layers\.0\.self_attn\.q_proj",))
    with pytest.raises(ValueError, match="regular expression"):
        chosen(("q_proj(",))


def test_lora_dropout_touches_only_the_lora_branch_and_only_when_training(models):
    _, loaded = models["llama"]
    method = lora.init_method(loaded, lora_config(rank=4, alpha=8, dropout=0.5), jax.random.key(0))
    ids, mask = batch()
    base = _base_logits(loaded, ids, mask)
    rngs = {"dropout": jax.random.key(1)}
    # B = 0: dropout inside the LoRA branch cannot change the output.
    np.testing.assert_array_equal(np.asarray(method.apply(method.params, ids, attention_mask=mask, rngs=rngs)), base)
    params = randomize_factors(method.params, seed=2)
    plain = np.asarray(method.apply(params, ids, attention_mask=mask))
    dropped = np.asarray(method.apply(params, ids, attention_mask=mask, rngs=rngs))
    assert np.abs(dropped - plain).max() > 1e-3
    evaluating = method.module.clone(deterministic=True)
    np.testing.assert_array_equal(
        np.asarray(evaluating.apply({"params": params}, ids, attention_mask=mask, rngs=rngs)), plain
    )


def test_lora_works_under_remat(models):
    _, loaded = models["llama"]
    config = lora_config(rank=4, alpha=8)
    method = lora.init_method(loaded, config, jax.random.key(0))
    params = randomize_factors(method.params, seed=4)
    arch = dataclasses.replace(loaded.arch, remat="full")
    remat = lora.adapt(loaded.family, arch, loaded.family.build(arch), config)
    ids, mask = batch()
    loss = lambda m: lambda p: jnp.sum(m.apply({"params": p}, ids, attention_mask=mask)[..., :8])
    g1 = jax.grad(loss(method.module))(params)
    g2 = jax.grad(loss(remat))(params)
    a1 = flat(g1)["layers/self_attn/q_proj/ftc_lora/a"]
    np.testing.assert_allclose(flat(g2)["layers/self_attn/q_proj/ftc_lora/a"], a1, rtol=1e-5, atol=1e-6)
    assert np.abs(a1).max() > 0


def test_bert_encoder_adapter_loads_in_peft_as_feature_extraction(tmp_path):
    """An encoder family: all-linear skips the pooler (outside the blocks); PEFT's target names
    must not pick it up either ("output.dense", not "dense")."""
    import transformers

    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
    )
    transformers.BertModel(config).eval().save_pretrained(tmp_path / "bert")
    from ftc.backends.jax.io import hf_checkpoint

    loaded = hf_checkpoint.load_model(tmp_path / "bert")
    method = lora.init_method(loaded, lora_config(rank=4, alpha=8), jax.random.key(0))
    params = randomize_factors(method.params, seed=1)
    ids, mask = batch()
    ours = np.asarray(method.apply(params, ids, attention_mask=mask, output="hidden"))
    lora.save_peft_adapter(
        tmp_path / "adapter",
        loaded.family,
        loaded.arch,
        method.plan,
        params,
        base_model_name_or_path=str(tmp_path / "bert"),
        task_type="FEATURE_EXTRACTION",
    )
    written = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert written["target_modules"] == ["intermediate.dense", "key", "output.dense", "query", "value"]
    base = transformers.BertModel.from_pretrained(tmp_path / "bert").eval()
    peft_model = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    assert not any("pooler" in n and "lora" in n for n, _ in peft_model.named_parameters())
    with torch.no_grad():
        theirs = peft_model(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask)).last_hidden_state
    diff = np.abs(theirs.numpy() - ours)[mask.astype(bool)].max()
    assert diff < 1e-4, diff


def test_lm_head_target_on_a_tied_model_says_the_head_is_the_embedding_matrix(models):
    # GPT-2 ties its output layer to wte: there is no lm_head weight, and the refusal says why
    _, loaded = models["gpt2"]
    with pytest.raises(
        ValueError, match=r"'lm_head' matches no linear layer.*no lm_head of its own.*tie_word_embeddings"
    ):
        lora.plan_lora(loaded.family, loaded.arch, lora_config(targets=("lm_head",)))
    with pytest.raises(ValueError, match="matches no linear layer") as refused:
        lora.plan_lora(loaded.family, loaded.arch, lora_config(targets=("query",)))
    assert "tie_word_embeddings" not in str(refused.value)
