"""Shared pieces for the training-program tests: a tiny Llama (ftc's llama family), random packed
batches in the data pipeline's layout, a program (plan -> mesh -> optimizer -> jitted steps) on
any sub-mesh of the 8 fake CPU devices, and a tiny HF model directory + chat data for run tests."""

from __future__ import annotations

import dataclasses
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ftc.backends.jax.models import family_for, shapes
from ftc.backends.jax.train import mesh as mesh_lib
from ftc.backends.jax.train import optimizer as opt_lib
from ftc.backends.jax.train import step as ts
from ftc.compiler import plan as plan_lib
from ftc.spec import spec_from_dict

TINY = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=320,
    intermediate_size=64,
    max_position_embeddings=64,
    rms_norm_eps=1e-6,
)
SEQ = 16


def tiny_llama_config() -> dict:
    import transformers as tf

    return tf.LlamaConfig(**TINY).to_dict()


def spec(overrides: dict | None = None, *, base: str = "/nonexistent/model", train: str = "/nonexistent/train.jsonl"):
    """A Spec from a small default dict merged with nested `overrides`."""
    data = {
        "ftc": 1,
        "name": "t",
        "model": {"base": base, "max_seq_len": SEQ, "dtype": "float32"},
        "data": {"format": "chat", "train": train},
        "training": {
            "steps": 3,
            "batch_size": 8,
            "micro_batch_size": 8,
            "learning_rate": 1e-2,
            "schedule": {"kind": "constant"},
        },
        "mesh": {"data": 1, "fsdp": -1, "tensor": 1},
    }

    def merge(a, b):  # dicts merge, None removes a key, other values replace
        for k, v in b.items():
            if v is None:
                a.pop(k, None)
            else:
                a[k] = merge(dict(a.get(k) or {}), v) if isinstance(v, dict) else v
        return a

    return spec_from_dict(merge(data, overrides or {}))


@dataclasses.dataclass
class Program:
    plan: plan_lib.Plan
    mesh: object
    module: nn.Module
    mask: object
    tx: object
    steps: ts.Steps
    state: dict


def program(
    spec_, hf_config: dict, n_devices: int, params=None, trainable=None, seed: int = 0, objective=None
) -> Program:
    """Everything `run` builds between the plan and the loop, on the first `n_devices` devices;
    `objective`: what the steps compute (default: sft's causal-LM loss)."""
    family = family_for(hf_config)
    arch = dataclasses.replace(family.config_from_hf(hf_config), remat=spec_.training.remat)
    module = family.build(arch, jnp.dtype(spec_.model.dtype))
    boxed = shapes.abstract_boxed_params(module)
    infos = shapes.param_infos(boxed)
    plan = plan_lib.compile_plan(
        spec_, hf_config, n_devices, family=family.name, param_infos=infos, trainable=trainable
    )
    mesh = mesh_lib.mesh_for_plan(plan, jax.devices()[:n_devices])
    if params is None:
        params = nn.unbox(module.init(jax.random.key(seed), jnp.zeros((1, SEQ), jnp.int32))["params"])
    mask = opt_lib.trainable_mask(params, trainable)
    schedule = opt_lib.make_schedule(plan.schedule, plan.steps.total_steps)
    tx = opt_lib.make_optimizer(plan.optimizer, schedule, {i.path: i.axes for i in infos})
    abstract = ts.abstract_state(jax.eval_shape(lambda: params), tx, mask)
    state_sh = ts.state_shardings(mesh, abstract, plan.partitions())
    steps = ts.build_steps(
        module,
        tx,
        schedule,
        mask,
        mesh,
        state_sh,
        accum_steps=plan.batch.accum_steps,
        **({} if objective is None else {"objective": objective}),
    )
    state = jax.device_put(ts.init_state(params, tx, mask, spec_.training.seed), state_sh)
    return Program(plan, mesh, module, mask, tx, steps, state)


def random_batch(rng: np.random.Generator, batch: int, seq: int = SEQ, vocab: int = TINY["vocab_size"]) -> dict:
    """A packed causal-LM batch in data_pack's layout: two segments per row, padding at the end of
    some rows (of different lengths, so rows carry different loss weights), weight 0 on padding
    and on a 3-token "prompt", and a fractional weight on some tokens."""
    ids = rng.integers(1, vocab, size=(batch, seq + 1)).astype(np.int32)
    split = seq // 2
    segment_ids = np.where(np.arange(seq) < split, 1, 2)[None].repeat(batch, 0).astype(np.int32)
    positions = np.concatenate([np.arange(split), np.arange(seq - split)])[None].repeat(batch, 0).astype(np.int32)
    weights = np.ones((batch, seq), np.float32)
    weights[:, :3] = 0.0
    weights[:, split + 2] = 0.5
    for b in range(batch):
        n_pad = int(rng.integers(0, seq // 3 + 1))
        if n_pad:
            segment_ids[b, seq - n_pad :] = 0
            weights[b, seq - n_pad :] = 0.0
            positions[b, seq - n_pad :] = 0
            ids[b, seq - n_pad :] = 0
    return {
        "input_ids": ids[:, :-1],
        "targets": ids[:, 1:] * (segment_ids > 0),
        "weights": weights,
        "segment_ids": segment_ids,
        "positions": positions,
    }


def flat(tree) -> dict[str, np.ndarray]:
    return {shapes.path_str(p): np.asarray(jax.device_get(x)) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


# ------------------------------------------------------------------ on-disk model and data


def make_model_dir(path) -> str:
    """A tiny random Llama saved by transformers (safetensors) with a byte-level BPE tokenizer."""
    import torch
    import transformers as tf
    from data_testlib import make_tokenizer

    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(**TINY)).eval()
    model.save_pretrained(path, safe_serialization=True)
    make_tokenizer().save_pretrained(path)
    return os.fspath(path)


def write_chat_data(path, n: int, seed: int = 0) -> str:
    from data_testlib import chat, write_jsonl

    rng = np.random.default_rng(seed)
    words = "the quick brown fox jumps over lazy dog hello there how are you doing today blue".split()
    rows = []
    for i in range(n):
        q = " ".join(rng.choice(words, size=int(rng.integers(2, 6))))
        a = " ".join(rng.choice(words, size=int(rng.integers(2, 8))))
        rows.append(chat("user", f"{i} {q}?", "assistant", a))
    return write_jsonl(path, rows)


def checkpoint_params(run_dir, step: int | None = None) -> dict[str, np.ndarray]:
    """Every parameter a run's checkpoint holds ("/"-joined path -> array), read whole on one
    device (Checkpointer.restore_params restores only the leaves its abstract tree names)."""
    from ftc.backends.jax.state import checkpoint as ckpt_lib

    reader = ckpt_lib.Checkpointer(ckpt_lib.checkpoint_dir(run_dir), read_only=True)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    tree: dict = {}
    for path, (shape, dtype) in reader.saved_arrays(step).items():
        if path.startswith("params/"):
            *parents, leaf = path.split("/")[1:]
            node = tree
            for name in parents:
                node = node.setdefault(name, {})
            node[leaf] = jax.ShapeDtypeStruct(shape, np.dtype(dtype), sharding=device)
    return flat(reader.restore_params(tree, step))
