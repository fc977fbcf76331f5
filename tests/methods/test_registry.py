"""The method registry: one record per kind, the schema's kinds, and a new method is one module
plus one registry line, picked up by build_model, the counts and `ftc export`'s format check."""

from __future__ import annotations

import dataclasses
import math
import textwrap

import jax
import numpy as np
import pytest
import train_testlib as tl
from flax import traverse_util
from method_testlib import config as method_config
from method_testlib import method_spec

from ftc.backends.jax import methods as registry
from ftc.backends.jax.io import export as export_lib
from ftc.backends.jax.methods import adapter as adapters
from ftc.backends.jax.methods import base as methods
from ftc.backends.jax.methods import lora
from ftc.backends.jax.methods.intercept import Intercepted
from ftc.backends.jax.models.shapes import path_str
from ftc.backends.jax.state import frozen_base
from ftc.spec import SpecError, schema_walk, spec_from_dict
from ftc.spec.model import MethodSpec


def test_registry_kinds_are_the_schemas_method_kind_enum_in_order():
    assert list(registry.kinds()) == schema_walk.node_at(("method", "kind"))["enum"]
    for kind in registry.kinds():
        assert registry.get(kind).kind == kind
    with pytest.raises(ValueError, match="method.kind='dora': expected one of full, lora, qlora, adapter, probe"):
        registry.get("dora")


def test_spec_accepts_an_export_format_exactly_when_the_methods_record_lists_it():
    every = schema_walk.node_at(("export", "format"))["enum"]
    assert sorted({f for k in registry.kinds() for f in registry.get(k).formats}) == sorted(every)
    for kind in registry.kinds():
        for fmt in every:
            probe = kind == "probe"
            data = {
                "ftc": 1,
                "name": "x",
                "model": {"base": "./m"},
                "method": {"kind": kind},
                "data": {"format": "classification" if probe else "chat", "train": "t.jsonl"},
                "training": {"objective": "classify" if probe else "sft"},
                "export": {"format": fmt},
            }
            try:
                spec_from_dict(data, "/nonexistent")
                refused = False
            except SpecError as e:
                refused = any(i.key_path == "export.format" for i in e.issues)
            assert refused == (fmt not in registry.get(kind).formats), (kind, fmt)


def test_lora_qlora_and_adapters_are_one_interception_wrapper():
    hf_config = tl.tiny_llama_config()
    spec = tl.spec()
    for kind, keys in (("lora", {"rank": 4}), ("qlora", {"quant_block_size": 32}), ("adapter", {})):
        model = methods.build_model(hf_config, dataclasses.replace(spec, method=method_spec(kind, **keys)))
        assert type(model.module) is Intercepted and model.module.base is model.base, kind
        assert model.plan is model.module.plan
    full = methods.build_model(hf_config, spec)
    assert full.module is full.base and full.plan is None  # full: the family's module itself
    lora_model = methods.build_model(hf_config, dataclasses.replace(spec, method=method_spec("lora", dropout=0.1)))
    assert lora_model.eval_module.deterministic and not lora_model.module.deterministic


# ---------------------------------------------------------------- a method added in a module of its own


TOY_METHOD = textwrap.dedent('''
    """A toy method: train the norm weights only, the model run through a pass-through interceptor."""
    import dataclasses

    from ftc.backends.jax.methods import full
    from ftc.backends.jax.methods.contract import Method
    from ftc.backends.jax.methods.intercept import Intercepted


    @dataclasses.dataclass(frozen=True)
    class NormsConfig:
        kind: str


    def _pass_through(plan, deterministic):
        return lambda next_fun, args, kwargs, context: next_fun(*args, **kwargs)


    METHOD = Method(
        kind="norms",
        config=lambda method: NormsConfig(method.kind),
        trainable=lambda path: path.endswith("norm/weight"),
        detail=lambda model: f"norm weights only ({model.plan})",
        formats={"hf": full.METHOD.formats["hf"]},
        transform=lambda family, arch, base, config: Intercepted(base, f"plan of {config.kind}", _pass_through),
    )
''')


@pytest.fixture
def toy_registered(tmp_path, monkeypatch):
    (tmp_path / "ftc_toy_norms_method.py").write_text(TOY_METHOD)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(registry.MODULES, "norms", "ftc_toy_norms_method")
    return registry.get("norms")


