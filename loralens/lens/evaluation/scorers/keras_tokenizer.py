"""Keras' text `Tokenizer` without Keras: an allow-listed unpickler for its saved state, word splitting and padding.

What `jigsaw-lstm` needs to turn raw text into the ids its BiLSTM was trained on, exactly as Keras does.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from loralens.lens.evaluation.scorers import ScorerError

MAXLEN = 100
# Keras' default `filters` for Tokenizer / text_to_word_sequence.
KERAS_FILTERS = '!"#$%&()*+,-./:;<=>?@[\\]^_`{|}~\t\n'


class _PickledKerasTokenizer:
    """Receives the pickled Keras Tokenizer's attribute dict; has no behaviour of its own."""

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)


# SECURITY: unpickling executes whatever callables the file names. Only these (module, name) pairs may be
# resolved; everything else (os.system, builtins.eval, subprocess, ...) raises UnpicklingError before any call.
_TOKENIZER_CLASSES = {
    ("keras.src.legacy.preprocessing.text", "Tokenizer"),  # Keras 3 (what 0.3.0 ships)
    ("keras.preprocessing.text", "Tokenizer"),
    ("keras_preprocessing.text", "Tokenizer"),
    ("tensorflow.keras.preprocessing.text", "Tokenizer"),
}
_SAFE_GLOBALS = {
    ("collections", "OrderedDict"),
    ("collections", "defaultdict"),
    ("builtins", "dict"),
    ("builtins", "list"),
    ("builtins", "int"),  # defaultdict(int) default factory
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the Keras Tokenizer (to a stub) and a few plain container types."""

    def find_class(self, module: str, name: str):
        if (module, name) in _TOKENIZER_CLASSES:
            return _PickledKerasTokenizer
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"tokenizer pickle refers to {module}.{name}, which is not allowed")


def safe_load_tokenizer_state(path: Path) -> dict:
    """Return the attribute dict of a pickled Keras Tokenizer, unpickled through an allow-list."""
    with path.open("rb") as f:
        obj = _RestrictedUnpickler(f).load()
    if not isinstance(obj, _PickledKerasTokenizer):
        raise ScorerError(f"jigsaw-lstm: {path} does not hold a Keras Tokenizer (got {type(obj).__name__})")
    return obj.__dict__


def text_to_word_sequence(text: str, filters: str = KERAS_FILTERS, lower: bool = True, split: str = " ") -> list[str]:
    """Return the words of `text` the way Keras' `text_to_word_sequence` splits it."""
    if lower:
        text = text.lower()
    text = text.translate(str.maketrans(dict.fromkeys(filters, split)))
    return [w for w in text.split(split) if w]


class KerasTokenizerLite:
    """Keras `Tokenizer.texts_to_sequences` without Keras: same word index, filters, num_words and OOV rules."""

    def __init__(self, word_index: dict[str, int], num_words: int | None = None, filters: str = KERAS_FILTERS,
                 lower: bool = True, split: str = " ", oov_token: str | None = None):
        self.word_index = word_index
        self.num_words = num_words
        self.filters = filters
        self.lower = lower
        self.split = split
        self.oov_token = oov_token
        self._oov_index = word_index.get(oov_token) if oov_token is not None else None

    @classmethod
    def from_pickle(cls, path: Path) -> KerasTokenizerLite:
        """Return the tokenizer rebuilt from a pickled Keras Tokenizer (see the allow-list above)."""
        try:
            state = safe_load_tokenizer_state(path)
        except (pickle.UnpicklingError, EOFError, AttributeError, TypeError) as e:
            raise ScorerError(f"jigsaw-lstm: cannot read tokenizer {path}: {e}") from None
        if state.get("char_level") or state.get("analyzer") is not None:
            raise ScorerError(f"jigsaw-lstm: tokenizer {path} uses char_level/analyzer, which is not supported")
        if not isinstance(state.get("word_index"), dict):
            raise ScorerError(f"jigsaw-lstm: tokenizer {path} has no word_index")
        return cls(state["word_index"], num_words=state.get("num_words"),
                   filters=state.get("filters", KERAS_FILTERS), lower=state.get("lower", True),
                   split=state.get("split", " "), oov_token=state.get("oov_token"))

    def text_to_sequence(self, text: str) -> list[int]:
        """Return the word ids of one text."""
        ids: list[int] = []
        for word in text_to_word_sequence(text, self.filters, self.lower, self.split):
            i = self.word_index.get(word)
            if i is not None and not (self.num_words and i >= self.num_words):
                ids.append(i)
            elif self._oov_index is not None:
                # Keras maps both unknown words and words beyond num_words to the OOV index when there is one.
                ids.append(self._oov_index)
        return ids

    def texts_to_sequences(self, texts: Sequence[str]) -> list[list[int]]:
        """Return the word ids of each text."""
        return [self.text_to_sequence(t) for t in texts]


def pad_sequences(sequences: Sequence[Sequence[int]], maxlen: int = MAXLEN, padding: str = "pre",
                  truncating: str = "pre", value: int = 0) -> np.ndarray:
    """Return an int64 [N, maxlen] array laid out like Keras' `pad_sequences` (defaults: pre/pre, as the package)."""
    out = np.full((len(sequences), maxlen), value, dtype=np.int64)
    for row, seq in enumerate(sequences):
        if not len(seq):
            continue
        kept = seq[-maxlen:] if truncating == "pre" else seq[:maxlen]
        if padding == "pre":
            out[row, maxlen - len(kept):] = kept
        else:
            out[row, :len(kept)] = kept
    return out
