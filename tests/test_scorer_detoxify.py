"""DetoxifyScorer loads a tiny local BERT checkpoint through detoxify's own Detoxify class, fully offline."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("detoxify")

from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast  # noqa: E402

from loralens.lens.evaluation.scorers.detoxify_scorer import DetoxifyScorer  # noqa: E402

os.environ["HF_HUB_OFFLINE"] = "1"

# detoxify's 'original' checkpoint class names, and the standardised names Detoxify reports for them.
CLASSES = ["toxic", "severe_toxic", "obscene", "threat", "insult", "identity_hate"]
LABELS = ("toxicity", "severe_toxicity", "obscene", "threat", "insult", "identity_attack")
WORDS = "you are a nice good bad idiot day the stupid kind person hello world what".split()
TEXTS = [
    "you are a nice person",
    "you are a stupid idiot",
    "hello world",
    "what a good day",
    "bad",
    "the kind person is nice and good , hello",
    "unknownword you",
]


def _build(tmp: Path, *, folder_num_labels: int | None = None) -> tuple[Path, Path, dict, BertTokenizerFast]:
    """Return (checkpoint file, HF folder, state dict, tokenizer) for a tiny 6-class BERT in detoxify's format."""
    vocab = tmp / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ",", *WORDS]) + "\n", encoding="utf-8")
    tokenizer = BertTokenizerFast(vocab_file=str(vocab))
    config = BertConfig(vocab_size=len(WORDS) + 6, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, num_labels=len(CLASSES))
    torch.manual_seed(0)
    model = BertForSequenceClassification(config).eval()
    with torch.no_grad():
        # the default init leaves every score near 0.5; spread them so the reference check can tell models apart
        model.classifier.weight.normal_(0.0, 2.0)
        model.classifier.bias.normal_(0.0, 1.0)
    folder = tmp / "hf"
    tokenizer.save_pretrained(folder)
    if folder_num_labels is None:
        config.save_pretrained(folder)
    else:
        plain = {k: v for k, v in config.to_dict().items() if k not in ("id2label", "label2id")}
        BertConfig(**plain, num_labels=folder_num_labels).save_pretrained(folder)
    checkpoint = {
        "config": {
            "name": "Jigsaw_BERT",
            "arch": {"type": "BERT", "args": {"model_type": "bert-base-uncased",
                                              "model_name": "BertForSequenceClassification",
                                              "tokenizer_name": "BertTokenizerFast",
                                              "num_classes": len(CLASSES)}},
            "dataset": {"type": "JigsawData", "args": {"classes": CLASSES}},
        },
        "state_dict": {k: v.clone() for k, v in model.state_dict().items()},
    }
    path = tmp / "toxic_tiny.ckpt"
    torch.save(checkpoint, path)
    return path, folder, checkpoint["state_dict"], tokenizer


def _reference(folder: Path, state_dict: dict, tokenizer: BertTokenizerFast, texts: list[str]) -> np.ndarray:
    """Return sigmoid(logits) of a BertForSequenceClassification rebuilt directly from the state dict."""
    config = BertConfig.from_pretrained(folder, num_labels=len(CLASSES))
    model = BertForSequenceClassification(config)
    model.load_state_dict(state_dict)
    model.eval()
    with torch.no_grad():
        enc = tokenizer(texts, return_tensors="pt", padding=True, truncation=True)
        return torch.sigmoid(model(**enc).logits).numpy()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return _build(tmp_path_factory.mktemp("detoxify"))


@pytest.fixture(scope="module")
def scorer(built):
    path, folder, _, _ = built
    return DetoxifyScorer(path, folder)


def test_labels_version_and_shapes(scorer, built):
    path = built[0]
    assert scorer.name == "detoxify"
    assert scorer.labels == LABELS
    digest, _, rest = scorer.version.partition("-")
    assert len(digest) == 16 and all(c in "0123456789abcdef" for c in digest)
    assert rest.startswith("detoxify0.")
    out = scorer.score(TEXTS, batch_size=3)
    assert set(out) == set(LABELS)
    for arr in out.values():
        assert arr.dtype == np.float32 and arr.shape == (len(TEXTS),)
        assert np.all((arr >= 0.0) & (arr <= 1.0))
    assert path.is_file()


def test_matches_direct_model_from_state_dict(scorer, built):
    _, folder, state_dict, tokenizer = built
    out = scorer.score(TEXTS, batch_size=len(TEXTS))
    got = np.stack([out[label] for label in LABELS], axis=1)
    ref = _reference(folder, state_dict, tokenizer, TEXTS)
    np.testing.assert_allclose(got, ref, atol=1e-6, rtol=0)
    # the scores really spread out, so matching them is evidence the checkpoint weights were used
    assert ref.max() - ref.min() > 0.3
    fresh = BertForSequenceClassification(BertConfig.from_pretrained(folder, num_labels=len(CLASSES))).eval()
    with torch.no_grad():
        other = torch.sigmoid(fresh(**tokenizer(TEXTS, return_tensors="pt", padding=True)).logits).numpy()
    assert not np.allclose(got, other, atol=1e-3)


def test_batch_size_invariance_and_determinism(scorer):
    whole = scorer.score(TEXTS, batch_size=len(TEXTS))
    for bs in (1, 2, 5):
        parts = scorer.score(TEXTS, batch_size=bs, progress=bs == 2)
        for label in LABELS:
            np.testing.assert_allclose(parts[label], whole[label], atol=1e-5, rtol=0)
    again = scorer.score(TEXTS, batch_size=len(TEXTS))
    for label in LABELS:
        np.testing.assert_array_equal(again[label], whole[label])
    empty = scorer.score([], batch_size=4)
    assert all(arr.shape == (0,) and arr.dtype == np.float32 for arr in empty.values())


def test_folder_with_default_num_labels_still_loads(tmp_path):
    # a folder saved from a plain bert config (2 labels) must not clash with the checkpoint's 6 classes
    path, folder, state_dict, tokenizer = _build(tmp_path, folder_num_labels=2)
    assert BertConfig.from_pretrained(folder).num_labels == 2
    out = DetoxifyScorer(path, folder).score(TEXTS[:3])
    got = np.stack([out[label] for label in LABELS], axis=1)
    np.testing.assert_allclose(got, _reference(folder, state_dict, tokenizer, TEXTS[:3]), atol=1e-6, rtol=0)


def test_missing_files_raise_value_error(tmp_path, built):
    _, folder, _, _ = built
    missing = tmp_path / "nope.ckpt"
    with pytest.raises(ValueError, match="nope.ckpt"):
        DetoxifyScorer(missing, folder)
    with pytest.raises(ValueError, match="config.json"):
        DetoxifyScorer(built[0], tmp_path / "empty")


def test_checkpoint_without_config_is_rejected(tmp_path, built):
    _, folder, state_dict, _ = built
    bad = tmp_path / "bare.ckpt"
    torch.save({"state_dict": state_dict}, bad)
    with pytest.raises(ValueError, match="bare.ckpt"):
        DetoxifyScorer(bad, folder)


def test_pickled_objects_refused_by_default(tmp_path, built):
    _, folder, _, _ = built
    bad = tmp_path / "pickled.ckpt"
    torch.save({"config": {}, "state_dict": {}, "extra": Path("x")}, bad)
    with pytest.raises(ValueError, match="weights_only"):
        DetoxifyScorer(bad, folder)
