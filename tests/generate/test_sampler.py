"""The sampler's greedy decoding equals transformers' greedy `generate`, token for token, on tiny
random models of every decoder family, with prompts of mixed lengths in one batch."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from compile_counts import compiles_seen
from generate_testlib import ALL_CASES, hf_greedy, make_model, prompts, sampler_for, saved
from moe_testlib import MOE_CASES, make_moe_model

from ftc.backends.jax.generate.prompt_batch import PromptError
from ftc.backends.jax.generate.sampler import LENGTH, STOP, GenerateConfig, generate, stream
from ftc.backends.jax.generate.sampling import SamplingConfig
from ftc.backends.jax.train import mesh as mesh_lib

NEW = 12


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    cache = {}

    def get(case):
        if case not in cache:
            cache[case] = saved(case, tmp_path_factory.mktemp(case))
        return cache[case]

    return get


@pytest.mark.parametrize("case", ALL_CASES)
def test_greedy_tokens_equal_transformers_generate_on_a_mixed_length_batch(models, case):
    hf_model, loaded = models(case)
    batch = prompts((5, 11, 1, 17))  # 17 > mistral's and qwen2's window of 4: the window slides
    out = generate(sampler_for(loaded), loaded.params, batch, jax.random.key(0), GenerateConfig(max_new_tokens=NEW))
    assert [list(c.tokens) for c in out] == hf_greedy(hf_model, batch, NEW)
    assert all(c.finish == LENGTH for c in out)


def test_rows_stop_at_their_eos_like_transformers(models):
    hf_model, loaded = models("llama")
    batch = prompts((5, 11, 1, 17))
    sampler = sampler_for(loaded)
    free = generate(sampler, loaded.params, batch, jax.random.key(0), GenerateConfig(max_new_tokens=NEW))
    eos = free[1].tokens[3]  # a token row 1 emits mid-way: it must stop there
    out = generate(sampler, loaded.params, batch, jax.random.key(0), GenerateConfig(NEW, eos_ids=(eos, 255)))
    expected = hf_greedy(hf_model, batch, NEW, eos_token_id=[eos, 255])
    assert [list(c.tokens) for c in out] == expected
    assert out[1].tokens[-1] == eos and out[1].finish == STOP and len(out[1].tokens) <= 4
    assert [c.finish for c in out] == [STOP if c.tokens[-1] in (eos, 255) else LENGTH for c in out]


def test_a_prompt_generates_the_same_alone_as_in_any_batch(models):
    _, loaded = models("qwen2")
    sampler = sampler_for(loaded)
    batch = prompts((3, 30, 9, 2, 14))
    config = GenerateConfig(max_new_tokens=10)
    together = generate(sampler, loaded.params, batch, jax.random.key(0), config)
    for i, p in enumerate(batch):
        alone = generate(sampler, loaded.params, [p], jax.random.key(0), config)
        assert alone[0].tokens == together[i].tokens


def test_sampled_tokens_do_not_depend_on_how_the_decode_loop_is_cut(models):
    _, loaded = models("llama")
    sampler = sampler_for(loaded)
    config = GenerateConfig(max_new_tokens=20, sampling=SamplingConfig(temperature=1.0, top_k=50))
    whole = generate(sampler, loaded.params, prompts(), jax.random.key(7), config)
    snaps = list(stream(sampler, loaded.params, prompts(), jax.random.key(7), config, chunk=3))
    assert len(snaps) > 3
    assert [s.tokens for s in snaps] == sorted([s.tokens for s in snaps], key=lambda t: sum(map(len, t)))
    assert snaps[-1].tokens == tuple(c.tokens for c in whole)
    other = generate(sampler, loaded.params, prompts(), jax.random.key(8), config)
    assert [c.tokens for c in other] != [c.tokens for c in whole]


def test_stop_callback_ends_a_row_early_without_changing_the_others(models):
    _, loaded = models("llama")
    sampler = sampler_for(loaded)
    config = GenerateConfig(max_new_tokens=16)
    whole = generate(sampler, loaded.params, prompts(), jax.random.key(0), config)
    snaps = list(
        stream(
            sampler,
            loaded.params,
            prompts(),
            jax.random.key(0),
            config,
            chunk=2,
            stop=lambda s: [len(s.tokens[0]) >= 5, False, False, False],
        )
    )
    last = snaps[-1]
    assert last.finish[0] == "stop_string" and 5 <= len(last.tokens[0]) < 16
    assert last.tokens[0] == whole[0].tokens[: len(last.tokens[0])]
    assert last.tokens[1:] == tuple(c.tokens for c in whole[1:])


def test_generation_stops_at_the_models_context(models):
    _, loaded = models("gpt2")  # n_positions 128: the learned position table ends there
    sampler = sampler_for(loaded)
    out = generate(sampler, loaded.params, prompts((120, 3)), jax.random.key(0), GenerateConfig(max_new_tokens=20))
    assert len(out[0].tokens) == 8 and out[0].finish == LENGTH
    assert len(out[1].tokens) == 20
    with pytest.raises(PromptError, match="prompt 1 has 128 tokens; the model's context is 128"):
        generate(sampler, loaded.params, prompts((3, 128)), jax.random.key(0), GenerateConfig(max_new_tokens=2))
    with pytest.raises(PromptError, match="prompt 0 is empty"):
        generate(sampler, loaded.params, [[]], jax.random.key(0), GenerateConfig(max_new_tokens=2))


def test_prefill_logits_equal_the_training_forward_pass(models):
    """The cached path computes what the training path computes (here: the next-token logits)."""
    _, loaded = models("mistral")
    module = loaded.family.build(loaded.arch, jnp.float32)
    ids = np.asarray(prompts((9,)), np.int32)
    full = module.apply({"params": loaded.params}, jnp.asarray(ids))[:, -1]
    from ftc.backends.jax.models import kv_cache

    cache = kv_cache.init_cache(loaded.family.cache_layout(loaded.arch), jnp.ones((1, 16), bool), jnp.float32)
    positions = jnp.arange(9)[None]
    last, cache = module.apply(
        {"params": loaded.params}, jnp.asarray(ids), positions=positions, kv_cache=cache, output="last_logits"
    )
    np.testing.assert_allclose(np.asarray(last[:, 0]), np.asarray(full), atol=1e-5)
    assert int(cache["index"]) == 9


def test_greedy_and_sampled_generation_on_a_sharded_mesh_equal_one_device(models):
    _, loaded = models("qwen3")
    config = GenerateConfig(max_new_tokens=8)
    one = generate(sampler_for(loaded), loaded.params, prompts(), jax.random.key(0), config)
    mesh = mesh_lib.make_mesh(2, 2, 2)
    from ftc.backends.jax.models import shapes
    from ftc.compiler import sharding_rules

    infos = {i.path: i for i in shapes.param_infos(shapes.family_boxed_params(loaded.family, loaded.arch))}

    def place(path, x):
        partition, _ = sharding_rules.param_partition(infos[shapes.path_str(path)].axes, x.shape, dict(mesh.shape))
        return jax.device_put(x, mesh_lib.param_sharding(mesh, partition))

    params = jax.tree_util.tree_map_with_path(place, loaded.params)
    sharded = generate(sampler_for(loaded, mesh=mesh), params, prompts(), jax.random.key(0), config)
    assert [c.tokens for c in sharded] == [c.tokens for c in one]
    sampled = GenerateConfig(max_new_tokens=8, sampling=SamplingConfig(temperature=1.0, top_p=0.9))
    batch = prompts((5, 11, 1, 17, 2, 9, 4, 3))  # 8 rows: the batch splits over data x fsdp
    one = generate(sampler_for(loaded), loaded.params, batch, jax.random.key(5), sampled)
    sharded = generate(sampler_for(loaded, mesh=mesh), params, batch, jax.random.key(5), sampled)
    assert [c.tokens for c in sharded] == [c.tokens for c in one]


def test_compiles_once_per_batch_and_length_bucket_not_per_prompt(models):
    _, loaded = models("llama")
    sampler = sampler_for(loaded)
    sampled = GenerateConfig(12, SamplingConfig(temperature=1.0, top_p=0.9))
    generate(sampler, loaded.params, prompts((5, 11, 1)), jax.random.key(0), sampled)  # bucket (3, 16, 16)
    with compiles_seen() as compiled:
        # Other prompts, lengths, max_new_tokens, keys and chunking within the same bucket.
        for lengths, new, key in [((3, 14, 9), 12, 1), ((16, 2, 7), 5, 2), ((8, 8, 8), 16, 3)]:
            generate(
                sampler,
                loaded.params,
                prompts(lengths, seed=new),
                jax.random.key(key),
                dataclasses.replace(sampled, max_new_tokens=new),
            )
        list(stream(sampler, loaded.params, prompts((4, 4, 13)), jax.random.key(4), sampled, chunk=3))
    assert compiled == []
    prefill, decode = sampler.prefill_unrolled, sampler.decode_unrolled  # on CPU the unrolled ones
    before = (prefill._cache_size(), decode._cache_size())
    generate(sampler, loaded.params, prompts((20, 3, 1)), jax.random.key(0), sampled)  # prompt bucket 24
    generate(sampler, loaded.params, prompts((17, 22, 5)), jax.random.key(0), sampled)  # the same one
    assert (prefill._cache_size(), decode._cache_size()) == (before[0] + 1, before[1] + 1)


def test_raw_uint32_keys_are_the_same_keys_as_typed_ones():
    from ftc.backends.jax.generate.sampler import row_keys

    data = jax.random.key_data
    assert (data(row_keys(jax.random.PRNGKey(3), 3, 4)) == data(row_keys(jax.random.key(3), 3, 4))).all()
    per_row = jax.random.split(jax.random.key(1), 3)
    assert (data(row_keys(data(per_row), 3, 4)) == data(row_keys(per_row, 3, 4))).all()
    assert (data(row_keys(per_row, 3, 4))[:3] == data(per_row)).all()  # given keys are used as they are
    with pytest.raises(ValueError, match="2 keys for 3 prompts"):
        row_keys(per_row[:2], 3, 4)


@pytest.mark.parametrize("case", ["llama", "mistral"])  # mistral: a sliding window in the unrolled blocks
def test_cpu_decodes_on_unrolled_blocks_and_a_per_layer_cache_with_the_scanned_stacks_tokens(models, case):
    from ftc.backends.jax.generate.sampler import make_sampler

    hf_model, loaded = models(case)
    module = loaded.family.build(loaded.arch, jnp.float32)
    context = loaded.hf_config["max_position_embeddings"]
    unrolled = make_sampler(loaded.family, loaded.arch, module, context=context)  # CPU: unrolled by default
    scanned = make_sampler(loaded.family, loaded.arch, module, context=context, unroll_decode=False)
    assert scanned.decode_unrolled is None and unrolled.decode_unrolled is not None
    greedy, sampled = GenerateConfig(max_new_tokens=NEW), GenerateConfig(NEW, sampling=SamplingConfig(temperature=0.9))
    one, mixed = [prompts((17,))[0]], prompts((5, 17, 1))  # 17 > mistral's window of 4
    for batch in (one, mixed):
        out = generate(unrolled, loaded.params, batch, jax.random.key(3), greedy)
        assert [list(c.tokens) for c in out] == hf_greedy(hf_model, batch, NEW)
        for config in (greedy, sampled):
            want = generate(scanned, loaded.params, batch, jax.random.key(3), config)
            assert generate(unrolled, loaded.params, batch, jax.random.key(3), config) == want
            # Cut into decode calls of 5 steps, the per-layer cache is carried from call to call.
            *_, last = stream(unrolled, loaded.params, batch, jax.random.key(3), config, chunk=5)
            assert list(last.tokens) == [c.tokens for c in want]


def test_the_prefill_caches_the_prompts_slots_and_the_decode_gets_them_grown_per_layer_when_unrolled(models):
    from ftc.backends.jax.generate import per_layer

    _, loaded = models("llama")
    sampler = sampler_for(loaded)
    L = loaded.arch.num_layers
    split = per_layer.split(sampler, loaded.params)
    assert sorted(k for k in split if k.startswith("layers")) == sorted(f"layers_{i}" for i in range(L))
    args = (
        jnp.ones((2, 16), jnp.int32),
        jnp.asarray([16, 3]),
        jnp.asarray([4, 4]),
        jax.random.split(jax.random.key(0), 2),
    )
    kw = dict(new_tokens=16, config=GenerateConfig(max_new_tokens=16))
    state = sampler.prefill(loaded.params, *args, **kw)
    unrolled = sampler.prefill_unrolled(split, *args, **kw)
    assert state["cache"]["k"].shape[2] == 16  # the prefill wrote the prompts into their 16 slots only
    np.testing.assert_array_equal(unrolled["tokens"], state["tokens"])
    ready, ready_unrolled = sampler.ready(state), sampler.ready(unrolled)
    for name in ("k", "v"):
        assert ready["cache"][name].shape[2] == 32  # grown by the 16 new tokens' empty slots
        np.testing.assert_allclose(ready["cache"][name][:, :, :16], state["cache"][name], rtol=0, atol=0)
        assert not ready["cache"][name][:, :, 16:].any()
        assert isinstance(ready_unrolled["cache"][name], tuple) and len(ready_unrolled["cache"][name]) == L
        for i, layer in enumerate(ready_unrolled["cache"][name]):
            np.testing.assert_allclose(layer, ready["cache"][name][i], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(ready["cache"]["valid"], state["valid"])
    assert "valid" not in ready and "valid" not in ready_unrolled
    with pytest.raises(ValueError, match="needs Decoder\\(unrolled=True\\)"):
        sampler.module.apply({"params": loaded.params}, jnp.ones((2, 1), jnp.int32), kv_cache=ready_unrolled["cache"])


def test_the_per_layer_weights_are_kept_for_the_same_params_while_they_live_where_asked_to(models):
    import gc

    from ftc.backends.jax.generate import per_layer

    _, loaded = models("llama")
    sampler = dataclasses.replace(sampler_for(loaded), keep_split=True)  # as source.sampler() makes it
    assert not sampler_for(loaded).keep_split  # make_sampler's default: a training run's params change
    first = per_layer.split(sampler, loaded.params)
    assert per_layer.split(sampler, loaded.params) is first  # the same arrays: the same copy
    other = jax.tree.map(lambda x: x + 0, loaded.params)
    second = per_layer.split(sampler, other)
    assert second is not first and per_layer.split(sampler, other) is second
    del other
    gc.collect()
    assert sampler.kept == {}  # its params gone, the copy goes too
    unkept = dataclasses.replace(sampler, keep_split=False, kept={})
    assert per_layer.split(unkept, loaded.params) is not per_layer.split(unkept, loaded.params)
    assert unkept.kept == {}


def test_decoding_stays_on_the_scanned_stack_where_a_second_weights_and_cache_copy_would_take_over_a_quarter_of_memory(
    models, monkeypatch
):
    from ftc.backends.jax.generate import per_layer

    _, loaded = models("llama")
    L, K, H = loaded.arch.num_layers, loaded.arch.num_kv_heads, loaded.arch.head_dim
    cache_bytes = 2 * L * 1 * (16 + 16) * K * H * 4  # k and v: one row, 16 prompt + 16 new slots, float32
    nbytes = sum(x.nbytes for x in jax.tree.leaves(loaded.params)) + cache_bytes
    host = {"SC_PAGE_SIZE": 1, "SC_PHYS_PAGES": 4 * nbytes}
    monkeypatch.setattr(per_layer.os, "sysconf", host.__getitem__)
    split = []
    sampler = sampler_for(loaded)
    counting = dataclasses.replace(sampler, split_params=lambda p: split.append(1) or sampler.split_params(p))
    for phys, copies in ((4 * nbytes, 1), (4 * nbytes - 1, 0)):
        host["SC_PHYS_PAGES"] = phys
        split.clear()
        generate(counting, loaded.params, prompts((5,)), jax.random.key(0), GenerateConfig(max_new_tokens=4))
        assert len(split) == copies


LONG_CASES = [
    *(c if c in ("llama", "mistral") else pytest.param(c, marks=pytest.mark.slow) for c in ALL_CASES),
    *(pytest.param(c, marks=pytest.mark.slow) for c in MOE_CASES),
]


@pytest.mark.parametrize("case", LONG_CASES)
def test_a_long_generation_attending_block_by_block_keeps_transformers_greedy_tokens(case, tmp_path):
    from ftc.backends.jax.io import hf_checkpoint

    # Room for 24 + 384 slots: the blocked attention.
    keys = dict(max_position_embeddings=512)
    model = make_moe_model(case, seed=1, **keys) if case in MOE_CASES else make_model(case, **keys)
    model.save_pretrained(tmp_path)
    loaded = hf_checkpoint.load_model(tmp_path)
    batch, new = prompts((5, 17, 1)), 380  # slots up to 24 + 379: the last, clamped block is read
    out = generate(sampler_for(loaded), loaded.params, batch, jax.random.key(0), GenerateConfig(max_new_tokens=new))
    assert [len(c.tokens) for c in out] == [new] * 3  # no early stop: every block is attended
    assert [list(c.tokens) for c in out] == hf_greedy(model, batch, new)
