"""jigsaw-lstm scorer against the real weights of the installed `toxic-comment-classifier==0.3.0` package."""

from __future__ import annotations

import importlib.util
import io
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from loralens.lens.evaluation.scorers import ScorerError, get_scorer, known_scorers, primary_label, roc_auc
from loralens.lens.evaluation.scorers.jigsaw_lstm import LABELS
from loralens.lens.evaluation.scorers.keras_tokenizer import (
    MAXLEN,
    KerasTokenizerLite,
    pad_sequences,
    safe_load_tokenizer_state,
    text_to_word_sequence,
)

DATA = Path(__file__).resolve().parents[1] / "loralens" / "data"
HAVE_PACKAGE = importlib.util.find_spec("toxic_classifier") is not None and importlib.util.find_spec("h5py") is not None
needs_weights = pytest.mark.skipif(
    not HAVE_PACKAGE, reason="needs `pip install --no-deps toxic-comment-classifier==0.3.0 h5py` (real weights)")

INSULTS = ["you are a stupid idiot", "fuck you, you worthless piece of shit", "shut up you dumb moron",
           "you are an ugly pathetic loser", "go to hell you fucking asshole"]
NEUTRAL = ["the weather is nice today", "thank you for fixing the references in this article",
           "i added a citation to the history section", "the meeting is scheduled for tuesday afternoon",
           "please see the talk page for the discussion"]


@pytest.fixture(scope="module")
def scorer():
    return get_scorer("jigsaw-lstm")


# ----------------------------------------------------------------------------------------- pure helpers


def test_roc_auc_matches_pairwise_definition():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    s = np.round(rng.normal(size=200) + y, 1)  # rounding forces ties
    pos, neg = s[y == 1], s[y == 0]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    pairwise = wins / (len(pos) * len(neg))
    assert roc_auc(y, s) == pytest.approx(pairwise)
    with pytest.raises(ValueError):
        roc_auc([1, 1], [0.1, 0.2])


def test_keras_text_splitting_and_padding():
    assert text_to_word_sequence("Hello, World!\tIt's  me.") == ["hello", "world", "it's", "me"]
    tok = KerasTokenizerLite({"a": 1, "b": 2, "rare": 7}, num_words=5)
    assert tok.texts_to_sequences(["A b RARE unknown a"]) == [[1, 2, 1]]  # rare >= num_words and unknown dropped
    oov = KerasTokenizerLite({"<unk>": 1, "a": 2, "rare": 9}, num_words=5, oov_token="<unk>")
    assert oov.text_to_sequence("a rare zzz") == [2, 1, 1]
    padded = pad_sequences([[1, 2], [], list(range(1, 8))], maxlen=4)
    np.testing.assert_array_equal(padded, [[0, 0, 1, 2], [0, 0, 0, 0], [4, 5, 6, 7]])  # pre-pad, pre-truncate


def test_unknown_scorer_name_lists_known():
    with pytest.raises(ValueError, match="unknown scorer 'nope'.*jigsaw-lstm"):
        get_scorer("nope")
    assert "jigsaw-lstm" in known_scorers() and "detoxify" in known_scorers()


def test_allow_list_rejects_malicious_pickle(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    path = tmp_path / "tokenizer.pickle"
    path.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(pickle.UnpicklingError, match="system"):
        safe_load_tokenizer_state(path)
    assert not (tmp_path / "pwned").exists()
    with pytest.raises(ScorerError, match="not allowed"):
        KerasTokenizerLite.from_pickle(path)


def test_allow_list_rejects_any_unlisted_global(tmp_path):
    payload = {"word_index": {"a": 1}, "x": io.BytesIO}  # any non-listed global, even harmless, is refused
    path = tmp_path / "t.pickle"
    path.write_bytes(pickle.dumps(payload))
    with pytest.raises(pickle.UnpicklingError, match="_io.BytesIO|io.BytesIO"):
        safe_load_tokenizer_state(path)


def test_missing_package_dir_is_a_one_line_error(tmp_path):
    from loralens.lens.evaluation.scorers.jigsaw_lstm import JigsawLSTMScorer

    with pytest.raises(ScorerError, match="missing") as e:
        JigsawLSTMScorer(package_dir=tmp_path)
    assert "\n" not in str(e.value)


def test_lens_scorers_do_not_import_orchestration():
    import sys

    import loralens.lens.evaluation.scorers.jigsaw_lstm as jigsaw
    import loralens.lens.evaluation.scorers.keras_tokenizer as tokenizer

    src = Path(jigsaw.__file__).read_text() + Path(tokenizer.__file__).read_text()
    assert "prefect" not in src.replace("PACKAGE", "") and "duckdb" not in src
    assert "tensorflow" not in sys.modules and "keras" not in sys.modules


# ----------------------------------------------------------------------------------------- real weights


@needs_weights
def test_interface_and_version(scorer):
    assert scorer.name == "jigsaw-lstm" and scorer.labels == LABELS
    assert scorer.version.startswith("jigsaw-lstm/") and len(scorer.version) > 20
    assert primary_label(scorer) == "toxic"
    out = scorer.score(["hello there", "you idiot"])
    assert set(out) == set(LABELS)
    assert all(v.dtype == np.float32 and v.shape == (2,) and ((v >= 0) & (v <= 1)).all() for v in out.values())


@needs_weights
def test_toxic_and_neutral_separate(scorer):
    toxic = scorer.score(INSULTS)["toxic"]
    neutral = scorer.score(NEUTRAL)["toxic"]
    assert toxic.mean() > 0.7, toxic
    assert neutral.mean() < 0.2, neutral
    assert toxic.min() > neutral.max()


@needs_weights
def test_batch_size_invariance_and_progress(scorer):
    texts = INSULTS + NEUTRAL + ["", "a " * 3000]
    ref = scorer.score(texts, batch_size=64)
    for bs in (1, 3):
        got = scorer.score(texts, batch_size=bs, progress=(bs == 3))
        for label in LABELS:
            np.testing.assert_allclose(got[label], ref[label], atol=1e-6)


@needs_weights
def test_empty_and_very_long_text(scorer):
    long_text = " ".join(NEUTRAL * 400) + " you stupid idiot"
    out = scorer.score(["", "   ", "!!!", long_text])
    for v in out.values():
        assert v.shape == (4,) and np.isfinite(v).all()
    ids = scorer.encode([long_text])
    assert ids.shape == (1, MAXLEN)
    # pre-truncation keeps the end of the text, as the package does
    assert ids[0, -1] == scorer.tokenizer.word_index["idiot"]
    assert scorer.score([])["toxic"].shape == (0,)


@needs_weights
def test_real_tokenizer_matches_keras_rules(scorer):
    tok = scorer.tokenizer
    assert tok.num_words == 20000 and tok.oov_token is None and tok.word_index["the"] == 1
    ids = tok.text_to_sequence("The THE, the!")
    assert ids == [1, 1, 1]
    rare = next(w for w, i in tok.word_index.items() if i >= 20000)
    assert tok.text_to_sequence(f"the {rare}") == [1]


def _numpy_forward(h5_path: Path, ids: np.ndarray) -> np.ndarray:
    """Independent float64 re-derivation of the Keras graph straight from the HDF5 arrays."""
    import h5py

    with h5py.File(h5_path, "r") as f:
        g = {k: np.asarray(f[k], dtype=np.float64) for k in (
            "layers/embedding/vars/0", "layers/dense/vars/0", "layers/dense/vars/1",
            "layers/dense_1/vars/0", "layers/dense_1/vars/1")}
        cells = {d: [np.asarray(f[f"layers/bidirectional/{d}_layer/cell/vars/{j}"], dtype=np.float64)
                     for j in range(3)] for d in ("forward", "backward")}

    def sigmoid(z):
        return 1.0 / (1.0 + np.exp(-z))

    def lstm(x, kernel, recurrent, bias):  # x [T, in]; Keras gate order i, f, c, o
        units = recurrent.shape[0]
        h, c, outs = np.zeros(units), np.zeros(units), []
        for t in range(x.shape[0]):
            z = x[t] @ kernel + h @ recurrent + bias
            i, f_, g_, o = (z[k * units:(k + 1) * units] for k in range(4))
            c = sigmoid(f_) * c + sigmoid(i) * np.tanh(g_)
            h = sigmoid(o) * np.tanh(c)
            outs.append(h)
        return np.stack(outs)

    probs = []
    for row in ids:
        x = g["layers/embedding/vars/0"][row]
        fw = lstm(x, *cells["forward"])
        bw = lstm(x[::-1], *cells["backward"])[::-1]
        pooled = np.concatenate([fw, bw], axis=1).max(axis=0)
        hidden = np.maximum(pooled @ g["layers/dense/vars/0"] + g["layers/dense/vars/1"], 0.0)
        probs.append(sigmoid(hidden @ g["layers/dense_1/vars/0"] + g["layers/dense_1/vars/1"]))
    return np.stack(probs)


@needs_weights
def test_faithful_to_independent_numpy_forward(scorer):
    texts = ["you are a stupid idiot", "the weather is nice today", "", "I will kill you and your family"]
    ids = scorer.encode(texts)
    ref = _numpy_forward(scorer.files.weights, ids)
    got = scorer.predict_ids(ids)
    diff = np.abs(got - ref).max()
    print(f"max |torch - numpy| = {diff:.2e}")
    assert diff < 1e-5


def _jigsaw():
    import csv

    with (DATA / "jigsaw_sample.csv").open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return [r["comment_text"] for r in rows], np.array([int(r["toxic"]) for r in rows])


def _toxigen():
    import json

    rows = [json.loads(line) for line in (DATA / "toxigen_sentences.jsonl").read_text().splitlines() if line.strip()]
    return [r["text"] for r in rows], np.array([int(r["label"]) for r in rows])


@needs_weights
def test_auc_on_bundled_data(scorer):
    texts, y = _jigsaw()
    jigsaw_auc = roc_auc(y, scorer.score(texts)["toxic"])
    texts, y = _toxigen()
    toxigen_auc = roc_auc(y, scorer.score(texts)["toxic"])
    print(f"jigsaw-lstm AUC: jigsaw_sample toxic {jigsaw_auc:.4f}, toxigen toxic {toxigen_auc:.4f}")
    # The Jigsaw sample overlaps the model's training set (Jigsaw train), so this mostly guards the port.
    assert jigsaw_auc >= 0.85
    # Measured 0.735 on ToxiGen's implicit hate; a BiLSTM trained on explicit Wikipedia toxicity does poorly here.
    assert toxigen_auc >= 0.69
