"""`ftc plan --compile` on mixture-of-experts shapes: the plan's memory estimate beside XLA's figure
for the compiled train step (bench/README.md, "MoE activation estimate").

    python -m bench.moe_plan                 # Mixtral-, Qwen2-MoE- and Qwen3-MoE-like, remat none and dots

The dense Llama at 4 and 8 layers comes first (what one layer costs against what is outside the layers).
Each MoE shape is the cpu config's dense Llama (hidden 256, 4 layers, vocab 8192; batch 8 x 256, float32)
with its MLP replaced by experts; only config.json is written (`ftc plan` reads no weights).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common, plan_memory  # noqa: E402

BASE = {
    "hidden_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "vocab_size": 8192,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "intermediate_size": 704,
}
QWEN_MOE = {"decoder_sparse_step": 1, "mlp_only_layers": []}
SHAPES = {  # name -> config.json keys beside BASE
    "llama (dense)": {"model_type": "llama"},
    "llama (dense), 8 layers": {"model_type": "llama", "num_hidden_layers": 8},  # what a layer costs
    "Mixtral-like: 8, 2, 704": {"model_type": "mixtral", "num_local_experts": 8, "num_experts_per_tok": 2},
    "Qwen2-MoE-like: 8, 2, 256; 512": {
        "model_type": "qwen2_moe",
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 256,
        "shared_expert_intermediate_size": 512,
        **QWEN_MOE,
    },
    "Qwen3-MoE-like: 16, 4, 352": {
        "model_type": "qwen3_moe",
        "num_experts": 16,
        "num_experts_per_tok": 4,
        "moe_intermediate_size": 352,
        "head_dim": 32,
        "norm_topk_prob": True,
        **QWEN_MOE,
    },
}
MIB = 1 << 20


def main() -> int:
    from bench import train_speed

    config = common.CONFIGS["cpu"]
    env = train_speed.worker_env(config)
    print("| shape (routed experts, top-k, expert F; shared F_s) | remat | XLA (MiB) | estimate (MiB) | XLA / est. |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="ftc-bench-moe-plan-") as tmp:
        for i, (name, keys) in enumerate(SHAPES.items()):
            model_dir = Path(tmp) / f"model-{i}"
            model_dir.mkdir()
            (model_dir / "config.json").write_text(json.dumps({**BASE, **keys}))
            for remat in ("none", "dots"):
                job = common.Job(config, "full", str(model_dir), "", config.steps, config.warmup, 1, remat=remat)
                got = plan_memory.predict(job, Path(tmp), env)
                if "error" in got:
                    print(f"| {name} | {remat} | {got['error']} | | |")
                    continue
                xla, est = got["compiled"]["peak"], got["estimate"]["total"]
                print(f"| {name} | {remat} | {xla / MIB:,.0f} | {est / MIB:,.0f} | {xla / est:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
