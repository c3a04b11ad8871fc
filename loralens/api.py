"""The Python API: open a project home, read its warehouse, decode heads through their lenses, ablate heads.

    import loralens

    home = loralens.open(".loralens")                 # a project home after `loralens run`
    home.head_scores(method="lens_contrast")          # pyarrow.Table: layer, head, method, score, rank, ...
    lenses = home.lenses()                            # the newest complete train version (lean: no model built)
    d = lenses.decode("You are such an", heads=[(21, 3)], k=10)
    d.top((21, 3))                                    # [(token, probability), ...] under the trained lens
    lm = loralens.load_model("smollm2-135m-instruct")
    with loralens.ablate(lm.model, [(21, 3)]):        # zero the head in every forward pass inside the block
        ...

Heads are `(layer, head)` pairs or strings like "L21H3,L5H0". Tables are pyarrow Tables (`.to_pylist()`, or
`.to_pandas()` with pandas installed). Decoding runs the same functions as the pipeline's cache and decode stages
(`cache_batch`, `lens_inputs`, `read_heads`, `decodings_block`), so it gives what the decode stage stores.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from loralens.config import parse_config
from loralens.defaults import default_home
from loralens.lens.evaluation.vocab_toxicity import token_texts
from loralens.lens.heads.capture import cache_batch, from_storage, tokenize_prompts
from loralens.lens.heads.edits import KINDS, Head, ablate, format_heads, parse_head_list
from loralens.lens.heads.head_scores import toxic_direction
from loralens.lens.lenses.lens_set import lens_inputs
from loralens.lens.lenses.readout import HeadReader, read_heads, row_chunks
from loralens.lens.runtime.lean import LeanModel
from loralens.lens.runtime.models import LoadedModel, model_context_length
from loralens.lens.runtime.models import load_model as _load_model
from loralens.tasks.lens_loading import cached_layers, load_reader
from loralens.tasks.stage_versions import StageVersion
from loralens.warehouse.artifacts import ArtifactDir
from loralens.warehouse.constants import STAGES
from loralens.warehouse.db import connect, warehouse_path
from loralens.warehouse.decodings import decodings_block, token_toxicity_scores

__all__ = ["KINDS", "ApiError", "Decoding", "Home", "Lenses", "ablate", "load_model", "open_home", "parse_heads"]


class ApiError(ValueError):
    """A request the home cannot answer (no such version, no trained lenses, a head out of range); one line."""


def load_model(name: str, home: str | Path | None = None, *, dtype: str = "auto", device: str = "auto",
               trust_remote_code: bool = False) -> LoadedModel:
    """Return a frozen HF causal LM with `.model`, `.tokenizer`, `.adapter`, `.dims` (embedded alias, folder, hub id).

    `home` holds converted embedded models (default $LORALENS_HOME or ./.loralens). `device` and `dtype` follow
    the pipeline's policy (`model.device`, `model.dtype`): auto = cuda and bfloat16 when a GPU is there, else
    cpu and float32.
    """
    from loralens.lens.runtime.devices import resolve_device, resolve_dtype

    home = Path(home).resolve() if home is not None else default_home()
    where = resolve_device(device)
    return _load_model(name, home, dtype=resolve_dtype(dtype, where), device=where,
                       trust_remote_code=trust_remote_code)


def open_home(path: str | Path | None = None) -> Home:
    """Return the project home at `path` (default $LORALENS_HOME or ./.loralens); raise ApiError if it has no
    warehouse (run the pipeline first)."""
    home = Path(path).expanduser().resolve() if path is not None else default_home()
    if not warehouse_path(home).exists():
        raise ApiError(f"no warehouse at {warehouse_path(home)}; run the pipeline first (`loralens run`)")
    return Home(home)


def parse_heads(heads: Iterable[Head] | str) -> list[Head]:
    """Return heads as a list of `(layer, head)` from pairs or a "L3H1,L5H0" / "3.1 5.0" string."""
    try:
        if isinstance(heads, str):
            return list(parse_head_list(heads))
        return [(int(layer), int(head)) for layer, head in heads]
    except (TypeError, ValueError) as err:
        raise ApiError(str(err) if isinstance(err, ValueError) else f"heads: expected (layer, head) pairs, got "
                       f"{heads!r}") from None


@dataclass(frozen=True)
class Home:
    """A project home: its artifact versions and its DuckDB warehouse, read-only.

    Every query opens the warehouse read-only for its own duration only, so a running pipeline (its writer) is
    never blocked for long by a notebook.
    """

    path: Path

    @property
    def warehouse(self) -> Path:
        """Return the warehouse file."""
        return warehouse_path(self.path)

    def sql(self, query: str, params: Sequence[Any] | None = None) -> pa.Table:
        """Return the result of a read-only SQL query on the warehouse as a pyarrow Table."""
        with connect(self.warehouse, read_only=True) as con:
            return con.sql(query, params=list(params or [])).to_arrow_table()

    def versions(self, stage: str | None = None) -> pa.Table:
        """Return the registered versions (newest first): stage, version, status, rows, bytes, parents, created_at,
        completed_at, path; only `stage`'s if given."""
        if stage is not None and stage not in STAGES:
            raise ApiError(f"unknown stage '{stage}'; stages: {', '.join(STAGES)}")
        where = "WHERE stage = ?" if stage else ""
        return self.sql("SELECT stage, version, status, rows, bytes, parents, created_at, completed_at, path "
                        f"FROM artifacts {where} ORDER BY created_at DESC", [stage] if stage else None)

    def latest(self, stage: str, parent: str | None = None) -> str | None:
        """Return the newest complete version of `stage` (computed from `parent`, if given), or None."""
        for row in self.versions(stage).to_pylist():
            if row["status"] != "complete" or not ArtifactDir(self.path, stage, row["version"]).is_complete():
                continue
            if parent is None or parent in (row["parents"] or []):
                return row["version"]
        return None

    def head_scores(self, method: str | None = None, version: str | None = None) -> pa.Table:
        """Return head scores (layer, head, method, score, rank, version) by method then rank, from the newest
        complete attribute version, its newest select version (methods ablation_tox_drop, attribution_patching) and
        that one's newest intervene version (method 'ablation'), unless `version` is given."""
        versions = [version] if version else [v for v in (self.latest("attribute"),) if v]
        for stage in ("select", "intervene") if not version else ():
            child = self.latest(stage, parent=versions[-1]) if versions else None
            if child is None:
                break
            versions.append(child)
        if not versions:
            raise ApiError(f"no complete attribute version in {self.path}; run `loralens run` first")
        marks = ", ".join("?" * len(versions))
        where = f"version IN ({marks})" + (" AND method = ?" if method else "")
        return self.sql(f"SELECT layer, head, method, score, rank, version FROM head_scores WHERE {where} "
                        "ORDER BY method, rank, layer, head", [*versions, *([method] if method else [])])

    def interventions(self, version: str | None = None) -> pa.Table:
        """Return the intervene stage's metrics, one row per condition, of the newest complete version (or
        `version`)."""
        version = version or self.latest("intervene")
        if version is None:
            raise ApiError(f"no complete intervene version in {self.path}; run `loralens run` first")
        return self.sql("SELECT * EXCLUDE (version) FROM interventions WHERE version = ? ORDER BY condition",
                        [version])

    def lenses(self, version: str | None = None) -> Lenses:
        """Return the trained lenses of train version `version` (default: the newest complete one), read lean."""
        version = version or self.latest("train")
        if version is None:
            raise ApiError(f"no complete train version in {self.path}; run `loralens run` (at least "
                           "`--only cache` and `--only train`) first")
        return Lenses.load(self, version)


