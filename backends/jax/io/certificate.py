"""The export certificate: what was checked about an export, kept in its ftc_export.json.

    "certificate": {
      "hashes":   sha256 of the resolved spec, each local data file, the tokenizer files, the chat template
      "stops":    the EOS ids, the chat template's end-of-turn id, and whether the export carries them
                  (generation_config.json for hf; tokenizer.ggml.eos/eot_token_id for gguf)
      "logits":   (with --verify) the largest difference on the fixed padded batch, the tolerance, the loader
      "weights":  (gguf, with --verify) every tensor of the file, dequantised, equal to ftc's weights bit for bit
      "greedy":   (with --verify) greedy continuations of PROMPTS by ftc's sampler (generate/sampler.py) on
                  the weights the export holds and by the target's loader (transformers / PEFT; for GGUF,
                  transformers' GGUF loader or ftc's import), the first differing token if any
      "ok":       every check above passed
    }

Greedy decoding picks the largest logit, so two correct implementations can part at a near tie
(float32 rounding); a difference is reported with both logits' gap under ftc, and one at a gap
below `TIE_GAP` is recorded as a tie rather than a failure.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
from pathlib import Path

import jax
import numpy as np

from ftc.backends.jax.io.export_common import MANIFEST, as_float32
from ftc.backends.jax.state import files

PROMPTS = ("What is your favorite book?", "Tell me a joke.", "hello there")
NEW_TOKENS = 16
TIE_GAP = 1e-4


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def hashes(trained) -> dict:
    """sha256 of what made the export: the resolved spec, local data files, tokenizer, chat template."""
    from ftc.backends.jax.stages import tokenizer_hash

    resolved = trained.run_dir / "spec.resolved.json"
    out = {"spec.resolved.json": _sha256(resolved) if resolved.is_file() else None}
    data = {}
    d = trained.spec.data
    for value in (d.train if isinstance(d.train, tuple) else (d.train,)) + ((d.validation,) if d.validation else ()):
        matched = sorted(glob.glob(value)) if ":" not in value.split("/")[0] else []
        if not matched:
            data[value] = "not a local file"
        for p in matched:
            if Path(p).is_file():
                data[p] = _sha256(Path(p))
    out["data"] = data
    tok_dir = trained.tokenizer_dir
    out["tokenizer"] = tokenizer_hash(tok_dir) if tok_dir is not None else None
    template = chat_template(tok_dir)
    out["chat_template"] = hashlib.sha256(template.encode()).hexdigest() if template else None
    return out


def chat_template(tok_dir: Path | None) -> str | None:
    if tok_dir is None:
        return None
    config = Path(tok_dir) / "tokenizer_config.json"
    template = json.loads(config.read_text()).get("chat_template") if config.is_file() else None
    jinja = Path(tok_dir) / "chat_template.jinja"
    if template is None and jinja.is_file():
        template = jinja.read_text()
    return template if isinstance(template, str) else None


def stops(trained, out: Path, format: str) -> dict:
    """The EOS / end-of-turn ids the run's tokenizer and chat template give, and whether the export
    carries them where its servers read them."""
    from ftc.backends.jax.io import gguf_export_vocab as vocab

    record = {"chat_template": chat_template(trained.tokenizer_dir) is not None}
    if trained.tokenizer_dir is None:
        return {**record, "ok": True, "note": "the run has no tokenizer files"}
    from ftc.backends.jax.stages import load_tokenizer

    tokenizer = load_tokenizer(trained.tokenizer_dir)
    template = getattr(tokenizer, "chat_template", None)
    end_of_turn = vocab.end_of_turn_id(tokenizer, template)
    wanted = [i for i in dict.fromkeys((end_of_turn, tokenizer.eos_token_id)) if i is not None]
    record.update(eos_id=tokenizer.eos_token_id, end_of_turn_id=end_of_turn)
    if format == "gguf":
        from gguf import GGUFReader

        from ftc.backends.jax.io.gguf_export import GGUF_FILE

        fields = GGUFReader(str(out / GGUF_FILE)).fields
        carried = [
            fields[k].contents() for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id") if k in fields
        ]
        record["gguf_stop_ids"] = carried
        record["gguf_chat_template"] = "tokenizer.chat_template" in fields
        record["gguf_pre_tokenizer"] = fields["tokenizer.ggml.pre"].contents()
        if record["gguf_pre_tokenizer"] == "default":  # gguf_export_vocab.PRE_NAMES did not know it
            record["note"] = (
                "tokenizer.ggml.pre is 'default': llama.cpp splits text by its default rules, which may "
                "differ from this tokenizer's pre-tokenizer (transformers' GGUF loader uses tokenizer.json's)"
            )
        ok = all(i in carried for i in wanted) and (record["gguf_chat_template"] or not record["chat_template"])
    elif (out / "generation_config.json").is_file():
        eos = json.loads((out / "generation_config.json").read_text()).get("eos_token_id")
        carried = eos if isinstance(eos, list) else [eos]
        record["generation_config_eos"] = carried
        ok = all(i in carried for i in wanted)
    else:  # an adapter served on its base: the base's generation_config.json decides
        ok, record["note"] = True, "an adapter directory: the serving base's generation_config.json applies"
    record["ok"] = bool(ok)
    return record


# ---------------------------------------------------------------- greedy continuations


@dataclasses.dataclass(frozen=True)
class Prompt:
    text: str
    ids: tuple[int, ...]


def prompts(trained, tokenizer) -> list[Prompt]:
    from ftc.backends.jax.generate.text import encode_prompt

    if tokenizer is None:  # no tokenizer: fixed ids
        return [Prompt(f"ids {i}", tuple(range(i + 1, i + 6))) for i in range(len(PROMPTS))]
    return [Prompt(p, tuple(encode_prompt(tokenizer, p))) for p in PROMPTS]


def ftc_greedy(trained, module, params, prompt_ids, stop_ids) -> list[tuple[int, ...]]:
    from ftc.backends.jax.generate.sampler import GenerateConfig, generate, make_sampler
    from ftc.backends.jax.generate.source import context_length

    m = trained.model
    sampler = make_sampler(m.family, m.arch, module, context=context_length(trained.hf_config))
    config = GenerateConfig(max_new_tokens=NEW_TOKENS, eos_ids=tuple(stop_ids))
    done = generate(sampler, as_float32(params), [list(p) for p in prompt_ids], jax.random.key(0), config)
    return [c.tokens for c in done]


def reference_greedy(reference, prompt_ids, stop_ids) -> list[tuple[int, ...]]:
    import torch

    out = []
    with torch.no_grad():
        for ids in prompt_ids:
            x = torch.tensor([list(ids)], dtype=torch.long)
            y = reference.generate(
                input_ids=x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                eos_token_id=list(stop_ids) or None,
                pad_token_id=(list(stop_ids) or [0])[0],
            )
            new = [int(t) for t in y[0, x.shape[1] :]]
            for i, t in enumerate(new):  # transformers pads after EOS in a batch; one row: cut at EOS
                if t in stop_ids:
                    new = new[: i + 1]
                    break
            out.append(tuple(new))
    return out


def first_difference(a, b) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def logit_gap(trained, module, params, ids, a: int, b: int) -> float:
    """|logit(a) - logit(b)| under ftc after `ids`: how close the two choices were."""
    import jax.numpy as jnp

    x = jnp.asarray([list(ids)], jnp.int32)
    logits = module.apply({"params": as_float32(params)}, x, attention_mask=jnp.ones_like(x))
    last = np.asarray(logits[0, -1], np.float32)
    return float(abs(last[a] - last[b]))


def greedy(trained, module, params, reference, tokenizer, stop_ids) -> dict:
    cases = prompts(trained, tokenizer)
    ours = ftc_greedy(trained, module, params, [c.ids for c in cases], stop_ids)
    theirs = reference_greedy(reference, [c.ids for c in cases], stop_ids)
    rows, ok = [], True
    for case, a, b in zip(cases, ours, theirs):
        row = {"prompt": case.text, "ftc": list(a), "loader": list(b)}
        i = first_difference(a, b)
        if i is not None:
            row["first_difference"] = i
            if i < len(a) and i < len(b):
                gap = logit_gap(trained, module, params, case.ids + tuple(a[:i]), a[i], b[i])
                row["ftc_logit_gap"] = gap
                row["tie"] = gap < TIE_GAP
                ok = ok and row["tie"]
            else:
                ok = False
        if tokenizer is not None:
            row["ftc_text"] = tokenizer.decode(list(a), skip_special_tokens=True)
        rows.append(row)
    return {"new_tokens": NEW_TOKENS, "stop_ids": list(stop_ids), "prompts": rows, "ok": ok}


def write(out: Path, certificate: dict) -> None:
    """Add the certificate to the export's ftc_export.json (atomically; process 0 only)."""
    if jax.process_index() != 0:
        return
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["certificate"] = certificate
    files.write_json_atomic(out / MANIFEST, manifest)


