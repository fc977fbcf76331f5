"""The schema: valid 2020-12, documented on every key, closed everywhere, and holding the key
names, types and defaults that the rest of ftc is written against."""

import dataclasses

import jsonschema
import pytest

from ftc.schemas import load_schema
from ftc.spec import model
from ftc.spec.schema_walk import object_paths, types_of

SCHEMA = load_schema()

# Keys with no default: required, or unset until given (None in the Spec).
NO_DEFAULT = {
    "$schema",
    "name",
    "model",
    "data",
    "description",
    "extends",
    "model.base",
    "model.tokenizer",
    "model.init_from",
    "data.format",
    "data.train",
    "data.validation",
    "data.labels",
    "training.steps",
    "training.micro_batch_size",
    "training.schedule.warmup_steps",
    "training.router_aux_loss_coef",
    "logging.peak_tflops",
    "eval.regex",
}


def _leaves():
    for path, node in object_paths().items():
        for key, child in node["properties"].items():
            yield ".".join(path + (key,)), child


def test_schema_is_valid_against_the_2020_12_meta_schema():
    assert SCHEMA["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(SCHEMA)


def test_every_object_is_closed_and_every_key_has_description_type_example_and_default():
    for path, node in object_paths().items():
        assert node.get("additionalProperties") is False, path
    for key, node in _leaves():
        assert node.get("description"), key
        assert types_of(node), key
        assert node.get("examples"), key
        assert ("default" in node) != (key in NO_DEFAULT), key
        in_context = {**node, "$defs": SCHEMA.get("$defs", {})}  # a key's `$ref`s point into the root's $defs
        if "default" in node:
            jsonschema.validate(node["default"], in_context)
        for example in node["examples"]:
            if not isinstance(example, dict):
                jsonschema.validate(example, in_context)


# spec_keys.md: the contract other modules are coded against (name, JSON type, default).
CONTRACT = [
    ("ftc", "integer", 1),
    ("name", "string", None),
    ("description", "string", None),
    ("output_dir", "string", "runs"),
    ("model.base", "string", None),
    ("model.tokenizer", "string", None),
    ("model.dtype", "string", "bfloat16"),
    ("model.param_dtype", "string", "float32"),
    ("model.max_seq_len", "integer", 2048),
    ("model.init_from", "string", None),
    ("data.format", "string", None),
    ("data.validation", "string", None),
    ("data.validation_split", "number", 0.0),
    ("data.packing", "boolean", True),
    ("data.train_on", "string", "assistant"),
    ("data.shuffle", "boolean", True),
    ("data.on_bad_row", "string", "error"),
    ("data.labels", "array", None),
    ("data.clean.dedupe", "boolean", True),
    ("data.clean.drop_empty", "boolean", True),
    ("data.clean.roles", "array", ["system", "user", "assistant", "tool"]),
    ("data.clean.unknown_roles", "string", "error"),
    ("data.clean.overlong", "string", "truncate"),
    ("method.kind", "string", "full"),
    ("method.rank", "integer", 16),
    ("method.alpha", "number", 32),
    ("method.dropout", "number", 0.0),
    ("method.rslora", "boolean", False),
    ("method.targets", "string", "all-linear"),
    ("method.quant_block_size", "integer", 64),
    ("method.double_quant", "boolean", False),
    ("method.placement", "string", "pfeiffer"),
    ("method.reduction_factor", "integer", 16),
    ("method.non_linearity", "string", "relu"),
    ("method.pooling", "string", "mean"),
    ("method.head", "string", "linear"),
    ("method.head_hidden", "integer", 256),
    ("training.objective", "string", "sft"),
    ("training.epochs", "integer", 1),
    ("training.steps", "integer", None),
    ("training.batch_size", "integer", 8),
    ("training.micro_batch_size", "integer", None),
    ("training.learning_rate", "number", 2e-5),
    ("training.seed", "integer", 0),
    ("training.eval_every", "integer", 0),
    ("training.log_every", "integer", 10),
    ("training.remat", "string", "none"),
    ("training.dpo_beta", "number", 0.1),
    ("training.dpo_loss_type", "string", "sigmoid"),
    ("training.dpo_label_smoothing", "number", 0.0),
    ("training.orpo_beta", "number", 0.1),
    ("training.schedule.kind", "string", "cosine"),
    ("training.schedule.warmup_steps", "integer", None),
    ("training.schedule.warmup_ratio", "number", 0.0),
    ("training.schedule.min_lr_ratio", "number", 0.0),
    ("training.optimizer.kind", "string", "adamw"),
    ("training.optimizer.weight_decay", "number", 0.0),
    ("training.optimizer.beta1", "number", 0.9),
    ("training.optimizer.beta2", "number", 0.999),
    ("training.optimizer.eps", "number", 1e-8),
    ("training.optimizer.momentum", "number", 0.0),
    ("training.optimizer.grad_clip", "number", 1.0),
    ("mesh.data", "integer", 1),
    ("mesh.fsdp", "integer", -1),
    ("mesh.tensor", "integer", 1),
    ("mesh.expert", "integer", 1),
    ("checkpoint.every", "integer", 0),
    ("checkpoint.keep", "integer", 3),
    ("checkpoint.async", "boolean", True),
    ("export.format", "string", "hf"),
    ("export.dtype", "string", "bfloat16"),
    ("export.verify", "boolean", False),
    ("export.targets", "array", []),
    ("logging.tensorboard", "boolean", True),
    ("logging.progress", "boolean", True),
    ("eval.samples", "integer", 0),
    ("eval.max_new_tokens", "integer", 128),
]
ENUMS = {
    "model.dtype": {"float32", "bfloat16", "float16"},
    "model.param_dtype": {"float32", "bfloat16"},
    "data.format": {"chat", "completion", "text", "preference", "classification", "sharegpt", "alpaca", "prompt"},
    "method.kind": {"full", "lora", "qlora", "adapter", "probe"},
    "training.objective": {"sft", "dpo", "orpo", "classify", "grpo", "ppo"},
    "training.dpo_loss_type": {"sigmoid", "hinge", "ipo", "robust"},
    "training.remat": {"none", "full", "dots"},
    "training.optimizer.kind": {"adamw", "adafactor", "sgd"},
    "training.schedule.kind": {"constant", "linear", "cosine"},
    "export.format": {"hf", "peft", "adapters", "gguf"},
    "export.dtype": {"float32", "bfloat16", "float16", "q8_0", "q4_0"},
    "method.placement": {"houlsby", "pfeiffer"},
    "method.non_linearity": {"relu", "gelu", "silu", "tanh"},
    "method.pooling": {"mean", "cls", "last"},
    "method.head": {"linear", "mlp"},
    "data.on_bad_row": {"skip", "error"},
    "data.train_on": {"assistant", "all"},
    "data.clean.unknown_roles": {"drop", "error"},
    "data.clean.overlong": {"truncate", "drop", "split", "error"},
}


@pytest.mark.parametrize("key, json_type, default", CONTRACT)
def test_contract_key_has_its_name_type_and_default(key, json_type, default):
    node = dict(_leaves())[key]
    assert json_type in types_of(node)
    assert node.get("default") == default
    if key in ENUMS:
        assert set(node["enum"]) == ENUMS[key]


def test_the_logging_rate_lives_in_training_only():
    assert "every" not in SCHEMA["properties"]["logging"]["properties"]
    assert "log_every" in SCHEMA["properties"]["training"]["properties"]


def test_spec_dataclasses_have_one_attribute_per_schema_key():
    sections = {
        (): model.Spec,
        ("model",): model.ModelSpec,
        ("data",): model.DataSpec,
        ("data", "clean"): model.CleanSpec,
        ("method",): model.MethodSpec,
        ("training",): model.TrainingSpec,
        ("training", "schedule"): model.ScheduleSpec,
        ("training", "optimizer"): model.OptimizerSpec,
        ("mesh",): model.MeshSpec,
        ("checkpoint",): model.CheckpointSpec,
        ("export",): model.ExportSpec,
        ("logging",): model.LoggingSpec,
        ("eval",): model.EvalSpec,
    }
    assert set(sections) == set(object_paths())
    not_keys = {"source", "extends", "warnings"}
    for path, cls in sections.items():
        keys = set(object_paths()[path]["properties"]) - {"$schema", "extends"}
        fields = {model._key(f.name) for f in dataclasses.fields(cls)} - not_keys
        assert fields == keys, path