def _stage_version(home: Path, stage: str, version: str) -> tuple[StageVersion, dict[str, Any]]:
    """Return a complete version as a StageVersion (from its manifest) and the manifest; ApiError if incomplete."""
    manifest = ArtifactDir(home, stage, version).manifest()
    if manifest is None:
        raise ApiError(f"{stage} version {version} is not complete in {home}")
    return StageVersion(stage, version, manifest["config"], manifest["inputs"], home), manifest


@dataclass
class Decoding:
    """Top tokens of some heads at each position of one text, under the trained and the logit lens.

    `table` has one row per (position, layer, head, lens, rank): position, input_token, layer, head, lens
    ("trained" | "logit"), rank (1 = most likely), token_id, token, logit, prob (full-softmax probability),
    expected_toxicity (`sum_v p(v) tox(v)` of that head and lens at that position) and direct_logit (the head's
    logit push along the toxic direction, the same under both lenses); the last two are NaN without a decode
    version of these lenses (its token toxicity). `tokens` are the text's tokens, one per position.
    """

    tokens: list[str]
    table: pa.Table

    def top(self, head: Head | str, position: int = -1, lens: str = "trained") -> list[tuple[str, float]]:
        """Return `[(token, prob), ...]` of one head at `position` (negative: from the end) under `lens`."""
        (layer, h), = parse_heads([head] if not isinstance(head, str) else head)
        pos = position % len(self.tokens)
        return [(r["token"], r["prob"]) for r in self.table.to_pylist()
                if (r["layer"], r["head"], r["position"], r["lens"]) == (layer, h, pos, lens)]

    def __repr__(self) -> str:
        heads = sorted({(r["layer"], r["head"]) for r in self.table.select(["layer", "head"]).to_pylist()})
        return f"Decoding({len(self.tokens)} tokens, heads {format_heads(heads)}, {self.table.num_rows} rows)"


