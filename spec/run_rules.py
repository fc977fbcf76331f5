"""Rules the JAX backend enforces only once a run is under way (as it builds the model, reads the
data, or after the weights load, minutes in), checked at lint time too: a spec that lints clean
should not fail there on a ground that no config.json or data file decides. Over a default-filled spec dict, (key path,
message, severity) for each problem, as targets.py and rl.py give them.

eval.samples   backends/jax/generate/in_run.py: samples are the first chat or completion rows of a
               data.validation file (not a named source); a probe generates nothing
eval.regex     backends/jax/generate/metrics.py compile_regex (also `ftc eval`'s default --regex)
method.targets backends/jax/methods/lora_sites.py: an entry that is not a module name is a regex;
               "all-linear" stands alone
data sources   backends/jax/data/sources/{hf_datasets,tfds}.py `parse`: the form of hf: and tfds: names
model paths    backends/jax/io/model_source.py: a file is a model (or tokenizer) only as a .gguf;
               state/init_from.py: model.init_from is a directory
any path       no file name holds a NUL character (open() raises "embedded null byte")
data.clean     backends/jax/data/clean.py, formats/chat.py: a chat row is trained on for its assistant
               turns, so roles without "assistant" leave no row (found only once the data is read)
Never imports jax: `ftc lint` stays light.
"""

from __future__ import annotations

import os
import re

from ftc.spec import schema_walk
from ftc.spec.local_files import shown_path, value_at
from ftc.spec.paths import NAMED_DATA_PREFIXES

GENERATION_FORMATS = ("chat", "completion")  # in_run.py: rows with a prompt and a reference answer
# model keys: the suffix a local file may have (None: no file will do), and what is expected
MODEL_FILE_KEYS = {
    "base": (".gguf", "a Hugging Face directory (config.json + *.safetensors) or a .gguf file"),
    "tokenizer": (".gguf", "a directory with the tokenizer files or a .gguf file"),
    "init_from": (None, "a directory: a run, an export or a Hugging Face directory"),
}
NUL_MESSAGE = "a path cannot hold a NUL character (\\0)"  # validate.py drops other lines on such a key
CHAT_FORMATS = ("chat", "sharegpt")  # formats/sharegpt.py is chat's with another normalise
RL_OBJECTIVES = ("grpo", "ppo")  # rl.py refuses eval.samples for these, with its own reason
# lora_sites.py `_NAME`: an entry of these characters (or with '/' between them) is a module name.
_TARGET_NAME = re.compile(r"^[A-Za-z0-9_.]+$")


def issues(s: dict) -> list[tuple[tuple, str, str]]:
    problems = (
        *_eval_problems(s),
        *_target_problems(s),
        *_source_problems(s),
        *_model_file_problems(s),
        *_nul_in_paths(s),
        *_roles_problems(s),
    )
    return [(path, message, "error") for path, message in problems]


def _eval_problems(s: dict) -> list[tuple[tuple, str]]:
    out = []
    regex = value_at(s, ("eval", "regex"))
    if isinstance(regex, str) and (why := _regex_problem(regex)):
        out.append((("eval", "regex"), why))
    n = value_at(s, ("eval", "samples"))
    objective = value_at(s, ("training", "objective"))
    if isinstance(n, bool) or not isinstance(n, (int, float)) or n <= 0 or objective in RL_OBJECTIVES:  # 2.0 is 2
        return out
    fmt, validation = value_at(s, ("data", "format")), value_at(s, ("data", "validation"))
    if objective == "classify":
        why = "training.objective 'classify' trains a probe, which generates no text; remove it"
    elif fmt not in GENERATION_FORMATS:
        why = f"data.format is {fmt!r} (samples need chat or completion rows); remove it"
    elif not isinstance(validation, str):
        why = "there is no data.validation file to take prompts from (a validation_split's rows are not kept)"
    elif validation.startswith(NAMED_DATA_PREFIXES):
        why = f"data.validation is a named source ({validation}); samples are read from JSONL files"
    else:
        return out
    out.append((("eval", "samples"), why))
    return out


