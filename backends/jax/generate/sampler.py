"""The sampler: prefill a batch of prompts, then decode one token per step with a key/value cache.

    sampler = make_sampler(model.family, model.arch, model.eval_module, context=2048)
    out = generate(sampler, params, [[1, 15, 27], [1, 99]], jax.random.key(0),
                   GenerateConfig(max_new_tokens=32, eos_ids=(2,)))
    out[0].tokens, out[0].finish            # (..., 2), "stop"

What comes out is a pure function of (params, prompts, key, config): the same call gives the same
tokens, however the decode loop is cut into chunks (`stream`) and whatever rows share the batch.
Row i draws step t's token with fold_in(key_i, t), key_i = fold_in(key, i) or the i-th of the
per-prompt keys given; greedy decoding uses no key. `params` are the module's parameters as they
are (a LoRA, QLoRA or adapter model's included: no merge), sharded however the caller holds them.

How it runs (all jitted, compiled once per bucket):
  - prompts are left-padded to a bucket length P (2^k or 1.5 x 2^k, >= 16) and the batch to a
    power of two B (extra rows generate nothing); a row's positions count its real tokens only and its
    padding slots are masked, so a row computes what it would compute alone;
  - the cache (models/kv_cache.py) holds P + N slots, N the bucketed max_new_tokens;
  - `_prefill` runs the prompts on a cache of their P slots and draws the first token (on CPU on
    the blocks unrolled, over per-layer weights and a per-layer cache); `_ready` grows the cache to
    P + N; `_decode` is one `jax.lax.while_loop`
    that feeds each row its last token until every row is done or a step limit is reached.
A row is done at an EOS id, after max_new_tokens, at the model's context length, or when the
host says so (`stream`'s `stop`, which stop strings use). Compiled shapes: (B, P, N) and the
static config; changing max_new_tokens within one bucket of N does not recompile.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ftc.backends.jax.generate import per_layer
from ftc.backends.jax.generate.prompt_batch import lay_out
from ftc.backends.jax.generate.sampling import GREEDY, SamplingConfig, next_tokens
from ftc.backends.jax.models import kv_cache, llama
from ftc.compiler import sharding_rules

STOP, STOP_STRING, LENGTH = "stop", "stop_string", "length"  # why a row ended (Completion.finish)


@dataclasses.dataclass(frozen=True)
class GenerateConfig:
    """What to generate. Hashable: part of the compiled function's key (max_new_tokens only
    through its bucket)."""

    max_new_tokens: int = 256
    sampling: SamplingConfig = GREEDY
    eos_ids: tuple[int, ...] = ()  # a row stops after emitting one of these (it is kept in the output)
    pad_id: int = 0  # what finished rows and padding hold

    def __post_init__(self):
        if not (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1):
            raise ValueError(f"max_new_tokens={self.max_new_tokens!r}: expected an integer >= 1")


@dataclasses.dataclass(frozen=True)
class Completion:
    tokens: tuple[int, ...]  # the generated tokens (an EOS that ended the row included)
    finish: str  # STOP (an EOS id), STOP_STRING (stopped by the host) or LENGTH


@dataclasses.dataclass(frozen=True)
class Sampler:
    """A family's module made ready to decode; build with `make_sampler`."""

    module: Any  # flax module taking kv_cache= (family.py): the family's, or a method's around it
    layout: kv_cache.CacheLayout
    dtype: Any  # the cache's dtype: the module's compute dtype
    context: int  # positions the model has: a prompt plus what it generates stays below this
    mesh: Mesh | None  # where the cache is sharded (batch over data x fsdp, kv heads over tensor)
    prefill: Callable
    ready: Callable  # the prefill's state -> the state `decode` takes (its cache grown to every slot)
    decode: Callable
    # The prefill and decode on the blocks unrolled, and params -> the per-layer weights they take
    # (None: `prefill` and `decode` always). See `make_sampler`.
    prefill_unrolled: Callable | None = None
    decode_unrolled: Callable | None = None
    split_params: Callable | None = None
    # The last params' per-layer weights, kept for the next call with the same params (`keep_split`).
    kept: dict = dataclasses.field(default_factory=dict, compare=False, hash=False, repr=False)
    keep_split: bool = False


def make_sampler(
    family,
    arch,
    module,
    *,
    context: int,
    mesh: Mesh | None = None,
    unroll_decode: bool | None = None,
    keep_split: bool = False,
) -> Sampler:
    """A Sampler for `module` (the family's module for `arch`, possibly inside a method's
    wrapper: pass a MethodModel's `eval_module`). `context`: the model's positions
    (config.json's max_position_embeddings / n_positions).

    `unroll_decode` (default: on CPU, for a Llama-style decoder without a method's wrapper): the
    prefill and decode run the blocks unrolled, on per-layer copies of their weights and a
    per-layer cache (kv_cache.per_layer). The copy is made once per `stream` / `generate` call;
    `keep_split` keeps it for the next call with the same params while they live (for `ftc
    generate`, `chat` and `eval`, whose params never change; not in a training run, where a kept
    copy would sit beside the next train step). A scanned
    stack makes XLA:CPU copy each layer's weights, and each layer's cache slots, out of the stacked
    arrays and back for every token; unrolled, each token reads the weights once and writes only
    its own keys and values. SmolLM2-135M, 512 new tokens: 1.35x the scanned decode's tokens/s at
    batch 1, 1.8x at batch 8 (README.md, "Benchmarks", generation). It costs a longer compile (5-8 s against 1-2 s,
    once per machine with the persistent cache) and a second copy of the weights and the cache
    while it generates, so it is taken only where that copy is at most a quarter of the host's
    memory. Unrolled, the prefill reads each weight once too (SmolLM2-135M, one 38-token prompt:
    0.14 -> 0.115 s)."""
    if family.cache_layout is None:
        raise ValueError(f"model family {family.name} does not generate text (it is not a causal LM)")
    layout = family.cache_layout(arch)
    dtype = getattr(module, "dtype", None) or getattr(getattr(module, "base", None), "dtype", jnp.float32)

    def prefill_for(module):
        return jax.jit(
            functools.partial(_prefill, module, layout, jnp.dtype(dtype), mesh),
            static_argnames=("new_tokens", "config"),
        )

    def decode_for(module):
        return jax.jit(functools.partial(_decode, module, mesh), static_argnames=("config",), donate_argnums=(1,))

    if unroll_decode is None:
        unroll_decode = jax.default_backend() == "cpu" and isinstance(module, llama.Decoder)
    unrolled = {}
    if unroll_decode:
        one_by_one = module.clone(unrolled=True)
        unrolled = dict(
            prefill_unrolled=prefill_for(one_by_one),
            decode_unrolled=decode_for(one_by_one),
            split_params=jax.jit(functools.partial(llama.per_layer_params, num_layers=arch.num_layers)),
        )
    ready = jax.jit(functools.partial(_ready, mesh))
    return Sampler(
        module,
        layout,
        jnp.dtype(dtype),
        int(context),
        mesh,
        prefill_for(module),
        ready,
        decode_for(module),
        **unrolled,
        keep_split=keep_split,
    )


# ---------------------------------------------------------------- the jitted parts


def _constrain(mesh: Mesh | None, cache: dict) -> dict:
    """Shard the cache like the activations: batch over (data, fsdp), kv heads over tensor, where
    the sizes divide (else replicated along that axis)."""
    if mesh is None:
        return cache
    B, _, K, _ = jax.tree.leaves(cache["k"])[0].shape[-4:]
    sizes = dict(mesh.shape)
    batch = sharding_rules.BATCH_AXES if B % sharding_rules.batch_shards(sizes) == 0 else None
    heads = "tensor" if K % sizes.get("tensor", 1) == 0 else None
    layer = () if kv_cache.is_per_layer(cache) else (None,)
    sharding = NamedSharding(mesh, P(*layer, batch, None, heads, None))
    kv = {k: jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, sharding), cache[k]) for k in ("k", "v")}
    return {**cache, **kv}


def _ready(mesh, state):
    """The prefill's state made ready to decode: its cache grown from the prompts' slots to
    theirs and the new tokens' (kv_cache.extended). Not in the prefill, so the first token does
    not wait for the larger cache to be allocated."""
    state = dict(state)
    valid_BS = state.pop("valid")
    return {**state, "cache": _constrain(mesh, kv_cache.extended(state["cache"], valid_BS))}