# ---------------------------------------------------------------- the whole certificate


def loader(trained, format: str) -> str:
    if format == "gguf":
        from ftc.backends.jax.io.gguf_export_format import loader_name

        return loader_name(trained.model)
    return {
        "peft": "PEFT (PeftModel.from_pretrained on the transformers base)",
        "adapters": "transformers + ftc.backends.torch_adapters",
    }.get(format, "transformers (from_pretrained)")


def certify(trained, result, check=None) -> dict:
    """Check the export `result` of `trained` (see the module docstring), write the certificate into
    its ftc_export.json and return it. `check`: the --verify result (None: no PyTorch checks)."""
    import tempfile

    from ftc.backends.jax.io.export_common import is_causal

    out = Path(result.out_dir)
    if jax.process_index() != 0:  # process 0 wrote the export and checks it
        return {"ok": True}
    cert = {"hashes": hashes(trained), "stops": stops(trained, out, result.format)}
    if check is not None and jax.process_count() > 1:
        cert["note"] = "a multi-process export: greedy continuations are checked in single-process exports"
    if check is not None:
        cert["logits"] = {
            "max_abs_diff": check.max_abs_diff,
            "allowed": check.threshold,
            "batch": list(check.shape[:2]),
            "loader": loader(trained, result.format),
            "ok": bool(np.isfinite(check.max_abs_diff)) and check.max_abs_diff <= check.threshold,
        }
        m = trained.model
        if is_causal(m.family) and m.family.cache_layout is not None and jax.process_count() == 1:
            exported = m.method.formats[result.format]
            module, params = exported.ftc_side(m, trained.params, result.dtype)
            if result.format == "gguf":  # the file's tensors are what ftc computed with, bit for bit
                from ftc.backends.jax.io.gguf_export_format import weights_check

                cert["weights"] = weights_check(m, out, params)
            tokenizer = None
            if trained.tokenizer_dir is not None:
                from ftc.backends.jax.stages import load_tokenizer

                tokenizer = load_tokenizer(trained.tokenizer_dir)
            stop_ids = [i for i in (cert["stops"].get("end_of_turn_id"), cert["stops"].get("eos_id")) if i is not None]
            with tempfile.TemporaryDirectory(prefix="ftc-certify-") as scratch:
                reference = exported.reload(trained, out, Path(scratch), True)
                cert["greedy"] = greedy(trained, module, params, reference, tokenizer, tuple(dict.fromkeys(stop_ids)))
            cert["greedy"]["loader"] = cert["logits"]["loader"]
    cert["ok"] = all(part.get("ok", True) for part in cert.values() if isinstance(part, dict))
    write(out, cert)
    return cert


