"""The spec tests name models by made-up HF ids; lint warns about an id missing from the local HF
cache, so these tests run with a hub cache that holds them (tests/spec/test_spec_local_files.py
checks the warning itself)."""

import pytest
from hf_cache_testlib import cache_model

CACHED_IDS = ("org/model", "o/m", "a/b", "org/name", "HuggingFaceTB/SmolLM2-135M-Instruct")


@pytest.fixture(autouse=True)
def hub_cache_with_the_test_ids(tmp_path_factory, monkeypatch):
    cache = tmp_path_factory.getbasetemp() / "hf-hub-cache-for-spec-tests"
    if not cache.exists():
        for repo in CACHED_IDS:
            cache_model(cache, repo)
        cache_model(cache, "org/name", "v1.0")
        cache_model(cache, "org/name", files=("config.json", "model.Q4_1.gguf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache
