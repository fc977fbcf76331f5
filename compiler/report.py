"""A Plan as text: what `ftc plan` prints and `ftc run` logs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n} B"


def human_count(n: int) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def format_plan(plan, *, max_params: int = 40) -> str:
    """A readable summary of a compiler.plan.Plan (what `ftc plan` prints)."""
    m, b, s, mem, mesh = plan.model, plan.batch, plan.steps, plan.memory, plan.mesh
    pct = 100.0 * plan.trainable_count / max(plan.param_count, 1)
    lines = [
        f"plan for {plan.name}   (fingerprint {plan.fingerprint()})",
        f"model     {m.family} ({m.model_type}): {m.layers} layers, hidden {m.hidden}, heads {m.heads}"
        f" (kv {m.kv_heads}, dim {m.head_dim}), mlp {m.intermediate}, vocab {m.vocab}"
        + (", tied embeddings" if m.tied_embeddings else ""),
        f"params    {plan.param_count:,} total ({human_count(plan.param_count)}), "
        + (
            f"{plan.active_param_count:,} active per token ({human_count(plan.active_param_count)}; "
            f"{m.experts_per_token} of {m.experts} experts), "
            if plan.active_param_count is not None
            else ""
        )
        + f"{plan.trainable_count:,} trainable ({pct:.2f}%)   method {plan.method}, objective {plan.objective}",
        f"dtypes    compute {plan.compute_dtype}, params {plan.param_dtype}, remat {plan.remat}",
        f"mesh      data={mesh.data} fsdp={mesh.fsdp} tensor={mesh.tensor}"
        + (f" expert={mesh.expert}" if mesh.expert > 1 else "")
        + f" on {mesh.device_count} device(s)",
        f"batch     {b.global_batch} sequences x {b.seq_len} tokens = {b.tokens_per_step:,} tokens/step; "
        f"micro-batch {b.micro_batch} ({b.micro_batch_per_device}/device) x {b.accum_steps} accumulation step(s)",
        f"steps     {s.total_steps if s.total_steps is not None else 'unknown'}   ({s.note})",
        f"schedule  {plan.schedule.kind}, lr {plan.schedule.learning_rate:g}, warmup "
        + (
            f"{plan.schedule.warmup_steps} steps"
            if plan.schedule.warmup_steps is not None
            else f"ratio {plan.schedule.warmup_ratio}"
        )
        + f", min_lr_ratio {plan.schedule.min_lr_ratio:g}",
        f"optimizer {plan.optimizer.kind}, weight decay {plan.optimizer.weight_decay:g}, "
        f"grad clip {plan.optimizer.grad_clip:g}",
        *_memory_lines(plan.objective, mem),
        f"compute   {plan.flops_per_token / 1e9:,.3f} GFLOP per trained token (model FLOPs, the MFU numerator), "
        f"{plan.flops_per_token * b.tokens_per_step / 1e12:,.3f} TFLOP per step",
    ]
    if max_params > 0:
        lines.append("parameters (path  shape  logical axes -> partition):")
    for p in plan.params[:max_params]:
        mark = "" if p.trainable else "  [frozen]"
        lines.append(f"  {p.path}  {list(p.shape)}  {_axes(p.axes)} -> {_axes(p.partition)}{mark}")
    if 0 < max_params < len(plan.params):
        lines.append(f"  ... {len(plan.params) - max_params} more (--json lists all)")
    if plan.notes:
        lines.append("notes:")
        lines += [f"  {n}" for n in plan.notes]
    return "\n".join(lines)


def _memory_lines(objective: str, mem) -> list[str]:
    reference = f" + {objective.upper()} reference copy {human_bytes(mem.reference)}" if mem.reference else ""
    if mem.rollout is None:
        return [
            f"memory/device  params {human_bytes(mem.params)} + grads {human_bytes(mem.grads)} + optimizer "
            f"{human_bytes(mem.optimizer)} + activations ~{human_bytes(mem.activations)}{reference}"
            f" = {human_bytes(mem.total)}"
        ]
    update = f"grads {human_bytes(mem.grads)} + activations ~{human_bytes(mem.activations)}"
    r = mem.rollout
    return [
        f"memory/device  params {human_bytes(mem.params)} + optimizer {human_bytes(mem.optimizer)}{reference}"
        f" + max(update, rollout) = {human_bytes(mem.total)}",
        f"  update       {update} = {human_bytes(mem.update)}",
        f"  rollout      KV cache {human_bytes(r.kv_cache)} + sampler logits {human_bytes(r.sampler_logits)} + "
        f"scoring logits ~{human_bytes(r.scoring_logits)} + per-token arrays {human_bytes(r.per_token)} = "
        f"{human_bytes(r.total)}",
    ]


def _axes(axes: Sequence[Any]) -> str:
    return "(" + ", ".join("-" if a is None else str(a) for a in axes) + ")"


def format_compiled_memory(plan, compiled) -> str:
    """`ftc plan --compile`'s lines: XLA's memory analysis of the compiled train step (any object
    with the fields of compiled_memory.CompiledMemory) beside the plan's estimate."""
    c, estimate = compiled, plan.memory.total
    ratio = f", {c.peak / estimate:.2f}x the estimate" if estimate else ""
    return "\n".join(
        [
            f"compiled  the train step for {c.devices} {c.platform} device(s) in {c.compile_s:.1f} s; "
            "XLA's memory analysis per device:",
            f"          arguments {human_bytes(c.argument)} + outputs {human_bytes(c.output)} - aliased "
            f"{human_bytes(c.alias)} + temporaries {human_bytes(c.temp)} = {human_bytes(c.peak)}"
            f" (estimate above {human_bytes(estimate)}{ratio}); generated code {human_bytes(c.generated_code)}",
        ]
    )
