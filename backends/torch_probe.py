"""Load an ftc embedding-probe export into PyTorch (torch + transformers only).

ftc exports a probe as a plain *ForSequenceClassification checkpoint when transformers has a class
that reads the same features (load that with AutoModelForSequenceClassification). Otherwise the
export directory holds the frozen base model (a normal HF checkpoint) plus
  probe_config.json        format "ftc-probe", pooling (mean|cls|last), head (linear|mlp),
                           features (last_hidden_state|pooler_output), id2label, label2id
  probe_head.safetensors   out.weight [C, F] (+ out.bias [C]); for mlp also hidden.weight [H, D],
                           hidden.bias [H] (torch.nn.Linear layout); exact gelu between them
and this file rebuilds the classifier:

    probe = load_probe(export_dir).eval()
    logits = probe(input_ids, attention_mask=attention_mask).logits   # [B, num_labels]

Rows must be right-padded for pooling "last" (the last position with attention_mask 1 is read).
This file is self-contained: copy it next to your serving code if you don't install ftc.
"""

from __future__ import annotations

import json
import os

import torch
import transformers
from safetensors.torch import load_file  # a dependency of transformers

FORMAT = "ftc-probe"


class ProbeModel(torch.nn.Module):
    def __init__(self, base: torch.nn.Module, config: dict, head: dict[str, torch.Tensor]):
        super().__init__()
        self.base = base
        self.config = config
        self.pooling = config["pooling"]
        self.features = config["features"]
        if "hidden.weight" in head:
            self.hidden = torch.nn.Linear(*reversed(head["hidden.weight"].shape))
            self.hidden.load_state_dict({"weight": head["hidden.weight"], "bias": head["hidden.bias"]})
        else:
            self.hidden = None
        out_features, in_features = head["out.weight"].shape
        self.out = torch.nn.Linear(in_features, out_features, bias="out.bias" in head)
        self.out.load_state_dict({k[len("out.") :]: v for k, v in head.items() if k.startswith("out.")})

    def pooled(self, input_ids, attention_mask=None, **kwargs) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        outputs = self.base(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        if self.features == "pooler_output":
            return outputs.pooler_output
        hidden = outputs.last_hidden_state
        mask = attention_mask.to(hidden.dtype)
        if self.pooling == "mean":
            return (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1.0)
        if self.pooling == "cls":
            return hidden[:, 0]
        last = (attention_mask.sum(1) - 1).clamp(min=0)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]

    def forward(self, input_ids, attention_mask=None, **kwargs):
        """A SequenceClassifierOutput, like transformers' classification heads (`.logits` [B, C])."""
        x = self.pooled(input_ids, attention_mask, **kwargs).to(self.out.weight.dtype)
        if self.hidden is not None:
            x = torch.nn.functional.gelu(self.hidden(x))
        return transformers.modeling_outputs.SequenceClassifierOutput(logits=self.out(x))


def load_probe(export_dir: str | os.PathLike, **from_pretrained_kwargs) -> ProbeModel:
    """The probe in `export_dir` as a torch module (base via AutoModel.from_pretrained)."""
    path = os.path.join(export_dir, "probe_config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{export_dir}: no probe_config.json; if config.json names a *ForSequenceClassification "
            "architecture, load it with transformers.AutoModelForSequenceClassification instead"
        )
    with open(path) as f:
        config = json.load(f)
    if config.get("format") != FORMAT:
        raise ValueError(f"{path}: format={config.get('format')!r}, expected {FORMAT!r}")
    base = transformers.AutoModel.from_pretrained(export_dir, **from_pretrained_kwargs)
    head = load_file(os.path.join(export_dir, "probe_head.safetensors"))
    return ProbeModel(base, config, head)