def test_a_method_in_a_module_of_its_own_is_picked_up_by_build_model_counts_and_export(toy_registered):
    assert "norms" in registry.kinds() and toy_registered.kind == "norms"
    hf_config = tl.tiny_llama_config()
    spec = dataclasses.replace(tl.spec(), method=MethodSpec(kind="norms"))
    model = methods.build_model(hf_config, spec)
    assert (model.kind, model.config.kind, model.plan) == ("norms", "norms", "plan of norms")
    assert type(model.module) is Intercepted and model.eval_module is model.module

    abstract = methods.abstract_params(model, "float32")
    full = methods.build_model(hf_config, tl.spec())
    flat = traverse_util.flatten_dict(abstract, sep="/")
    assert flat.keys() == traverse_util.flatten_dict(methods.abstract_params(full, "float32"), sep="/").keys()
    norms = {k: math.prod(v.shape) for k, v in flat.items() if k.endswith("norm/weight")}
    assert len(norms) == 3  # input and post-attention norms (stacked over layers) and the final norm
    counts = methods.method_counts(model, abstract)
    assert (counts.kind, counts.trainable) == ("norms", sum(norms.values()))
    assert counts.total == sum(math.prod(v.shape) for v in flat.values())
    assert counts.base_bytes == 4 * (counts.total - counts.trainable)
    assert counts.lines()[0].startswith("method norms: norm weights only (plan of norms); trains ")
    assert methods.trainable_predicate("norms") is toy_registered.trainable

    params = jax.tree.map(lambda s: np.ones(s.shape, s.dtype), abstract)
    assert methods.init_method_params(model, params, seed=0) is params  # no init_params: the base as it is
    assert methods.disabled_params(model, params) is params  # not zero_is_base: no reference by disabling

    export_lib.check_format("norms", "hf", "float32")
    with pytest.raises(export_lib.ExportError, match="export format 'peft' does not apply to method.kind 'norms'"):
        export_lib.check_format("norms", "peft", "float32")


def test_init_from_directories_are_read_by_the_methods_that_say_so():
    assert methods.kinds_reading({"peft_type": "LORA"}) == ("lora", "qlora")
    assert methods.kinds_reading({"format": adapters.FORMAT}) == ("adapter",)
    assert methods.kinds_reading({"format": "something else"}) == ()
    assert registry.get("adapter").init_subdir == adapters.HF_SUBDIR
    assert registry.get("lora").load_trained is lora.METHOD.load_trained


def test_method_configs_take_every_value_from_the_resolved_spec():
    """No config restates a schema default: a key the spec leaves unset is a refusal, not a silent value."""
    c = method_config(lora.LoraConfig, "lora")
    default = {k: v["default"] for k, v in schema_walk.node_at(("method",))["properties"].items() if "default" in v}
    assert (c.rank, c.alpha, c.dropout, c.rslora, c.targets) == tuple(
        default[k] for k in ("rank", "alpha", "dropout", "rslora", "targets")
    )
    with pytest.raises(ValueError, match=r"\[method\].rank=None"):
        lora.LoraConfig.from_spec(MethodSpec(kind="lora"))
    with pytest.raises(TypeError):
        lora.LoraConfig()  # no defaults of its own
    with pytest.raises(TypeError):
        adapters.AdapterConfig()


def test_qlora_record_names_the_leaves_kept_in_their_own_dtype_and_in_checkpoints():
    """NF4 storage keeps its dtypes (abstract_params); its second level is saved like what trains,
    as frozen_base.saved_leaf reads it."""
    spec = dataclasses.replace(tl.spec(), method=method_spec("qlora", quant_block_size=32, double_quant=True))
    model = methods.build_model(tl.tiny_llama_config(), spec)
    record = model.method
    leaves = jax.tree_util.tree_flatten_with_path(methods.abstract_params(model, "bfloat16"))[0]
    assert any(record.saved_frozen(path_str(p)) for p, _ in leaves)
    for p, leaf in leaves:
        path = path_str(p)
        assert (leaf.dtype != np.dtype("bfloat16")) == record.own_dtype(path), path
        assert frozen_base.saved_leaf(path, record) == (record.trainable(path) or record.saved_frozen(path))
