"""Prompt corpora: JSONL (RealToxicityPrompts schema or {"id", "text"}), plain text and Parquet."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import pyarrow.parquet as pq


class CorpusError(ValueError):
    """A prompt file is missing, malformed or empty; the message names the file (and line)."""


@dataclass(frozen=True)
class Prompt:
    """One prompt: a corpus-unique id, its text, the file it came from, its toxicity and human continuation if known.
    """

    id: str
    text: str
    source: str
    toxicity: float | None = None
    continuation: str | None = None  # RealToxicityPrompts' continuation.text (teacher-forced by the select stage)


@dataclass
class Corpus:
    """Prompts in corpus order plus what was skipped while reading them."""

    prompts: list[Prompt]
    skipped_blank: int = 0
    per_source: dict[str, int] = field(default_factory=dict)

    def fingerprint(self, continuations: bool = False) -> str:
        """Return a content hash of the prompts (ids, texts, sources, scores) in order; with `continuations` their
        human continuations too (only the select stage reads them, so only its version hashes them)."""
        h = hashlib.sha256()
        for p in self.prompts:
            fields = [p.id, p.text, p.source, p.toxicity] + ([p.continuation] if continuations else [])
            h.update(json.dumps(fields).encode())
        return h.hexdigest()[:16]


def bundled_path(name: str) -> Path:
    """Return the path of a data file that ships with the package (`rtp_toxic_dev` -> its .jsonl)."""
    root = resources.files("loralens.data")
    for suffix in ("", ".jsonl", ".txt", ".csv", ".parquet"):
        candidate = root / f"{name}{suffix}"
        if candidate.is_file():
            return Path(str(candidate))
    available = sorted(p.name for p in root.iterdir() if p.is_file() and not p.name.startswith("_"))
    raise CorpusError(f"no bundled data file '{name}'; bundled: {', '.join(available)}")


def _resolve(spec: str) -> Path:
    if spec.startswith("bundled:"):
        return bundled_path(spec.removeprefix("bundled:"))
    path = Path(spec).expanduser()
    if path.is_dir():
        raise CorpusError(f"prompt file {path} is a directory, not a file (list the files inside it instead)")
    if not path.is_file():
        raise CorpusError(f"prompt file not found: {path}")
    return path


def _read_text_lines(path: Path) -> list[str]:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig").splitlines()  # a leading byte-order mark (Windows tools) is dropped
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise CorpusError(f"{path}:{line}: not valid UTF-8 (byte offset {err.start})") from None


def _from_json_record(rec: object, path: Path, lineno: int) -> tuple[str | None, str, float | None, str | None]:
    if not isinstance(rec, dict):
        raise CorpusError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
    prompt = rec.get("prompt")
    if isinstance(prompt, dict):  # RealToxicityPrompts
        if not isinstance(prompt.get("text"), str):
            raise CorpusError(f"{path}:{lineno}: RTP record has no prompt.text string")
        rid = f"{rec['filename']}:{rec.get('begin', lineno)}" if "filename" in rec else None
        cont = rec.get("continuation")
        cont_text = cont.get("text") if isinstance(cont, dict) and isinstance(cont.get("text"), str) else None
        return rid, prompt["text"], _as_float(prompt.get("toxicity")), cont_text
    if not isinstance(rec.get("text"), str):
        raise CorpusError(f"{path}:{lineno}: record has no 'text' string (or 'prompt.text' for RTP)")
    rid = rec.get("id")
    cont = rec.get("continuation")
    return (None if rid is None else str(rid)), rec["text"], _as_float(rec.get("toxicity")), \
        (cont if isinstance(cont, str) else None)


def _as_float(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _records(path: Path) -> list[tuple[str | None, str, float | None, str | None, int]]:
    """Return (id or None, text, toxicity, continuation, line number) for every record of one file."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        try:
            table = pq.read_table(path)
        except Exception as err:  # pyarrow raises several types for a bad file
            raise CorpusError(f"{path}: not a readable Parquet file ({str(err).splitlines()[0]})") from None
        if "text" not in table.column_names:
            raise CorpusError(f"{path}: Parquet prompt file needs a 'text' column")
        texts = table.column("text").to_pylist()
        ids = table.column("id").to_pylist() if "id" in table.column_names else [None] * len(texts)
        tox = table.column("toxicity").to_pylist() if "toxicity" in table.column_names else [None] * len(texts)
        cont = table.column("continuation").to_pylist() if "continuation" in table.column_names else [None] * len(texts)
        return [(None if i is None else str(i), t or "", _as_float(x), c, n + 1) for n, (i, t, x, c) in
                enumerate(zip(ids, texts, tox, cont, strict=True))]
    lines = _read_text_lines(path)
    if suffix in (".jsonl", ".json"):
        out = []
        for n, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as err:
                raise CorpusError(f"{path}:{n}: invalid JSON ({err.msg})") from None
            out.append((*_from_json_record(rec, path, n), n))
        return out
    return [(None, line, None, None, n) for n, line in enumerate(lines, start=1)]


def load_corpus(specs: list[str] | tuple[str, ...], max_per_file: int | None = None) -> Corpus:
    """Return the prompts of all files in order; blank prompts are skipped and counted."""
    prompts: list[Prompt] = []
    seen: set[str] = set()
    corpus = Corpus(prompts=prompts)
    for spec in specs:
        path = _resolve(spec)
        source = path.stem
        kept = 0
        for rid, text, tox, cont, lineno in _records(path):
            if max_per_file is not None and kept >= max_per_file:
                break
            if not text.strip():
                corpus.skipped_blank += 1
                continue
            pid = f"{source}/{rid if rid is not None else lineno}"
            if pid in seen:
                raise CorpusError(f"{path}:{lineno}: duplicate prompt id '{pid}'")
            seen.add(pid)
            prompts.append(Prompt(id=pid, text=text, source=source, toxicity=tox, continuation=cont))
            kept += 1
        corpus.per_source[source] = kept
    if not prompts:
        raise CorpusError(f"empty corpus: no non-blank prompts in {', '.join(specs)}")
    return corpus


@dataclass(frozen=True)
class TrainingText:
    """Text the lenses train on besides the prompts: the sources' texts in order, each after its skipped start."""

    text: str
    per_source: dict[str, int]  # characters kept per source

    def fingerprint(self) -> str:
        """Return a content hash of the text and where it came from."""
        h = hashlib.sha256(json.dumps(self.per_source, sort_keys=True).encode())
        h.update(self.text.encode())
        return h.hexdigest()[:16]


def load_training_text(specs: list[str] | tuple[str, ...], start: float) -> TrainingText:
    """Return the texts of every file (records or lines joined by newlines), each without its first `start`
    fraction of characters (cut at the next line break, so no word is split)."""
    parts: list[str] = []
    per_source: dict[str, int] = {}
    for spec in specs:
        path = _resolve(spec)
        text = "\n".join(t for _, t, _, _, _ in _records(path) if t.strip())
        cut = int(len(text) * start)
        if cut:
            newline = text.find("\n", cut)
            text = text[newline + 1:] if newline >= 0 else ""
        if not text.strip():
            raise CorpusError(f"{path}: no text left for lens training (empty file, or corpus.text_start skips it all)")
        per_source[path.stem] = len(text)
        parts.append(text)
    return TrainingText(text="\n".join(parts), per_source=per_source)
