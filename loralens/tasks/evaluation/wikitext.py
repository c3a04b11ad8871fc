"""The benign text perplexity is measured on (select and intervene)."""

from __future__ import annotations

from loralens.warehouse.corpus import bundled_path


def wikitext(max_tokens: int) -> str:
    """Return enough of the bundled WikiText-2 test text for `max_tokens` tokens (~4 characters per token)."""
    return bundled_path("wikitext2_test").read_text(encoding="utf-8")[: max_tokens * 8]


__all__ = ["wikitext"]
