"""Per-token vocabulary toxicity with real tokenizers and the real jigsaw-lstm scorer."""

from __future__ import annotations

import numpy as np
import pytest

from loralens.lens.evaluation.scorers import get_scorer, primary_label
from loralens.lens.evaluation.vocab_toxicity import (
    load_lexicon,
    piece_kind,
    scoring_key,
    token_texts,
    top_tokens,
    vocab_toxicity,
)
from tests.conftest import train_bpe_tokenizer

TOXIC_WORDS = (" idiot", " stupid", " moron")


@pytest.fixture(scope="module")
def scorer():
    return get_scorer("jigsaw-lstm")


@pytest.fixture(scope="module")
def toxic_tokenizer():
    """A byte-level BPE tokenizer trained on lines where a few insults are frequent enough to be whole tokens."""
    lines = ["you are an idiot stupid moron, the cat sat on the mat. 123 456!"] * 50
    lines += ["the dog and the cat are friends; the end."] * 50
    return train_bpe_tokenizer(lines, vocab_size=320)


def test_piece_kind():
    assert piece_kind(" idiot") == "word"
    assert piece_kind("\tthe") == "word"
    assert piece_kind("iot") == "subword"
    assert piece_kind(" don't") == "subword"
    assert [piece_kind(t) for t in ("", " ", "123", " ,", "\n", "\ufffd")] == ["non_word"] * 6


def test_token_texts_keep_leading_space_and_blank_specials(toxic_tokenizer):
    texts = token_texts(toxic_tokenizer)
    assert len(texts) == len(toxic_tokenizer)
    assert texts[toxic_tokenizer.eos_token_id] == ""
    assert " idiot" in texts and " the" in texts


def test_shapes_and_non_words_on_tiny_tokenizer(tiny_tokenizer, scorer):
    vt = vocab_toxicity(tiny_tokenizer, scorer, batch_size=128)
    v = len(tiny_tokenizer)
    assert vt.score.shape == vt.kind.shape == vt.in_lexicon.shape == (v,)
    assert vt.score.dtype == np.float32 and vt.in_lexicon.dtype == bool
    assert set(vt.kind) <= {"word", "subword", "non_word"}
    non_word = vt.kind == "non_word"
    assert non_word.any() and (vt.score[non_word] == 0.0).all()
    assert ((vt.score >= 0) & (vt.score <= 1)).all()
    assert not vt.in_lexicon.any()
    assert vt.label == primary_label(scorer) and vt.scorer_version == scorer.version
    assert 0 < vt.n_scored <= int((~non_word).sum())


def test_toxic_word_tokens_score_high(toxic_tokenizer, scorer):
    vt = vocab_toxicity(toxic_tokenizer, scorer)
    texts = token_texts(toxic_tokenizer)
    for word in TOXIC_WORDS:
        i = texts.index(word)
        assert vt.kind[i] == "word"
        assert vt.score[i] > 0.8, (word, vt.score[i])
    assert vt.score[texts.index(" the")] < 0.1
    top3 = {t for _, t, _ in top_tokens(vt, texts, k=3)}
    assert top3 == set(TOXIC_WORDS)


def test_lexicon_flags(toxic_tokenizer, scorer, tmp_path):
    path = tmp_path / "lex.txt"
    path.write_text("# insults\nIDIOT\n\n  the  # stop word, flagged on purpose\nnot-a-token\n", encoding="utf-8")
    lexicon = load_lexicon(path)
    assert lexicon == {"idiot", "the", "not-a-token"}
    vt = vocab_toxicity(toxic_tokenizer, scorer, lexicon=lexicon)
    texts = token_texts(toxic_tokenizer)
    flagged = {texts[i] for i in np.flatnonzero(vt.in_lexicon)}
    assert " idiot" in flagged and " the" in flagged
    assert {scoring_key(t) for t in flagged} <= lexicon


def test_dedup_matches_scoring_every_token(tiny_tokenizer, toxic_tokenizer, scorer):
    label = primary_label(scorer)
    for tokenizer in (tiny_tokenizer, toxic_tokenizer):
        vt = vocab_toxicity(tokenizer, scorer)
        texts = token_texts(tokenizer)
        # Every token scored on its own, raw text, no dedup; jigsaw lowercases and drops whitespace itself.
        each = scorer.score(texts, batch_size=512)[label]
        scored = vt.kind != "non_word"
        np.testing.assert_allclose(vt.score[scored], each[scored], rtol=0, atol=1e-6)
    # The WikiText tokenizer has pieces equal up to case/space (" The", " the", "the"), so dedup saves work.
    vt = vocab_toxicity(tiny_tokenizer, scorer)
    assert vt.n_scored < int((vt.kind != "non_word").sum())


def test_load_lexicon_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(ValueError, match="nope.txt") as e:
        load_lexicon(missing)
    assert "\n" not in str(e.value)
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"idiot\n# ok\nmor\xffon\n")
    with pytest.raises(ValueError, match=r"bad\.txt line 3") as e:
        load_lexicon(bad)
    assert "\n" not in str(e.value)


def test_load_lexicon_tolerates_bom_and_crlf(tmp_path):
    path = tmp_path / "lex.txt"
    path.write_bytes("\ufeffIdiot\r\nmoron\r\n".encode())
    assert load_lexicon(path) == {"idiot", "moron"}


def test_the_one_vocabulary_toxicity_file_reads_back_and_a_missing_one_names_the_file(tmp_path):
    """Decode's token toxicity file is what attribute, select, intervene and the API read, through one reader."""
    from loralens.warehouse.artifacts import ArtifactDir, ArtifactError
    from loralens.warehouse.decodings import (
        read_token_toxicity,
        token_toxicity_facts,
        token_toxicity_scores,
        token_toxicity_table,
        write_token_toxicity,
    )

    adir = ArtifactDir(tmp_path, "decode", "v1")
    adir.prepare()
    facts = {"scorer": "jigsaw-lstm@x", "label": "toxic", "scored_pieces": 2}
    write_token_toxicity(adir, token_toxicity_table([" a", "idiot", ""], np.array(["word", "subword", "non_word"]),
                                                    np.array([0.25, 0.75, 0.0]), facts))
    scores = token_toxicity_scores(adir)
    assert scores.dtype == np.float32 and scores.tolist() == [0.25, 0.75, 0.0]
    assert read_token_toxicity(adir, ["token_id", "token"]).to_pydict() == {"token_id": [0, 1, 2],
                                                                            "token": [" a", "idiot", ""]}
    assert token_toxicity_facts(adir) == facts
    with pytest.raises(ArtifactError, match="decode version v2: no vocabulary toxicity file .*token_toxicity.parquet"):
        token_toxicity_scores(ArtifactDir(tmp_path, "decode", "v2"))
