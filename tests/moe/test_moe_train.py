"""Training a MoE model (Qwen2-MoE: routed experts + shared expert) with the router aux loss on
meshes with an expert axis of the 8 fake CPU devices, against one device; and what the plan
says of experts."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import train_testlib as tl

from ftc.backends.jax.models import family_for
from ftc.backends.jax.objectives import router_aux
from ftc.backends.jax.train import step as ts
from ftc.compiler import flops as flops_lib
from ftc.compiler import plan as plan_lib
from ftc.compiler.report import format_plan
from ftc.compiler.sharding_rules import PlanError

STEPS = 3
AUX = 0.05


def _config() -> dict:
    import transformers as tf

    t = tl.TINY
    return tf.Qwen2MoeConfig(
        **{k: v for k, v in t.items() if k != "intermediate_size"},
        intermediate_size=64,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=48,
        num_experts=4,
        num_experts_per_tok=2,
    ).to_dict()


CFG = _config()


@pytest.fixture(scope="module")
def params():
    family = family_for(CFG)
    module = family.build(family.config_from_hf(CFG))
    init = jax.jit(lambda: nn.unbox(module.init(jax.random.key(0), jnp.zeros((1, tl.SEQ), jnp.int32))["params"]))
    # Spread the routers so tokens do not all pick the same experts.
    return jax.tree_util.tree_map_with_path(
        lambda p, x: x * 20 if "gate" in jax.tree_util.keystr(p) and "shared" not in jax.tree_util.keystr(p) else x,
        jax.device_get(init()),
    )


def _train(spec, params, n_devices, batches):
    p = tl.program(spec, CFG, n_devices, params=params, objective=router_aux.causal_lm_with_router_aux(AUX))
    state, history = p.state, []
    for batch in batches:
        state, metrics = p.steps.train(state, p.steps.put_train_batch(batch))
        history.append(ts.host_metrics(metrics))
    return p, state, history


def _spec(mesh: dict):
    return tl.spec(
        {
            "training": {
                "learning_rate": 1e-3,
                "batch_size": 16,
                "micro_batch_size": 8,
                "router_aux_loss_coef": AUX,
                "optimizer": {"kind": "adamw", "weight_decay": 0.01},
            },
            "mesh": mesh,
        }
    )


def _batches():
    rng = np.random.default_rng(0)
    return [tl.random_batch(rng, 16) for _ in range(STEPS)]


@pytest.fixture(scope="module")
def single_device_run(params):
    _, state, history = _train(_spec({"data": 1, "fsdp": 1, "tensor": 1, "expert": 1}), params, 1, _batches())
    return tl.flat(state["params"]), history


MESHES = [
    {"data": 2, "fsdp": 1, "tensor": 2, "expert": 2},
    pytest.param({"data": 1, "fsdp": 2, "tensor": 1, "expert": 4}, marks=pytest.mark.slow),  # CI time
]


@pytest.mark.parametrize("mesh", MESHES, ids=lambda m: "x".join(f"{k}{v}" for k, v in m.items()))
def test_losses_and_params_on_expert_meshes_equal_one_device(params, single_device_run, mesh):
    ref_params, ref_history = single_device_run
    p, state, history = _train(_spec(mesh), params, 8, _batches())
    # Each device holds its share of the experts, as the plan says.
    kernel = state["params"]["layers"]["mlp"]["experts"]["gate_up_proj"]["kernel"]
    partition = p.plan.partitions()["layers/mlp/experts/gate_up_proj/kernel"]
    assert partition[1] == "expert" and tuple(kernel.sharding.spec) == tuple(partition)
    assert kernel.addressable_shards[0].data.shape[1] == 4 // mesh["expert"]
    # Tokens are exchanged along the expert axis: gathered in, reduce-scattered out.
    lowered = p.steps.train.lower(p.state, p.steps.put_train_batch(_batches()[0])).as_text()
    assert "all_gather" in lowered and "reduce_scatter" in lowered
    for got, want in zip(history, ref_history):
        for key in ("loss", "aux_loss", "loss_with_aux", "grad_norm", "tokens"):
            assert got[key] == pytest.approx(want[key], rel=1e-5), key
    assert all(h["aux_loss"] > 0 and h["loss_with_aux"] > h["loss"] for h in history)
    got_params = tl.flat(state["params"])
    # Adam divides by sqrt(v): gradients that differ in the last float32 bits (the mesh sums in
    # another order; the blockwise attention kernel too) move a parameter by up to ~1e-5, and by
    # 3.9e-5 (one element of 16,384 on the (1, 2, 1, 4) mesh) with LLVM at -O0 as tests/conftest.py
    # sets it; each of the 8 steps moves a parameter by up to lr = 1e-3.
    for name, want in ref_params.items():
        np.testing.assert_allclose(got_params[name], want, rtol=0, atol=5e-5, err_msg=name)


def test_plan_counts_active_parameters_and_refuses_an_expert_axis_that_does_not_divide():
    from ftc.backends.jax.models import shapes

    infos = shapes.param_infos_for_config(CFG)

    def plan(mesh, devices):
        return plan_lib.compile_plan(_spec(mesh), CFG, devices, family="qwen2_moe", param_infos=infos)

    p = plan({"data": 1, "fsdp": 1, "tensor": 1, "expert": 2}, 2)
    experts = sum(np.prod(i.shape) for i in infos if "expert" in i.axes)
    assert p.param_count - p.active_param_count == experts // 2  # 2 of 4 experts per token
    assert "active per token" in format_plan(p) and "expert=2" in format_plan(p)
    # MFU's model FLOPs count an expert's weights for the tokens routed to it: 2 of 4.
    kernels = [i for i in infos if i.path.endswith("/kernel")]
    active = sum(np.prod(i.shape) * (0.5 if "expert" in i.axes else 1.0) for i in kernels)
    m = p.model
    want = flops_lib.train_flops_per_token(
        flops_lib.MatmulWeights(round(active), round(active), 0),
        layers=m.layers,
        seq_len=p.batch.seq_len,
        attention_width=m.heads * m.head_dim,
    )
    assert p.flops_per_token == want
    with pytest.raises(PlanError, match=r"mesh.expert=3 does not divide the 4 experts"):
        plan({"data": 1, "fsdp": 1, "tensor": 1, "expert": 3}, 3)
    llama = tl.tiny_llama_config()
    with pytest.raises(PlanError, match="mesh.expert=2: model_type 'llama' has no experts"):
        plan_lib.compile_plan(
            _spec({"data": 1, "fsdp": 1, "tensor": 1, "expert": 2}),
            llama,
            2,
            family="llama",
            param_infos=shapes.param_infos_for_config(llama),
        )
