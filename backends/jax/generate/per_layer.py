"""The unrolled prefill and decode's per-layer weights (generate/sampler.py, `make_sampler`'s
`unroll_decode`): whether a second copy of the weights and the cache fits, and the copy itself,
kept across calls with the same params."""

from __future__ import annotations

import math
import os
import weakref

import jax

from ftc.backends.jax.generate.prompt_batch import PromptBatch
from ftc.backends.jax.models import kv_cache


def copy_fits(sampler, params, batch: PromptBatch) -> bool:
    """Whether a second copy of the weights and the cache (the per-layer ones) takes at most a
    quarter of the host's memory: a model or batch that big keeps decoding on the scanned stack."""
    try:
        host_bytes = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return False
    B, P = batch.ids.shape
    cache_bytes = 2 * math.prod(kv_cache.cache_shape(sampler.layout, B, P + batch.new_tokens)) * sampler.dtype.itemsize
    return (sum(x.nbytes for x in jax.tree.leaves(params)) + cache_bytes) * 4 <= host_bytes


def split(sampler, params):
    """Per-layer copies of `params`' block weights (llama.per_layer_params), the ones made for the
    previous call when it had the same params (the same arrays, still alive) and `keep_split`."""
    leaves = jax.tree.leaves(params)
    refs = sampler.kept.get("refs")
    if refs is not None and len(refs) == len(leaves) and all(r() is x for r, x in zip(refs, leaves)):
        return sampler.kept["split"]
    sampler.kept.clear()  # the old copy goes before the new one is made
    split = sampler.split_params(params)
    if sampler.keep_split:
        try:
            refs = [weakref.ref(x, lambda _, kept=sampler.kept: kept.clear()) for x in leaves]
        except TypeError:  # leaves that take no weak reference: nothing kept
            return split
        sampler.kept.update(refs=refs, split=split)
    return split
