"""Training speed on a tiny Mixture-of-Experts model (Qwen3-MoE shape), ftc against transformers
(+ PEFT for LoRA), the same work in one invocation.

    python -m bench.moe_speed                      # full and LoRA, 12 steps each stack (a few minutes)
    python -m bench.moe_speed --method lora --steps 6 --json out.json

One random Qwen3MoeForCausalLM (8 experts, 2 per token, renormalised) is saved with transformers;
both stacks load it and train on one array of random ids (seed 0, no padding), batch x seq, with
AdamW (lr 1e-4 constant, no weight decay, clip 1.0) in float32, and the router's load-balancing
loss added with the config's coefficient (0.001, output_router_logits): transformers' loss is
cross-entropy + 0.001 * its `aux_loss`, ftc's objective the same (objectives/router_aux.py). LoRA
(r 16, alpha 32, dropout 0) on the attention projections and on both fused expert weights, per
expert (PEFT: target_modules q/k/v/o + target_parameters; ftc: targets "all-linear", which on
Qwen3-MoE is exactly those). The trainable counts must be equal and the first step's loss agree
within 1e-4 (the run exits 1 otherwise).

Each stack runs in its own process; reported: compile (ftc) / first step, steady step time (median
after `--warmup` steps), tokens/s, and the ratio ftc/PyTorch. Same harness conventions as
bench/train_speed.py, which is Llama-only.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common  # noqa: E402

CONFIG = dict(
    vocab_size=8192,
    hidden_size=256,
    intermediate_size=512,
    moe_intermediate_size=256,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=32,
    num_experts=8,
    num_experts_per_tok=2,
    norm_topk_prob=True,
    output_router_logits=True,
    router_aux_loss_coef=0.001,
    max_position_embeddings=1024,
    tie_word_embeddings=False,
)
AUX = CONFIG["router_aux_loss_coef"]
LR, CLIP, RANK, ALPHA = 1e-4, 1.0, 16, 32
EXPERT_PARAMS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
# Named, not "all-linear": PEFT 0.21's "all-linear" also adapts the router (mlp.gate) and gives
# gate_up_proj twice the rank; ftc's "all-linear" is attention + experts at rank r.
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


# ------------------------------------------------------------------ the workers (one process each)


def torch_worker(job: dict) -> dict:
    import numpy as np
    import torch
    import torch.nn.functional as F
    import transformers

    torch.set_num_threads(job["threads"])
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_pretrained(job["model_dir"], dtype=torch.float32)
    if job["method"] == "lora":
        import peft

        config = peft.LoraConfig(
            r=RANK,
            lora_alpha=ALPHA,
            lora_dropout=0.0,
            target_modules=ATTENTION,
            target_parameters=EXPERT_PARAMS,
            task_type="CAUSAL_LM",
        )
        model = peft.get_peft_model(model, config)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, fused=True)
    tokens = np.load(job["tokens"])

    def step(i):
        batch = torch.from_numpy(tokens[i % len(tokens)]).long()
        out = model(input_ids=batch[:, :-1], output_router_logits=True)
        ce = F.cross_entropy(out.logits.float().reshape(-1, out.logits.shape[-1]), batch[:, 1:].reshape(-1))
        loss = ce + AUX * out.aux_loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.item())

    return {"trainable_params": sum(p.numel() for p in params), "compile_s": 0.0, **_time_steps(step, job)}


def ftc_worker(job: dict) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from ftc.backends.jax.io import hf_checkpoint
    from ftc.backends.jax.methods import lora
    from ftc.backends.jax.models import shapes
    from ftc.backends.jax.objectives import router_aux
    from ftc.backends.jax.train import mesh as mesh_lib
    from ftc.backends.jax.train import optimizer as opt_lib
    from ftc.backends.jax.train import step as ts
    from ftc.compiler import plan as plan_lib
    from ftc.compiler import sharding_rules

    loaded = hf_checkpoint.load_model(job["model_dir"], dtype=jnp.float32)
    module, params, trainable = loaded.family.build(loaded.arch), loaded.params, lambda path: True
    if job["method"] == "lora":
        config = lora.LoraConfig(rank=RANK, alpha=float(ALPHA), dropout=0.0, rslora=False, targets=lora.ALL_LINEAR)
        module = lora.adapt(loaded.family, loaded.arch, module, config)
        params, trainable = lora.init_params(module, params, jax.random.key(0)), lora.is_trainable
    mesh = mesh_lib.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    infos = shapes.param_infos(shapes.abstract_boxed_params(module))
    one = {"data": 1, "fsdp": 1, "tensor": 1, "expert": 1}
    partitions = {i.path: sharding_rules.param_partition(i.axes, i.shape, one)[0] for i in infos}
    mask = opt_lib.trainable_mask(params, trainable)
    schedule = opt_lib.make_schedule(plan_lib.SchedulePlan("constant", LR, 0, None, 0.0), job["steps"])
    tx = opt_lib.make_optimizer(
        plan_lib.OptimizerPlan("adamw", 0.0, 0.9, 0.999, 1e-8, None, CLIP), schedule, {i.path: i.axes for i in infos}
    )
    state_sh = ts.state_shardings(mesh, ts.abstract_state(jax.eval_shape(lambda p: p, params), tx, mask), partitions)
    state = jax.jit(lambda p: ts.init_state(p, tx, mask, 0), out_shardings=state_sh)(params)
    objective = router_aux.causal_lm_with_router_aux(router_aux.coefficient(_no_spec_coef(), loaded.arch.moe))
    steps = ts.build_steps(module, tx, schedule, mask, mesh, state_sh, accum_steps=1, objective=objective)
    tokens = np.load(job["tokens"])
    B, T = tokens.shape[1], tokens.shape[2] - 1
    fixed = {
        "weights": np.ones((B, T), np.float32),
        "segment_ids": np.ones((B, T), np.int32),
        "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)),
    }

    def put(i):
        ids = tokens[i % len(tokens)]
        return steps.put_train_batch({"input_ids": ids[:, :-1], "targets": ids[:, 1:], **fixed})

    t0 = time.perf_counter()
    with jax.set_mesh(mesh):
        compiled = steps.train.lower(state, put(0)).compile()
    compile_s = time.perf_counter() - t0
    holder = {"state": state}

    def step(i):
        holder["state"], metrics = compiled(holder["state"], put(i))
        return float(metrics["loss_with_aux"])

    n_trainable = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(opt_lib.split_params(state["params"], mask)[0]))
    return {"trainable_params": n_trainable, "compile_s": compile_s, **_time_steps(step, job)}


def _no_spec_coef():
    """A spec without training.router_aux_loss_coef: the config's coefficient applies."""
    return type("Spec", (), {"training": type("Training", (), {"router_aux_loss_coef": None})()})()