def _target_problems(s: dict) -> list[tuple[tuple, str]]:
    targets = value_at(s, ("method", "targets"))
    if not isinstance(targets, list):
        return []
    out = []
    for i, target in enumerate(targets):
        if target == "all-linear" and len(targets) > 1:  # select_targets: the whole set or a choice, not both
            out.append((("method", "targets", i), '"all-linear" must be given alone, not beside other targets'))
        name = isinstance(target, str) and (
            _TARGET_NAME.match(target) or ("/" in target and _TARGET_NAME.match(target.replace("/", "")))
        )
        if isinstance(target, str) and not name and (why := _regex_problem(target)):
            out.append((("method", "targets", i), why))
    return out


def _source_problems(s: dict) -> list[tuple[tuple, str]]:
    train = value_at(s, ("data", "train"))
    sources = [(("data", "train"), train)] if isinstance(train, str) else []
    sources += [(("data", "train", i), x) for i, x in enumerate(train)] if isinstance(train, list) else []
    sources.append((("data", "validation"), value_at(s, ("data", "validation"))))
    return [(path, why) for path, x in sources if isinstance(x, str) and (why := named_source_problem(x))]


def named_source_problem(source: str) -> str | None:
    """Why a named data source is malformed, or None: lint's check and the backend's `parse`
    (data/sources/hf_datasets.py, tfds.py) use this one rule."""
    if source.startswith("hf:"):
        parts = source[len("hf:") :].split(":")
        if not parts[0] or len(parts) > 3 or not all(parts):
            return f"{source!r}: expected hf:NAME, hf:NAME:SPLIT or hf:NAME:CONFIG:SPLIT"
    elif source.startswith("tfds:"):
        name, sep, split = source[len("tfds:") :].rpartition(":")
        if not sep or not name or not split:
            return f"{source!r}: expected tfds:name/config:split (or tfds:name:split)"
    return None


def _model_file_problems(s: dict) -> list[tuple[tuple, str]]:
    # A path that does not exist yet is local_files.py's warning; one that is a file of the wrong kind
    # cannot become a model by waiting.
    out = []
    for key, (suffix, expected) in MODEL_FILE_KEYS.items():
        value = value_at(s, ("model", key))
        if isinstance(value, str) and os.path.isabs(value) and os.path.isfile(value):
            if not (suffix and value.lower().endswith(suffix)):
                out.append((("model", key), f"{shown_path(value)} is a file; expected {expected}"))
    return out


def _nul_in_paths(value, path: tuple = ()) -> list[tuple[tuple, str]]:
    if isinstance(value, str):
        if "\0" not in value:
            return []
        # a list of paths (data.train) has the annotation on the list, not on its items
        nodes = (
            schema_walk.node_at(path),
            schema_walk.node_at(path[:-1]) if path and isinstance(path[-1], int) else None,
        )
        return [(path, NUL_MESSAGE)] if any(n and n.get("x-ftc-path") for n in nodes) else []
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    return [p for key, child in items for p in _nul_in_paths(child, path + (key,))]


def _roles_problems(s: dict) -> list[tuple[tuple, str]]:
    roles = value_at(s, ("data", "clean", "roles"))
    chat = value_at(s, ("data", "format")) in CHAT_FORMATS and value_at(s, ("data", "train_on")) == "assistant"
    if not chat or not isinstance(roles, list) or "assistant" in roles:
        return []
    why = "with train_on = 'assistant' no chat row is left (its assistant turns are an unknown role, or it has none)"
    return [(("data", "clean", "roles"), f"leaves out 'assistant': {why}; add 'assistant'")]


def _regex_problem(pattern: str) -> str | None:
    try:
        re.compile(pattern)
    except re.error as e:
        return f"{pattern!r} is not a valid regular expression: {e}"
    return None