def summary(cert: dict) -> str:
    """One line on the greedy continuations and the stop ids (what `ftc export --verify` prints)."""
    parts = []
    if "greedy" in cert:
        g = cert["greedy"]
        same = sum("first_difference" not in r for r in g["prompts"])
        ties = sum(bool(r.get("tie")) for r in g["prompts"])
        parts.append(
            f"greedy continuations ({g['new_tokens']} tokens, {len(g['prompts'])} prompts): {same} equal"
            + (f", {ties} parted at a near tie" if ties else "")
            + ("" if g["ok"] else f", DIFFERENT (first at token {_first(g)})")
        )
    if "weights" in cert:
        w = cert["weights"]
        parts.append(
            f"the file's {w['tensors']} tensors equal ftc's weights bit for bit"
            if w["ok"]
            else f"the file's weights DIFFER from ftc's (by {w['max_abs_diff']:.3g} at {w['at']}; "
            f"missing {w['missing']})"
        )
    s = cert["stops"]
    parts.append(
        "stop ids carried"
        if s["ok"]
        else f"stop ids NOT carried (eos {s.get('eos_id')}, end of turn {s.get('end_of_turn_id')})"
    )
    return "; ".join(parts) + f" (certificate in {MANIFEST})"


def _first(g: dict) -> str:
    row = next(r for r in g["prompts"] if "first_difference" in r and not r.get("tie"))
    return f"{row['first_difference']} of {row['prompt']!r}"


def carry_stop_ids(out: Path, tok_dir: Path | None) -> None:
    """generation_config.json's eos_token_id gets the chat template's end-of-turn id and the
    tokenizer's EOS (when missing), so a server stops where the trained model ends a turn."""
    gen = Path(out) / "generation_config.json"
    if tok_dir is None or not gen.is_file() or jax.process_index() != 0:
        return
    from ftc.backends.jax.io import gguf_export_vocab as vocab
    from ftc.backends.jax.stages import load_tokenizer

    tokenizer = load_tokenizer(tok_dir)
    wanted = [vocab.end_of_turn_id(tokenizer, getattr(tokenizer, "chat_template", None)), tokenizer.eos_token_id]
    config = json.loads(gen.read_text())
    eos = config.get("eos_token_id")
    have = [] if eos is None else (list(eos) if isinstance(eos, list) else [eos])
    add = [i for i in wanted if i is not None and i not in have]
    if add:
        config["eos_token_id"] = have + add if have or len(add) > 1 else add[0]
        files.write_json_atomic(gen, config)
