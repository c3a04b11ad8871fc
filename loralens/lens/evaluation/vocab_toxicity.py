"""Toxicity of every vocabulary token: the per-token scores that decoded attention heads are compared against.

Each token id is turned into its surface text (e.g. " idiot", "iot", "123") and sorted into a kind:

    word      leading whitespace (byte-level BPE's word-start convention, "Ġ") and only letters after stripping
    subword   any other piece with at least one letter: continuation pieces ("iot") and mixed pieces (" don't")
    non_word  no letters at all: digits, punctuation, whitespace, partial UTF-8 bytes, special tokens

Word and subword pieces are scored by a text toxicity scorer as standalone strings (stripped, lowercased);
non_word pieces get 0.0 without being scored. A word-level classifier such as jigsaw-lstm knows only whole words,
so a continuation piece ("idi" + "ot") usually falls outside its vocabulary and scores like empty text: sub-word
toxicity is under-counted. An optional lexicon (exact match on the stripped lowercase piece) is the second source
for that case.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from loralens.lens.evaluation.scorers import ToxicityScorer, primary_label

KINDS = ("word", "subword", "non_word")


@dataclass(frozen=True)
class VocabToxicity:
    """Per-token toxicity of a whole vocabulary; every array has length V (the tokenizer's len)."""

    score: np.ndarray  # float32 [V]: primary-label probability of the stripped lowercase piece; 0.0 for non_word
    kind: np.ndarray  # str [V]: one of KINDS
    in_lexicon: np.ndarray  # bool [V]: stripped lowercase piece is in the lexicon (all False without one)
    scorer_version: str
    label: str
    n_scored: int  # distinct texts sent to the scorer


def token_texts(tokenizer) -> list[str]:
    """Return the surface text of every token id 0..len(tokenizer)-1, with "" for special tokens."""
    special = set(tokenizer.all_special_ids)
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    # convert_tokens_to_string maps byte-level symbols back to text ("Ġidiot" -> " idiot") and keeps the space
    # that decode() may strip or clean up.
    return ["" if i in special or tok is None else tokenizer.convert_tokens_to_string([tok])
            for i, tok in enumerate(tokens)]


def piece_kind(text: str) -> str:
    """Return "word", "subword" or "non_word" for one token's surface text (see the module docstring)."""
    stripped = text.strip()
    if not any(c.isalpha() for c in stripped):
        return "non_word"
    if text[:1].isspace() and stripped.isalpha():
        return "word"
    return "subword"


def scoring_key(text: str) -> str:
    """Return the text a piece is scored and looked up by: stripped and lowercased."""
    return text.strip().lower()


def vocab_toxicity(tokenizer, scorer: ToxicityScorer, *, batch_size: int = 512, progress: bool = False,
                   lexicon: set[str] | None = None) -> VocabToxicity:
    """Return the toxicity of every token of `tokenizer` under `scorer`'s overall-toxicity label.

    Sub-word treatment: pieces are scored as standalone strings. A continuation piece usually falls outside a
    word-level classifier's vocabulary and scores like empty text, so sub-word toxicity is under-counted; the
    lexicon (exact match on the stripped lowercase piece) is the second source for that case.

    Each distinct scoring key (stripped, lowercased text) is scored once and scattered back to every token that
    shares it (" Idiot", "idiot", " idiot" ...). That is exact for case-insensitive scorers such as jigsaw-lstm,
    which lowercase anyway; a case-sensitive scorer sees the lowercase form.
    """
    texts = token_texts(tokenizer)
    kinds = np.array([piece_kind(t) for t in texts])
    keys = [scoring_key(t) for t in texts]
    label = primary_label(scorer)

    scored = np.flatnonzero(kinds != "non_word")
    distinct, inverse = np.unique(np.array([keys[i] for i in scored], dtype=object), return_inverse=True)
    score = np.zeros(len(texts), dtype=np.float32)
    if len(distinct):
        probs = scorer.score(list(distinct), batch_size=batch_size, progress=progress)[label]
        score[scored] = np.asarray(probs, dtype=np.float32)[inverse.ravel()]

    lex = lexicon or set()
    in_lexicon = np.array([k in lex for k in keys], dtype=bool)
    return VocabToxicity(score=score, kind=kinds, in_lexicon=in_lexicon, scorer_version=scorer.version,
                         label=label, n_scored=len(distinct))


def load_lexicon(path: str | Path) -> set[str]:
    """Return the lowercased terms of a lexicon file: one per line, '#' comments and blank lines skipped."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read lexicon file {path}: {e.strerror or e}") from None
    terms: set[str] = set()
    for lineno, line in enumerate(raw.splitlines(), start=1):
        try:
            text = line.decode("utf-8-sig" if lineno == 1 else "utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"lexicon file {path} line {lineno} is not valid UTF-8") from None
        term = text.split("#", 1)[0].strip().lower()
        if term:
            terms.add(term)
    return terms


def top_tokens(vt: VocabToxicity, texts: Sequence[str], k: int = 30) -> list[tuple[int, str, float]]:
    """Return the k most toxic (token id, text, score), highest score first, ties by id."""
    order = np.lexsort((np.arange(len(vt.score)), -vt.score))[:k]
    return [(int(i), texts[i], float(vt.score[i])) for i in order]


__all__ = ["KINDS", "VocabToxicity", "load_lexicon", "piece_kind", "scoring_key", "token_texts", "top_tokens",
           "vocab_toxicity"]