def _prefill(module, layout, dtype, mesh, params, prompt_BP, lengths_B, limits_B, keys_B, *, new_tokens, config):
    """Run the left-padded prompts, draw each row's first token; the decode state."""
    B, P = prompt_BP.shape
    pad_B = P - lengths_B
    valid_BS = jnp.arange(P + new_tokens, dtype=jnp.int32)[None, :] >= pad_B[:, None]
    positions_BP = jnp.maximum(jnp.arange(P, dtype=jnp.int32)[None, :] - pad_B[:, None], 0)
    cache = kv_cache.init_cache(layout, valid_BS[:, :P], dtype)
    if getattr(module, "unrolled", False):
        cache = kv_cache.per_layer(cache)
    cache = _constrain(mesh, cache)
    logits_B1V, cache = module.apply(
        {"params": params}, prompt_BP, positions=positions_BP, kv_cache=cache, output="last_logits"
    )
    step_keys_B = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys_B, 0)
    first_B = next_tokens(step_keys_B, logits_B1V[:, 0], config.sampling)
    active_B = limits_B > 0
    first_B = jnp.where(active_B, first_B, config.pad_id)
    count_B = active_B.astype(jnp.int32)
    tokens_BN = jnp.full((B, new_tokens), config.pad_id, jnp.int32).at[:, 0].set(first_B)
    return {
        "cache": _constrain(mesh, cache),  # the prompts' slots; `_ready` adds the new tokens'
        "valid": valid_BS,
        "tokens": tokens_BN,
        "count": count_B,
        "done": ~active_B | _is_eos(first_B, config.eos_ids) | (count_B >= limits_B),
        "eos": active_B & _is_eos(first_B, config.eos_ids),
        "last": first_B,
        "position": lengths_B,
        "limit": limits_B,
        "keys": keys_B,
        "step": jnp.ones((), jnp.int32),
    }


def _is_eos(tokens_B: jax.Array, eos_ids: tuple[int, ...]) -> jax.Array:
    if not eos_ids:
        return jnp.zeros(tokens_B.shape, bool)
    return jnp.isin(tokens_B, jnp.asarray(eos_ids, jnp.int32))


def _decode(module, mesh, params, state, stop_at, *, config):
    """Decode until every row is done or `step` reaches `stop_at` (<= the token buffer's length)."""

    def cond(s):
        return (s["step"] < stop_at) & ~jnp.all(s["done"])

    def body(s):
        logits_B1V, cache = module.apply(
            {"params": params},
            s["last"][:, None],
            positions=s["position"][:, None],
            kv_cache=s["cache"],
            output="last_logits",
        )
        step_keys_B = jax.vmap(jax.random.fold_in, in_axes=(0, None))(s["keys"], s["step"])
        active_B = ~s["done"]
        token_B = jnp.where(active_B, next_tokens(step_keys_B, logits_B1V[:, 0], config.sampling), config.pad_id)
        count_B = s["count"] + active_B.astype(jnp.int32)
        eos_B = active_B & _is_eos(token_B, config.eos_ids)
        return {
            **s,
            "cache": _constrain(mesh, cache),
            "tokens": jax.lax.dynamic_update_slice(s["tokens"], token_B[:, None], (0, s["step"])),
            "count": count_B,
            "done": s["done"] | eos_B | (count_B >= s["limit"]),
            "eos": s["eos"] | eos_B,
            "last": token_B,
            "position": s["position"] + 1,
            "step": s["step"] + 1,
        }

    return jax.lax.while_loop(cond, body, state)


# ---------------------------------------------------------------- host side


def row_keys(key: jax.Array, rows: int, batch: int) -> jax.Array:
    """One key per row: fold_in(key, i) for a single key, or the given [rows] keys; padding rows
    get keys of their own (they generate nothing)."""
    key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)  # a raw uint32 key (jax.random.PRNGKey), or [rows] of them
    if key.ndim == 1:
        if key.shape[0] != rows:
            raise ValueError(f"{key.shape[0]} keys for {rows} prompts")
        extra = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key[0], jnp.arange(rows, batch) + 2**30)
        return jnp.concatenate([key, extra]) if batch > rows else key
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, jnp.arange(batch))


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """Where a generation stands (host values, one entry per prompt)."""

    tokens: tuple[tuple[int, ...], ...]  # generated so far
    done: tuple[bool, ...]
    finish: tuple[str | None, ...]  # None while the row runs