@dataclass
class Lenses:
    """One train version's lenses: the frozen lens weights (read lean), each layer's bank, and the cache settings
    they were trained on. `decode` runs the model (loaded on first use) to read new text."""

    home: Home
    version: str
    layers: list[int]
    reader: HeadReader
    lean: LeanModel  # frozen parts, tokenizer, model folder, fingerprint
    cache_config: dict[str, Any]  # the cache version's config: model, corpus, cache settings
    vocab_tox: torch.Tensor | None  # [V] token toxicity of the newest decode version of these lenses
    _model: LoadedModel | None = field(default=None, repr=False)
    _texts: np.ndarray | None = field(default=None, repr=False)

    @classmethod
    def load(cls, home: Home, version: str) -> Lenses:
        """Return the lenses of train version `version` of `home`."""
        train_ver, _ = _stage_version(home.path, "train", version)
        cache_ver, cache_manifest = _stage_version(home.path, "cache", train_ver.inputs["cache"])
        layers = cached_layers(cache_manifest)
        cfg = parse_config({"home": str(home.path), "model": cache_manifest["config"]["model"]})
        lean, reader = load_reader(cfg, train_ver, layers)
        return cls(home=home, version=version, layers=layers, reader=reader, lean=lean,
                   cache_config=cache_manifest["config"], vocab_tox=_token_toxicity(home, version))

    @property
    def n_heads(self) -> int:
        """Return the number of query heads per layer."""
        return self.lean.dims.n_heads

    @property
    def model(self) -> LoadedModel:
        """Return the full model these lenses read (loaded on first use, in the dtype the cache stage ran it)."""
        if self._model is None:
            m = self.cache_config["model"]
            self._model = _load_model(m["name"], self.home.path, dtype=m["dtype"], revision=m.get("revision"),
                                      trust_remote_code=m.get("trust_remote_code", False), device=self.reader.device)
        return self._model

    def check_heads(self, heads: Iterable[Head] | str | None) -> list[Head]:
        """Return the heads as `(layer, head)` pairs (all lensed heads if None); ApiError naming one out of range."""
        if heads is None:
            return [(layer, h) for layer in self.layers for h in range(self.n_heads)]
        out = parse_heads(heads)
        for layer, h in out:
            if layer not in self.layers:
                raise ApiError(f"head L{layer}H{h}: layer {layer} has no trained lens (lensed layers: "
                               f"{_ranges(self.layers)})")
            if not 0 <= h < self.n_heads:
                raise ApiError(f"head L{layer}H{h}: head {h} is out of range: layers have {self.n_heads} heads "
                               f"(0-{self.n_heads - 1})")
        return out

    def decode(self, text: str, heads: Iterable[Head] | str | None = None, k: int = 10,
               position: str | int = "all", chunk: int = 64) -> Decoding:
        """Return the top-`k` tokens of each head at each position of `text` under the trained and the logit lens.

        `heads`: pairs or "L3H1,L5H0" (default: every lensed head). `position`: "all", "last" or one index.
        The text is tokenized as the cache stage tokenizes prompts; `[chunk, H, V]` is the largest buffer built.
        """
        if k < 1:
            raise ApiError(f"k must be >= 1, got {k}")
        wanted = self.check_heads(heads)
        loaded = self.model
        ids = tokenize_prompts(loaded.tokenizer, [text], model_context_length(loaded.model.config)).ids[0]
        if not ids:
            raise ApiError("the text has no tokens")
        positions = _positions(position, len(ids))
        layers = sorted({layer for layer, _ in wanted})
        store = self.cache_config["cache"]["store_dtype"]
        arrays = cache_batch(loaded, [ids], [0], layers, top_k=0, store_dtype=store)
        dev = self.reader.device
        scale = torch.from_numpy(arrays.scale[positions].astype(np.float32)).to(dev)
        texts = self.token_texts()
        input_tokens = texts[np.asarray(ids)].tolist()
        vocab = self.lean.dims.vocab
        tox = self.vocab_tox.to(dev) if self.vocab_tox is not None else torch.zeros(vocab, device=dev)
        toxic_dir = toxic_direction(self.reader.unembed.W, tox)
        blocks = []
        for layer in layers:
            keep = pa.array([h for lay, h in wanted if lay == layer], pa.int16())
            z = from_storage(arrays.z[layer][positions], store).to(dev)
            for rows in row_chunks(len(positions), chunk):
                x = lens_inputs(z[rows], scale[rows], self.reader.w_o[layer])  # [n, H, d]
                read = read_heads(self.reader.banks[layer], x, k, tox, toxic_dir)  # the decode stage's readout
                for lens in ("trained", "logit"):
                    top = getattr(read, lens).top  # [n, H, k]
                    block = decodings_block(0, layer, lens, np.zeros(len(x), np.int32), positions[rows],
                                            top.ids.cpu().numpy(), top.logits.cpu().numpy(), top.probs.cpu().numpy(),
                                            texts)
                    per_head = {"expected_toxicity": getattr(read, lens).expected_toxicity, "direct_logit":
                                read.direct_logit}  # [n, H] each
                    for name, values in per_head.items():
                        col = np.repeat(values.cpu().numpy().reshape(-1).astype(np.float32), top.ids.shape[-1])
                        if self.vocab_tox is None:
                            col[:] = np.nan
                        block = block.append_column(name, pa.array(col, pa.float32()))
                    blocks.append(block.filter(pc.is_in(block["head"], keep)))
        table = pa.concat_tables(blocks).drop_columns(["shard", "prompt_idx"])
        table = table.add_column(1, "input_token", pa.array([input_tokens[p] for p in table["position"].to_pylist()],
                                                             pa.string()))
        table = table.sort_by([("position", "ascending"), ("layer", "ascending"), ("head", "ascending"),
                               ("lens", "descending"), ("rank", "ascending")])
        return Decoding(tokens=input_tokens, table=table)

    def token_texts(self) -> np.ndarray:
        """Return every token id's surface text (as the decode stage stores it), padded to the vocabulary."""
        if self._texts is None:
            tok = self.lean.tokenizer
            vocab = self.lean.dims.vocab
            self._texts = np.array((token_texts(tok) + [""] * vocab)[:vocab], dtype=object)  # as decode stores them
        return self._texts


def _positions(position: str | int, n: int) -> np.ndarray:
    """Return the selected positions of an `n`-token text."""
    if position == "all":
        return np.arange(n)
    if position == "last":
        return np.array([n - 1])
    if isinstance(position, int) and -n <= position < n:
        return np.array([position % n])
    raise ApiError(f"position must be 'all', 'last' or an index in [-{n}, {n}), got {position!r}")


def _ranges(layers: list[int]) -> str:
    """Return "0-29" for consecutive layers, else the list."""
    if layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}-{layers[-1]}"
    return ", ".join(map(str, layers))


def _token_toxicity(home: Home, train_version: str) -> torch.Tensor | None:
    """Return `[V]` token toxicity of the newest complete decode version of these lenses (what it read them with),
    or None when there is none."""
    decode = home.latest("decode", parent=train_version)
    if decode is None:
        return None
    return torch.from_numpy(token_toxicity_scores(ArtifactDir(home.path, "decode", decode)))
