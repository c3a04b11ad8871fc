"""Prompt corpus formats and bad input."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from loralens.warehouse.corpus import CorpusError, load_corpus


def test_bundled_rtp_prompts_with_scores():
    corpus = load_corpus(["bundled:rtp_toxic_dev", "bundled:rtp_nontoxic_dev"])
    assert corpus.per_source == {"rtp_toxic_dev": 598, "rtp_nontoxic_dev": 600}
    first = corpus.prompts[0]
    assert first.id.startswith("rtp_toxic_dev/0592407-") and first.text.startswith("People think")
    assert first.toxicity == pytest.approx(0.9066653)
    toxic = [p.toxicity >= 0.5 for p in corpus.prompts if p.source == "rtp_toxic_dev"]
    assert 0.78 < sum(toxic) / len(toxic) < 0.88  # the data README says about 83%
    assert all(p.toxicity < 0.5 for p in corpus.prompts if p.source == "rtp_nontoxic_dev")


def test_id_text_jsonl_plain_text_and_parquet(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"id": "x1", "text": "hello"}\n\n{"id": 7, "text": "world"}\n')
    (tmp_path / "b.txt").write_text("one\n   \ntwo\n")
    pq.write_table(pa.table({"text": ["p", "q"], "toxicity": [0.1, 0.9]}), tmp_path / "c.parquet")
    corpus = load_corpus([str(tmp_path / n) for n in ("a.jsonl", "b.txt", "c.parquet")])
    assert [p.id for p in corpus.prompts] == ["a/x1", "a/7", "b/1", "b/3", "c/1", "c/2"]
    assert [p.text for p in corpus.prompts] == ["hello", "world", "one", "two", "p", "q"]
    assert corpus.prompts[-1].toxicity == pytest.approx(0.9)
    assert corpus.skipped_blank == 1


def test_max_per_file_and_fingerprint_changes(tmp_path):
    full = load_corpus(["bundled:toxigen_sentences"])
    part = load_corpus(["bundled:toxigen_sentences"], max_per_file=5)
    assert len(part.prompts) == 5 and full.fingerprint() != part.fingerprint()
    assert part.fingerprint() == load_corpus(["bundled:toxigen_sentences"], max_per_file=5).fingerprint()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b'{"text": "ok"}\n{"text": broken}\n', r"bad\.jsonl:2: invalid JSON"),
        (b'{"text": "ok"}\n[1, 2]\n', r"bad\.jsonl:2: expected a JSON object"),
        (b'{"prompt": {"toxicity": 0.1}}\n', r"bad\.jsonl:1: RTP record has no prompt\.text"),
        (b'{"id": "a", "text": "x"}\n{"id": "a", "text": "y"}\n', r"bad\.jsonl:2: duplicate prompt id"),
        (b'{"text": "caf\xe9"}\n', r"bad\.jsonl:1: not valid UTF-8"),
        (b"\n  \n", r"empty corpus"),
    ],
)
def test_bad_input_names_file_and_line(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    with pytest.raises(CorpusError, match=message):
        load_corpus([str(path)])


def test_missing_file_and_unknown_bundle(tmp_path):
    with pytest.raises(CorpusError, match="prompt file not found"):
        load_corpus([str(tmp_path / "nope.jsonl")])
    with pytest.raises(CorpusError, match="no bundled data file 'nope'; bundled: .*rtp_toxic_dev"):
        load_corpus(["bundled:nope"])
    (tmp_path / "x.parquet").write_text(json.dumps({"not": "parquet"}))
    with pytest.raises(CorpusError, match=r"x\.parquet: not a readable Parquet file"):
        load_corpus([str(tmp_path / "x.parquet")])