def _time_steps(step, job) -> dict:
    losses, times = [], []
    for i in range(job["steps"]):
        t0 = time.perf_counter()
        losses.append(step(i))
        times.append(time.perf_counter() - t0)
    steady = statistics.median(times[job["warmup"] :])
    return {"losses": losses, "first_step_s": times[0], "step_s": steady, "step_times_s": times}


# ------------------------------------------------------------------ the orchestrator


def run_worker(stack: str, job: dict, workdir: Path) -> dict:
    job_path, result_path = workdir / f"{stack}-{job['method']}.json", workdir / f"{stack}-{job['method']}.out.json"
    job_path.write_text(json.dumps(job))
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f)
    env["PYTHONPATH"] = os.pathsep.join([str(common.REPO_ROOT), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "bench.moe_speed", "--worker", stack, str(job_path), str(result_path)]
    subprocess.run(cmd, check=True, env=common.stack_env(stack, env), cwd=common.REPO_ROOT)
    return json.loads(result_path.read_text())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--method", choices=("full", "lora", "all"), default="all")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--json", default=None, help="write the report here")
    ap.add_argument("--worker", nargs=3, metavar=("STACK", "JOB", "RESULT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        stack, job_path, result_path = args.worker
        job = json.loads(Path(job_path).read_text())
        result = (ftc_worker if stack == "ftc" else torch_worker)(job)
        Path(result_path).write_text(json.dumps(result))
        return 0

    import numpy as np
    import torch
    import transformers

    methods = ("full", "lora") if args.method == "all" else (args.method,)
    report = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "load_average_start": os.getloadavg()[0],
        "config": CONFIG,
        "batch": args.batch,
        "seq_len": args.seq_len,
        "rows": [],
    }
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        torch.manual_seed(0)
        transformers.AutoModelForCausalLM.from_config(transformers.Qwen3MoeConfig(**CONFIG)).save_pretrained(
            workdir / "model"
        )
        rng = np.random.default_rng(0)
        tokens = rng.integers(0, CONFIG["vocab_size"], (args.steps, args.batch, args.seq_len + 1), dtype=np.int32)
        np.save(workdir / "tokens.npy", tokens)
        for method in methods:
            job = dict(
                method=method,
                model_dir=str(workdir / "model"),
                tokens=str(workdir / "tokens.npy"),
                steps=args.steps,
                warmup=args.warmup,
                threads=args.threads,
            )
            results = {stack: run_worker(stack, job, workdir) for stack in ("pytorch", "ftc")}
            diff = abs(results["ftc"]["losses"][0] - results["pytorch"]["losses"][0])
            ok &= diff <= 1e-4 * max(1.0, abs(results["pytorch"]["losses"][0]))
            ok &= results["ftc"]["trainable_params"] == results["pytorch"]["trainable_params"]
            ratio = results["pytorch"]["step_s"] / results["ftc"]["step_s"]
            report["rows"].append({"method": method, **results, "loss1_diff": diff, "speed_ratio_ftc_over_pt": ratio})
            for stack, r in results.items():
                tps = args.batch * args.seq_len / r["step_s"]
                print(
                    f"{method:5s} {stack:8s} loss@1 {r['losses'][0]:.5f} trainable {r['trainable_params']:,} "
                    f"compile {r['compile_s']:.1f}s step {r['step_s']:.3f}s tokens/s {tps:,.0f}"
                )
            print(f"{method:5s} ftc/PyTorch tokens/s {ratio:.2f}x (loss@1 diff {diff:.1e})")
    report["load_average_end"] = os.getloadavg()[0]
    print(f"load average {report['load_average_start']:.2f} -> {report['load_average_end']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    if not ok:
        print("FAIL: first-step losses or trainable counts differ: not the same work", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
