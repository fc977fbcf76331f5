"""spec/run_rules.py: what `ftc run` refuses only after the weights load (eval samples, regexes), refused
by lint first, by the same rules as the backend's (the corpus holds the refusals)."""

from ftc.spec import lint_file, run_rules
from ftc.spec.paths import NAMED_DATA_PREFIXES

SPEC = """name = "case"
[model]
base = "org/model"
[data]
format = "chat"
train = "{train}"
validation = "{train}"
[method]
kind = "lora"
targets = ["q_proj", "layers/v_proj", "(q|k)_proj"]
[eval]
samples = 2
regex = "answer: (\\\\d+)"
"""


def test_eval_samples_from_a_local_chat_file_and_valid_regexes_lint_clean(tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n')
    spec = tmp_path / "spec.toml"
    spec.write_text(SPEC.format(train=rows.name))
    assert lint_file(spec) == []


def test_the_rules_name_what_the_backend_reads():
    from ftc.backends.jax.data import sources
    from ftc.backends.jax.data.sources import hf_datasets
    from ftc.backends.jax.methods import lora_sites
    from ftc.spec import local_files

    assert run_rules._TARGET_NAME.pattern == lora_sites._NAME.pattern
    assert set(NAMED_DATA_PREFIXES) == set(sources.prefixes())
    assert local_files.SAVED_DATASET == hf_datasets.SAVED_FILES


SOURCES = ["hf:", "hf:a", "hf:a:b", "hf:a:b:c", "hf:a:b:c:d", "hf::b", "hf:a::c", "hf:a:", "tfds:", "tfds:a",
           "tfds:a:b", "tfds:a/b:c", "tfds::b", "tfds:a:", "tfds:a/b/c:d:e"]  # fmt: skip


def test_a_malformed_named_source_is_refused_by_lint_as_by_the_reader():
    from ftc.backends.jax.data.read import DataError
    from ftc.backends.jax.data.sources import hf_datasets, tfds

    for source in SOURCES:
        reader = hf_datasets if source.startswith("hf:") else tfds
        try:
            reader.parse(source)
            readable = True
        except DataError:
            readable = False
        assert (run_rules.named_source_problem(source) is None) == readable, source


def test_a_model_path_that_is_a_file_of_the_wrong_kind_is_an_error(tmp_path):
    """A path not there yet is a warning (the model may land later); a file that is not a .gguf
    never loads (model_source.py), and model.init_from is always a directory (init_from.py)."""
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    spec = tmp_path / "spec.toml"
    spec.write_text(
        'name = "case"\n[model]\nbase = "config.json"\ntokenizer = "model.gguf"\ninit_from = "model.gguf"\n'
        '[data]\nformat = "chat"\ntrain = "tfds:chat/default:train"\n'
    )
    errors = {i.key_path: i.message for i in lint_file(spec) if i.severity == "error"}
    assert errors == {
        "model.base": f"{tmp_path / 'config.json'} is a file; expected a Hugging Face directory "
        "(config.json + *.safetensors) or a .gguf file",
        "model.init_from": f"{tmp_path / 'model.gguf'} is a file; expected a directory: a run, an export or a "
        "Hugging Face directory",
    }
