"""LoRA's export formats (QLoRA's too, see qlora.py):

hf     the merged model, W + scale * A @ B in every adapted kernel (a QLoRA base dequantised
       first: what the QLoRA run computed); transformers loads it alone
gguf   the merged model as one GGUF file for llama.cpp / Ollama, with a Modelfile (io/gguf_export*.py)
peft   adapter_config.json + adapter_model.safetensors (+ tokenizer), served on the frozen base:
       `PeftModel.from_pretrained(base, dir)`
"""

from __future__ import annotations

from ftc.backends.jax.io import export_common as ex
from ftc.backends.jax.io import verify
from ftc.backends.jax.io.gguf_export_format import gguf_format
from ftc.backends.jax.methods.contract import ExportFormat
from ftc.backends.jax.methods.lora_params import merged_params
from ftc.backends.jax.methods.peft import CONFIG_FILE, save_peft_adapter


def write_merged(trained, out, dtype: str) -> None:
    ex.save_hf(trained, out, merged_params(trained.model.plan, trained.params), dtype)


def merged_as_exported(model, params, dtype: str) -> tuple:
    """In float32 the trained (unmerged) model itself, which also checks the merge; in a lower
    dtype the merged weights as rounded there, on the family's module."""
    if dtype == "float32":
        return ex.trained_weights_exported(model, params, dtype)
    return model.base, ex.round_leaves(merged_params(model.plan, params), dtype, lambda path: True)


def write_peft(trained, out, dtype: str) -> None:
    if trained.base_name is None:
        raise ex.ExportError(f"cannot write a PEFT adapter: {trained.base_note} (or export --format hf, merged)")
    m = trained.model
    save_peft_adapter(
        out,
        m.family,
        m.arch,
        m.plan,
        trained.params,
        base_model_name_or_path=trained.base_name,
        task_type=ex.task_type(m.family),
        dtype=ex.np_dtype(dtype),
    )
    base = trained.spec.model.base
    revision = base.partition("@")[2].split("/")[0] if "@" in base else ""
    if revision and trained.base_name == base.split("@")[0]:
        ex.update_json(out / CONFIG_FILE, revision=revision)
    ex.copy_tokenizer(trained.tokenizer_dir, out)


def reload_peft_on(base_dir, out, causal: bool):
    import peft  # torch: only when verifying

    return peft.PeftModel.from_pretrained(verify.load_reference(base_dir, causal=causal), str(out)).eval()


def reload_peft(trained, out, scratch, causal: bool):
    return reload_peft_on(ex.base_dir(trained), out, causal)


def load_peft_line(out, base_name: str | None, auto: str) -> str:
    imports, base = ex.load_base(base_name, auto)
    return f"{imports}PeftModel.from_pretrained({base}, {str(out)!r})"


FORMATS = {
    "hf": ExportFormat(
        write=write_merged, how_to_load=ex.load_hf_line, ftc_side=merged_as_exported, reload=ex.reload_hf
    ),
    "peft": ExportFormat(
        write=write_peft, how_to_load=load_peft_line, ftc_side=ex.trained_weights_exported, reload=reload_peft
    ),
    "gguf": gguf_format(lambda model, params: merged_params(model.plan, params)),  # merged, as "hf"
}