def stream(
    sampler: Sampler,
    params,
    prompts: Sequence[Sequence[int]],
    key: jax.Array,
    config: GenerateConfig,
    *,
    chunk: int | None = None,
    stop: Callable[[Snapshot], Sequence[bool]] | None = None,
) -> Iterator[Snapshot]:
    """Generate, yielding a Snapshot after the first token and after every `chunk` decode steps
    (default: one snapshot at the end). `stop(snapshot)` may end rows early (a row it marks is
    finished with STOP_STRING, also when it ran to its length): the tokens drawn are the same as
    without chunks, only cut."""
    batch = lay_out(prompts, config.max_new_tokens, sampler.context, config.pad_id)
    keys = row_keys(key, batch.rows, len(batch.ids))
    # The jitted functions read max_new_tokens only through the rows' limits: key them on its
    # bucket, so another max_new_tokens in the same bucket reuses the compiled code.
    config = dataclasses.replace(config, max_new_tokens=batch.new_tokens)
    unrolled = sampler.decode_unrolled is not None and per_layer.copy_fits(sampler, params, batch)
    prefill, decode = (
        (sampler.prefill_unrolled, sampler.decode_unrolled) if unrolled else (sampler.prefill, sampler.decode)
    )
    params = per_layer.split(sampler, params) if unrolled else params
    state = prefill(
        params,
        _put(sampler, batch.ids),
        _put(sampler, batch.lengths),
        _put(sampler, batch.limits),
        keys,
        new_tokens=batch.new_tokens,
        config=config,
    )
    stopped = np.zeros(len(batch.ids), bool)
    grown = False
    while True:
        snap = _snapshot(state, batch.rows, stopped)
        if stop is not None:  # rows still running, or ended by length, may have reached a stop
            open_rows = np.asarray([f in (None, LENGTH) for f in snap.finish])
            marked = np.asarray(stop(snap), bool) & open_rows & ~stopped[: batch.rows]
            if marked.any():
                stopped[: batch.rows] |= marked
                state = {**state, "done": state["done"] | jnp.asarray(stopped)}
                snap = _snapshot(state, batch.rows, stopped)
        yield snap
        if all(snap.done):
            return
        step = int(state["step"])
        stop_at = batch.new_tokens if chunk is None else min(batch.new_tokens, step + chunk)
        if not grown:  # once per call, and only when it decodes at all
            state, grown = sampler.ready(state), True
        state = decode(params, state, jnp.int32(stop_at), config=config)


def _put(sampler: Sampler, host: np.ndarray) -> jax.Array:
    """A host batch array, split over the mesh's batch axes where its rows divide."""
    if sampler.mesh is None:
        return jnp.asarray(host)
    sizes = dict(sampler.mesh.shape)
    axes = sharding_rules.BATCH_AXES if host.shape[0] % sharding_rules.batch_shards(sizes) == 0 else None
    return jax.device_put(host, NamedSharding(sampler.mesh, P(axes)))


def _to_host(x: jax.Array) -> np.ndarray:
    """A device array on this host, gathered from every process when it spans several."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _snapshot(state: dict, rows: int, stopped: np.ndarray) -> Snapshot:
    host = {k: _to_host(state[k]) for k in ("tokens", "count", "done", "eos")}
    tokens, finish = [], []
    for b in range(rows):
        tokens.append(tuple(int(t) for t in host["tokens"][b, : host["count"][b]]))
        if not host["done"][b]:
            finish.append(None)
        elif host["eos"][b]:
            finish.append(STOP)
        elif stopped[b]:
            finish.append(STOP_STRING)
        else:
            finish.append(LENGTH)
    return Snapshot(tuple(tokens), tuple(bool(d) for d in host["done"][:rows]), tuple(finish))


def generate(
    sampler: Sampler, params, prompts: Sequence[Sequence[int]], key: jax.Array, config: GenerateConfig
) -> list[Completion]:
    """One Completion per prompt (see the module docstring)."""
    *_, last = stream(sampler, params, prompts, key, config)
    return [Completion(t, f) for t, f in zip(last.tokens, last.finish)]
