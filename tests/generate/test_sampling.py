"""Sampling is tested statistically and against transformers' logits warpers: temperature 1 draws
the first token with the softmax probabilities (a chi-square goodness-of-fit test with a fixed
seed, which rejects temperature 0.5); with temperature, top-k, top-p and min-p the draws fit the
softmax renormalised over the kept set and reject the unfiltered, uniform-over-the-set and
temperature-ignored distributions; top-k / top-p / min-p keep exactly the set transformers'
warpers keep and never emit a token outside it."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from generate_testlib import prompts, sampler_for, saved
from scipy import stats
from transformers.generation import logits_process as hf

from ftc.backends.jax.generate.sampler import GenerateConfig, generate
from ftc.backends.jax.generate.sampling import SamplingConfig, filtered_logits, next_tokens


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return saved("llama", tmp_path_factory.mktemp("llama"))[1]


def _next_token_logits(loaded, rows) -> np.ndarray:
    """Full (training-path) forward over the right-padded rows: each row's next-token logits."""
    module = loaded.family.build(loaded.arch, jnp.float32)
    T = max(map(len, rows))
    ids = np.zeros((len(rows), T), np.int32)
    mask = np.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = r, 1
    logits = np.asarray(module.apply({"params": loaded.params}, jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    return logits[np.arange(len(rows)), mask.sum(1) - 1].astype(np.float64)


def _chi_square_p(counts: np.ndarray, probs: np.ndarray) -> float:
    """p-value of observed counts against probabilities, the thin tail pooled into one bin; 0 when
    a token the distribution cannot give was drawn."""
    support = probs > 0
    if counts[~support].sum() > 0:
        return 0.0
    counts, expected = counts[support], probs[support] / probs[support].sum() * counts.sum()
    order = np.argsort(expected)
    small = order[np.cumsum(expected[order]) < 5 * 8]
    big = np.setdiff1d(np.arange(len(expected)), small)
    obs, exp = counts[big], expected[big]
    if len(small):
        obs, exp = np.append(obs, counts[small].sum()), np.append(exp, expected[small].sum())
    return float(stats.chisquare(obs, exp * obs.sum() / exp.sum()).pvalue)


def test_first_token_frequencies_match_the_softmax_at_temperature_one(llama):
    prompt = prompts((6,), seed=3)
    logits = _next_token_logits(llama, prompt)[0]
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    assert probs.max() < 0.5  # a spread distribution, so the test has power
    n = 4096
    out = generate(
        sampler_for(llama),
        llama.params,
        prompt * n,
        jax.random.key(1234),
        GenerateConfig(max_new_tokens=1, sampling=SamplingConfig(temperature=1.0)),
    )
    counts = np.bincount([c.tokens[0] for c in out], minlength=len(probs)).astype(np.float64)
    assert _chi_square_p(counts, probs) > 1e-3
    # The same test rejects draws at another temperature: it can fail.
    cooler = generate(
        sampler_for(llama),
        llama.params,
        prompt * n,
        jax.random.key(1234),
        GenerateConfig(max_new_tokens=1, sampling=SamplingConfig(temperature=0.5)),
    )
    cooler_counts = np.bincount([c.tokens[0] for c in cooler], minlength=len(probs)).astype(np.float64)
    assert _chi_square_p(cooler_counts, probs) < 1e-6


FIT_CONFIGS = [
    SamplingConfig(temperature=0.3, top_k=20),
    SamplingConfig(temperature=0.3, top_p=0.5),
    SamplingConfig(temperature=0.25, min_p=0.3),
    SamplingConfig(temperature=0.5, top_k=40, top_p=0.7, min_p=0.2),
]


@pytest.mark.parametrize("config", FIT_CONFIGS, ids=lambda c: f"t{c.temperature}-k{c.top_k}-p{c.top_p}-min{c.min_p}")
def test_filtered_first_token_frequencies_match_the_renormalised_kept_distribution(llama, config):
    """Draws fit softmax(logits / temperature) renormalised over the set transformers' warpers
    keep, and reject what a wrong sampler would draw from: the unfiltered distribution, the kept
    set without its probabilities (uniform), the temperature ignored."""
    prompt = prompts((6,), seed=3)
    logits = _next_token_logits(llama, prompt)[0]

    def exact(c: SamplingConfig) -> np.ndarray:
        x = logits / c.temperature
        probs = np.where(_hf_kept(logits[None].astype(np.float32), c)[0], np.exp(x - x.max()), 0.0)
        return probs / probs.sum()

    n = 4096
    out = generate(sampler_for(llama), llama.params, prompt * n, jax.random.key(99), GenerateConfig(1, sampling=config))
    counts = np.bincount([c.tokens[0] for c in out], minlength=len(logits)).astype(np.float64)
    probs = exact(config)
    assert 10 <= (probs > 0).sum() < 64  # a filter that bites, over enough tokens to test a shape
    assert _chi_square_p(counts, probs) > 1e-3
    unfiltered = exact(dataclasses.replace(config, top_k=0, top_p=1.0, min_p=0.0))
    uniform = (probs > 0) / (probs > 0).sum()
    no_temperature = exact(dataclasses.replace(config, temperature=1.0))
    for wrong in (unfiltered, uniform, no_temperature):
        assert _chi_square_p(counts, wrong) < 1e-6


def _hf_kept(logits: np.ndarray, config: SamplingConfig) -> np.ndarray:
    """The tokens transformers' warpers keep (finite scores), in its order."""
    scores = torch.tensor(logits, dtype=torch.float32)
    warpers = []
    if config.temperature != 1.0:
        warpers.append(hf.TemperatureLogitsWarper(config.temperature))
    if config.top_k:
        warpers.append(hf.TopKLogitsWarper(config.top_k))
    if config.top_p < 1.0:
        warpers.append(hf.TopPLogitsWarper(config.top_p))
    if config.min_p:
        warpers.append(hf.MinPLogitsWarper(config.min_p))
    for w in warpers:
        scores = w(None, scores)
    return torch.isfinite(scores).numpy()


CONFIGS = [
    SamplingConfig(temperature=1.0, top_k=5),
    SamplingConfig(temperature=0.7, top_p=0.6),
    SamplingConfig(temperature=1.3, min_p=0.1),
    SamplingConfig(temperature=0.9, top_k=20, top_p=0.8, min_p=0.05),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"k{c.top_k}-p{c.top_p}-min{c.min_p}")
def test_filters_keep_exactly_the_tokens_transformers_keeps(config):
    logits = np.random.default_rng(0).normal(0, 3, (64, 300)).astype(np.float32)
    ours = np.isfinite(np.asarray(filtered_logits(jnp.asarray(logits), config)))
    np.testing.assert_array_equal(ours, _hf_kept(logits, config))


@pytest.mark.parametrize("config", CONFIGS[::3], ids=lambda c: f"k{c.top_k}-p{c.top_p}-min{c.min_p}")
def test_sampled_tokens_never_leave_the_kept_set(llama, config):
    batch = prompts((4, 9, 2, 7), seed=5) * 16
    out = generate(sampler_for(llama), llama.params, batch, jax.random.key(3), GenerateConfig(4, sampling=config))
    prefixes, chosen = [], []
    for p, c in zip(batch, out):
        for t in range(len(c.tokens)):
            prefixes.append(p + list(c.tokens[:t]))
            chosen.append(c.tokens[t])
    logits = _next_token_logits(llama, prefixes).astype(np.float32)
    kept = _hf_kept(logits, config)
    assert kept[np.arange(len(chosen)), chosen].all()
    assert len(set(chosen)) > 4  # it did sample


def test_greedy_picks_the_first_of_tied_maxima_and_ignores_the_key():
    logits = jnp.asarray([[0.0, 2.0, 2.0, 1.0], [5.0, -1.0, 5.0, 5.0]])
    keys = jax.random.split(jax.random.key(0), 2)
    assert next_tokens(keys, logits, SamplingConfig()).tolist() == [1, 0]


@pytest.mark.parametrize(
    "keys, message",
    [
        (dict(temperature=-1.0), "temperature=-1.0: expected >= 0"),
        (dict(top_k=-2), "top_k=-2: expected an integer >= 0"),
        (dict(top_p=0.0), "top_p=0.0: expected 0 < top_p <= 1"),
        (dict(min_p=1.5), "min_p=1.5: expected 0 <= min_p <= 1"),
    ],
)
def test_bad_sampling_settings_are_refused_with_the_setting_named(keys, message):
    with pytest.raises(ValueError, match=message):
        SamplingConfig(**keys)
