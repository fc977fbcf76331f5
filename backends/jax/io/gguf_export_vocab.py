"""The tokenizer half of a GGUF export: HF tokenizer files -> `tokenizer.ggml.*` metadata, the chat
template, the EOS / end-of-turn ids, and Ollama's TEMPLATE made from the chat template.

Byte-level BPE tokenizers (GPT-2 style: SmolLM, Llama 3, Qwen2/3, Mistral's Tekken) are written as
llama.cpp's `gpt2` tokenizer model: every token by id (padded with [PADi] up to the model's vocab
size, as convert_hf_to_gguf.py does), merges, token types (special added tokens CONTROL, other added
tokens USER_DEFINED). `tokenizer.ggml.pre`, llama.cpp's name for the pre-tokenizer's split rules, is
the source GGUF's when the base came from one, else found from the pre-tokenizer's regex (PRE_NAMES);
one it does not know is written as "default" and reported (llama.cpp then splits by its own rules).

The end-of-turn token is what the chat template writes right after an assistant message's text
(<|im_end|> for ChatML, <|eot_id|> for Llama 3): a served model stops there only if it is an EOG
token, so it is written as tokenizer.ggml.eot_token_id and as an Ollama stop parameter.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5


class GgufExportError(ValueError):
    """A model ftc cannot write as GGUF (no llama.cpp layout, a setting llama.cpp would not compute,
    a tokenizer GGUF cannot hold)."""


_GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
# The pre-tokenizer's split regex (tokenizer.json) -> llama.cpp's pre-tokenizer (llama-vocab.cpp).
PRE_NAMES = {
    (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
        r"\s+(?!\S)|\s+"
    ): "llama-bpe",
    (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
        r"\s+(?!\S)|\s+"
    ): "qwen2",
    "byte-level": "gpt-2",  # ByteLevel(use_regex=True) alone: GPT-2's own regex
    "digits+byte-level": "smollm",  # Digits(individual) then ByteLevel: SmolLM / SmolLM2
}
_PLACEHOLDER = "\x01{}\x01"


@dataclasses.dataclass(frozen=True)
class Vocab:
    tokens: tuple[str, ...]
    types: tuple[int, ...]
    merges: tuple[str, ...]
    pre: str  # "default" when PRE_NAMES does not know the pre-tokenizer (the certificate says so)
    bos_id: int | None
    eos_id: int | None
    eot_id: int | None  # the chat template's end of an assistant turn
    pad_id: int | None
    add_bos: bool
    chat_template: str | None
    pieces: TurnPieces | None  # the chat template split per message (Ollama's TEMPLATE), None: it does not split

    def stop_ids(self) -> tuple[int, ...]:
        return tuple(dict.fromkeys(i for i in (self.eot_id, self.eos_id) if i is not None))

    def stop_texts(self) -> tuple[str, ...]:
        return tuple(self.tokens[i] for i in self.stop_ids())


def _pre_key(pre: dict | None) -> str | None:
    """A PRE_NAMES key for a tokenizer.json pre_tokenizer, or None."""
    if not pre:
        return None
    kind = pre.get("type")
    if kind == "ByteLevel":
        return "byte-level" if pre.get("use_regex", True) else None
    if kind == "Split":
        return (pre.get("pattern") or {}).get("Regex")
    if kind == "Sequence":
        parts = pre.get("pretokenizers") or []
        if len(parts) == 2 and parts[0].get("type") == "Digits" and parts[0].get("individual_digits"):
            return "digits+" + (_pre_key(parts[1]) or "?")
        if len(parts) == 2 and parts[1].get("type") == "ByteLevel" and not parts[1].get("use_regex", True):
            return _pre_key(parts[0])
    return None


def _token_id(tokenizer, value) -> int | None:
    text = value.get("content") if isinstance(value, dict) else value
    if not text:
        return None
    i = tokenizer.convert_tokens_to_ids(text)
    return i if isinstance(i, int) and i != tokenizer.unk_token_id else None


def _source_pre(source_gguf: Path | None) -> str | None:
    if source_gguf is None:
        return None
    from gguf import GGUFReader

    field = GGUFReader(str(source_gguf)).fields.get("tokenizer.ggml.pre")
    return field.contents() if field is not None else None


def read_vocab(tokenizer_dir: Path, vocab_size: int, *, source_gguf: Path | None = None) -> Vocab:
    """The GGUF tokenizer fields of the HF tokenizer files in `tokenizer_dir` (see the docstring)."""
    from ftc.backends.jax.stages import load_tokenizer

    path = Path(tokenizer_dir) / "tokenizer.json"
    if not path.is_file():
        raise GgufExportError(f"{tokenizer_dir}: no tokenizer.json; a GGUF export needs a fast (tokenizers) tokenizer")
    spec = json.loads(path.read_text(encoding="utf-8"))
    model = spec.get("model") or {}
    byte_level = (
        "ByteLevel" in json.dumps(spec.get("pre_tokenizer")) or (spec.get("decoder") or {}).get("type") == "ByteLevel"
    )
    if model.get("type") != "BPE" or not byte_level:
        raise GgufExportError(
            f"{path}: a {model.get('type')} tokenizer{' with byte fallback' if model.get('byte_fallback') else ''}; "
            "ftc writes GGUF tokenizers for byte-level BPE (GPT-2 style) only"
        )
    tokenizer = load_tokenizer(Path(tokenizer_dir))
    by_id = {i: t for t, i in model.get("vocab", {}).items()}
    kinds = {}
    for added in spec.get("added_tokens") or []:
        by_id[added["id"]] = added["content"]
        kinds[added["id"]] = CONTROL if added.get("special") else USER_DEFINED
    if by_id and max(by_id) >= vocab_size:
        raise GgufExportError(
            f"{path}: token id {max(by_id)} but the model embeds {vocab_size} tokens; "
            "the GGUF would hold ids it cannot run"
        )
    tokens = tuple(by_id.get(i, f"[PAD{i}]") for i in range(vocab_size))
    types = tuple(kinds.get(i, NORMAL if i in by_id else UNUSED) for i in range(vocab_size))
    merges = tuple(" ".join(m) if isinstance(m, list) else m for m in model.get("merges") or ())
    pre = _source_pre(source_gguf)
    pre = pre or PRE_NAMES.get(_pre_key(spec.get("pre_tokenizer")), "default")
    bos_id = _token_id(tokenizer, tokenizer.bos_token)
    eos_id = _token_id(tokenizer, tokenizer.eos_token)
    pad_id = _token_id(tokenizer, tokenizer.pad_token)
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    template = getattr(tokenizer, "chat_template", None) or None
    return Vocab(
        tokens=tokens,
        types=types,
        merges=merges,
        pre=pre,
        bos_id=bos_id,
        eos_id=eos_id,
        eot_id=end_of_turn_id(tokenizer, template),
        pad_id=pad_id,
        add_bos=bool(probe) and bos_id is not None and probe[0] == bos_id,
        chat_template=template if isinstance(template, str) else None,
        pieces=turn_pieces(tokenizer, template),
    )


def add_to_writer(w, v: Vocab) -> None:
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(v.pre)
    w.add_token_list(list(v.tokens))
    w.add_token_types(list(v.types))
    w.add_token_merges(list(v.merges))
    for add, value in (
        (w.add_bos_token_id, v.bos_id),
        (w.add_eos_token_id, v.eos_id),
        (w.add_eot_token_id, v.eot_id),
        (w.add_pad_token_id, v.pad_id),
    ):
        if value is not None:
            add(value)
    w.add_add_bos_token(v.add_bos)
    if v.chat_template:
        w.add_chat_template(v.chat_template)


# ---------------------------------------------------------------- the chat template


def _render(tokenizer, messages, generation: bool) -> str | None:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
    except Exception:  # jinja errors, raise_exception() for role orders a template refuses
        return None


def end_of_turn_id(tokenizer, template) -> int | None:
    """The token the chat template writes right after an assistant message's text, or None."""
    if not isinstance(template, str):
        return None
    answer = "ZQXJ answer"
    text = _render(tokenizer, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": answer}], False)
    if not text or answer not in text:
        return None
    after = text[text.rindex(answer) + len(answer) :]
    ids = tokenizer(after, add_special_tokens=False)["input_ids"]
    specials = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    return ids[0] if ids and ids[0] in specials else None


@dataclasses.dataclass(frozen=True)
class TurnPieces:
    """The chat template as text around each message: what Ollama's Go template is made of."""

    default_prefix: str  # written first when the conversation has no system message (a default system prompt)
    around: dict  # role -> (text before the content, text after it)
    generation_prompt: str  # what opens the assistant's turn


ROLES = ("system", "user", "assistant")


def turn_pieces(tokenizer, template) -> TurnPieces | None:
    """Split the template's rendering of a system / user / assistant conversation into pieces,
    message by message (each rendering of the first k messages must extend the one before)."""
    if not isinstance(template, str):
        return None
    messages = [{"role": r, "content": _PLACEHOLDER.format(r)} for r in ROLES]
    around, before = {}, ""
    for k, role in enumerate(ROLES, 1):
        text = _render(tokenizer, messages[:k], False)
        if text is None or not text.startswith(before):
            return None
        block = text[len(before) :]
        mark = _PLACEHOLDER.format(role)
        if block.count(mark) != 1:
            return None
        around[role] = tuple(block.split(mark))
        before = text
    with_prompt = _render(tokenizer, messages[:2], True)
    plain = _render(tokenizer, messages[:2], False)
    no_system = _render(tokenizer, messages[1:2], False)
    if not (with_prompt and plain and no_system and with_prompt.startswith(plain)):
        return None
    user_block = around["user"][0] + _PLACEHOLDER.format("user") + around["user"][1]
    if not no_system.endswith(user_block):
        return None
    return TurnPieces(no_system[: -len(user_block)], around, with_prompt[len(plain) :])


def render_pieces(pieces: TurnPieces, messages, generation: bool) -> str:
    """What the Go template made from `pieces` renders (the test compares it with the chat template)."""
    out = pieces.default_prefix if not messages or messages[0]["role"] != "system" else ""
    for m in messages:
        pre, post = pieces.around[m["role"]]
        out += pre + m["content"] + post
    return out + (pieces.generation_prompt if generation else "")


def _go(text: str) -> str:
    """Literal text inside a Go template ("{{" would open an action)."""
    return text.replace("{{", '{{ "{{" }}')


def ollama_template(v: Vocab) -> str | None:
    """The chat template as an Ollama TEMPLATE (Go text/template over .Messages), or None when the
    template does not split into per-message pieces (Ollama then falls back to its own detection).
    One line, no "{{-": trimming would eat the newlines the chat template writes."""
    p = v.pieces
    if p is None:
        return None
    out = ""
    if p.default_prefix:  # the template's default system prompt, written when there is no system message
        out = '{{ if or (not .Messages) (ne (index .Messages 0).Role "system") }}' + _go(p.default_prefix) + "{{ end }}"
    out += "{{ range $i, $_ := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}"
    for n, role in enumerate(ROLES):
        pre, post = p.around[role]
        out += ("{{ if" if n == 0 else "{{ else if") + f' eq .Role "{role}" }}}}{_go(pre)}{{{{ .Content }}}}{_go(post)}'
    out += "{{ end }}"
    out += '{{ if and $last (ne .Role "assistant") }}' + _go(p.generation_prompt) + "{{ end }}{{ end }}"
    return out
