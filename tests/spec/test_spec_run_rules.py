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
    from ftc.backends.jax.methods import lora_sites

    assert run_rules._TARGET_NAME.pattern == lora_sites._NAME.pattern
    assert set(NAMED_DATA_PREFIXES) == set(sources.prefixes())


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
