"""Trained lenses of one train version (or of one saved lens folder): decode text through them, save them.

Decoding runs the same functions as the pipeline's cache and decode stages (`cache_batch`, `lens_inputs`,
`read_heads`, `decodings_block`), so it gives what the decode stage stores.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch import Tensor

from loralens.api.decoding import LENS_ORDER, Decoding, text_positions
from loralens.api.errors import ApiError
from loralens.api.heads import HeadsLike, check_heads
from loralens.config.intervene import InterveneConfig
from loralens.defaults import default_home
from loralens.lens.evaluation.vocab_toxicity import token_texts
from loralens.lens.heads.capture import cache_batch, from_storage, tokenize_prompts
from loralens.lens.heads.head_scores import toxic_direction
from loralens.lens.heads.head_sets import Head
from loralens.lens.lenses.lens_set import lens_inputs
from loralens.lens.lenses.readout import HeadReader, read_heads, row_chunks
from loralens.lens.runtime.lean import LeanModel
from loralens.lens.runtime.models import LoadedModel, model_context_length
from loralens.lens.runtime.models import load_model as _load_model
from loralens.warehouse.decodings import decodings_block

EFFECT_MEAN_TOKENS = InterveneConfig().mean_tokens  # WikiText tokens a head's mean is taken over for its effect

if TYPE_CHECKING:
    from loralens.api.home import Home
    from loralens.api.mechanisms import Mechanisms


@dataclass(frozen=True)
class ModelSpec:
    """How to load the model the lenses read: name (embedded alias, folder or hub id), dtype, revision."""

    name: str
    dtype: str = "float32"
    revision: str | None = None
    trust_remote_code: bool = False


@dataclass
class Lenses:
    """A lens set: the frozen lens weights (read lean), each layer's bank, the model they read and the cache's
    storage dtype they were trained on. `decode` runs the model (loaded on first use) to read new text."""

    layers: list[int]
    reader: HeadReader
    lean: LeanModel  # frozen parts, tokenizer, model folder, fingerprint
    base: ModelSpec
    store_dtype: str  # the cache's z storage dtype: decoding rounds z to it, as the cache stage stored it
    vocab_tox: torch.Tensor | None  # [V] token toxicity of the decode version of these lenses (or saved with them)
    version: str | None = None  # the train version they come from
    home: Home | None = None  # the project home they were read from (None: a saved lens folder)
    model_home: Path | None = None  # where embedded models are converted (default $LORALENS_HOME or ./.loralens)
    _model: LoadedModel | None = field(default=None, repr=False)
    _texts: np.ndarray | None = field(default=None, repr=False)
    _means: dict[Head, torch.Tensor] = field(default_factory=dict, repr=False)  # `effect_means`, filled on first use

    @classmethod
    def load(cls, home: Home, version: str) -> Lenses:
        """Return the lenses of train version `version` of `home`."""
        from loralens.config import parse_config
        from loralens.tasks.lens_loading import cached_layers, load_reader
        from loralens.tasks.stage_versions import StageVersion

        train = home.manifest("train", version)
        train_ver = StageVersion("train", version, train["config"], train["inputs"], home.path)
        cache = home.manifest("cache", train_ver.inputs["cache"])
        layers = cached_layers(cache)
        m = cache["config"]["model"]
        lean, reader = load_reader(parse_config({"home": str(home.path), "model": m}), train_ver, layers)
        base = ModelSpec(m["name"], m["dtype"], m.get("revision"), m.get("trust_remote_code", False))
        return cls(layers=layers, reader=reader, lean=lean, base=base, store_dtype=cache["config"]["cache"]
                   ["store_dtype"], vocab_tox=_token_toxicity(home, version), version=version, home=home,
                   model_home=home.path)

    @classmethod
    def from_pretrained(cls, source: str | Path, model: Any = None, *, tokenizer: Any = None,
                        home: str | Path | None = None, device: str = "auto", revision: str | None = None) -> Lenses:
        """Return the lenses saved in folder (or hub repository) `source`, on `model` (default: their base model).

        `model`: a name (embedded alias, folder, hub id), a `loralens.load_model` result, or a HF model with its
        `tokenizer`. A model whose folded unembedding is not the one they were trained on is refused (ApiError).
        See `loralens.api.pretrained.load_lenses` for `home`, `device` and `revision` (of a hub repository).
        """
        from loralens.api.pretrained import load_lenses

        return load_lenses(source, model, tokenizer=tokenizer, home=home, device=device, revision=revision)

    def save_pretrained(self, out_dir: str | Path) -> Path:
        """Write these lenses to `out_dir` (config.json + one safetensors file per layer); return the folder."""
        from loralens import __version__
        from loralens.lens.lenses.pretrained import LensFolderError, write_lenses

        dims = self.lean.dims
        info = {"loralens_version": __version__, "base_model": asdict(self.base), "train_version": self.version,
                "n_layers": dims.n_layers, "d_head": dims.d_head, "store_dtype": self.store_dtype}
        try:
            return write_lenses(out_dir, self.reader.banks, info, self.vocab_tox)
        except LensFolderError as err:
            raise ApiError(f"out_dir: {err}") from None

    @property
    def n_heads(self) -> int:
        """Return the number of query heads per layer."""
        return self.lean.dims.n_heads

    @property
    def model(self) -> LoadedModel:
        """Return the full model these lenses read (loaded on first use, in the dtype the cache stage ran it)."""
        if self._model is None:
            b = self.base
            self._model = _load_model(b.name, self.model_home or default_home(), dtype=b.dtype, revision=b.revision,
                                      trust_remote_code=b.trust_remote_code, device=self.reader.device)
        return self._model

    def check_heads(self, heads: HeadsLike | None, param: str = "heads") -> list[Head]:
        """Return the heads as `(layer, head)` pairs (all lensed heads if None); ApiError naming one out of range."""
        if heads is None:
            return [(layer, h) for layer in self.layers for h in range(self.n_heads)]
        return check_heads(heads, self.layers, self.n_heads, param)

    def decode(self, text: str, heads: HeadsLike | None = None, k: int = 10, position: str | int = "all",
               chunk: int = 64, effect: bool = False) -> Decoding:
        """Return the top-`k` tokens of each head at each position of `text` under the trained and the logit lens.

        `heads`: "L21H3", "L21H3,L5H0", ["L21H3", (5, 0)], ... (default: every lensed head). `position`: "all",
        "last" or one index. The text is tokenized as the cache stage tokenizes prompts; `[chunk, H, V]` is the
        largest buffer built. `effect`: also each head's effect rows (lens "effect"): the tokens it adds the most
        probability to in the model's own output, against the model with that head mean-ablated (`effect_means`);
        one more forward pass of the text per head.
        """
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ApiError(f"k: must be an integer >= 1, got {k!r}")
        if not isinstance(effect, bool):
            raise ApiError(f"effect: must be True or False, got {effect!r}")
        wanted = self.check_heads(heads)
        loaded = self.model
        ids = tokenize_prompts(loaded.tokenizer, [text], model_context_length(loaded.model.config)).ids[0]
        if not ids:
            raise ApiError("text: it tokenizes to no tokens")
        positions = text_positions(position, len(ids))
        layers = sorted({layer for layer, _ in wanted})
        arrays = cache_batch(loaded, [ids], [0], layers, top_k=0, store_dtype=self.store_dtype)
        dev = self.reader.device
        scale = torch.from_numpy(arrays.scale[positions].astype(np.float32)).to(dev)
        texts = self.token_texts()
        input_tokens = texts[np.asarray(ids)].tolist()
        tox = self.vocab_tox.to(dev) if self.vocab_tox is not None else torch.zeros(self.lean.dims.vocab, device=dev)
        toxic_dir = toxic_direction(self.reader.unembed.W, tox)

        def block_of(layer: int, lens: str, rows: slice, top_ids: Tensor, logits: Tensor, probs: Tensor,
                     per_head: dict[str, Tensor]) -> pa.Table:
            """Return the decodings rows of one layer and lens (`[n, H, k]` tops, `[n, H]` per-head columns)."""
            block = decodings_block(0, layer, lens, np.zeros(len(top_ids), np.int32), positions[rows],
                                    top_ids.cpu().numpy(), logits.cpu().numpy(), probs.cpu().numpy(), texts)
            for name, values in per_head.items():
                col = np.repeat(values.cpu().numpy().reshape(-1).astype(np.float32), top_ids.shape[-1])
                if self.vocab_tox is None:
                    col[:] = np.nan
                block = block.append_column(name, pa.array(col, pa.float32()))
            keep = pa.array([h for lay, h in wanted if lay == layer], pa.int16())
            return block.filter(pc.is_in(block["head"], keep))

        blocks, direct = [], {}
        for layer in layers:
            z = from_storage(arrays.z[layer][positions], self.store_dtype).to(dev)
            parts = []
            for rows in row_chunks(len(positions), chunk):
                x = lens_inputs(z[rows], scale[rows], self.reader.w_o[layer])  # [n, H, d]
                read = read_heads(self.reader.banks[layer], x, k, tox, toxic_dir)  # the decode stage's readout
                parts.append(read.direct_logit)
                for lens in ("trained", "logit"):
                    top = getattr(read, lens).top  # [n, H, k]
                    blocks.append(block_of(layer, lens, rows, top.ids, top.logits, top.probs, {
                        "expected_toxicity": getattr(read, lens).expected_toxicity,
                        "direct_logit": read.direct_logit}))
            direct[layer] = torch.cat(parts)  # [n, H]
        if effect:
            for layer, (ids_k, lift, added, tox_added) in self._effect_tops(ids, positions, wanted, k, tox).items():
                blocks.append(block_of(layer, "effect", slice(None), ids_k, lift, added, {
                    "expected_toxicity": tox_added, "direct_logit": direct[layer]}))
        table = pa.concat_tables(blocks).drop_columns(["shard", "prompt_idx"])
        table = table.add_column(1, "input_token", pa.array([input_tokens[p] for p in table["position"].to_pylist()],
                                                             pa.string()))
        order = pc.index_in(table["lens"], pa.array(LENS_ORDER))
        table = table.append_column("lens_order", order).sort_by([
            ("position", "ascending"), ("layer", "ascending"), ("head", "ascending"), ("lens_order", "ascending"),
            ("rank", "ascending")]).drop_columns(["lens_order"])
        return Decoding(tokens=input_tokens, table=table)

    def effect_means(self) -> dict[Head, torch.Tensor]:
        """Return every lensed head's mean z `[d_head]`, what the effect rows ablate it to: over the first
        `intervene.mean_tokens` (`EFFECT_MEAN_TOKENS`) tokens of the bundled WikiText-2, as the intervene stage's
        `mean` edit (one pass for all layers on first use, then kept)."""
        from loralens.lens.heads.edits import text_head_means
        from loralens.tasks.evaluation.wikitext import wikitext

        if not self._means:
            n = EFFECT_MEAN_TOKENS
            self._means = text_head_means(self.model, self.layers, wikitext(n), n)
        return self._means

    def _effect_tops(self, ids: list[int], positions: np.ndarray, heads: list[Head], k: int,
                     tox: torch.Tensor) -> dict[int, tuple[Tensor, Tensor, Tensor, Tensor]]:
        """Return layer -> (ids, log-prob lift, probability added) `[n, H, k]` of each wanted head's top-`k` tokens by
        probability added to the model's output at `positions`, and its added expected toxicity `[n, H]` (zeros for
        the layer's other heads, which the caller drops)."""
        from loralens.lens.heads.effects import head_effects

        loaded = self.model
        n, n_heads, k = len(positions), self.n_heads, min(k, self.lean.dims.vocab)
        out: dict[int, tuple[Tensor, Tensor, Tensor, Tensor]] = {}
        tokens = torch.tensor([ids])  # host: head_effects moves it to the model
        rows = torch.as_tensor(positions)  # host: indexes the logits' positions
        for (layer, h), base, ablated in head_effects(loaded.model, loaded.adapter, loaded.dims, tokens, rows, heads,
                                                      self.effect_means()):
            if layer not in out:  # host: small per-head tops, filled from .cpu() values
                out[layer] = (torch.zeros(n, n_heads, k, dtype=torch.long), torch.zeros(n, n_heads, k),  # host
                              torch.zeros(n, n_heads, k), torch.zeros(n, n_heads))  # host: as above
            added = base.exp() - ablated.exp()  # [n, V]
            top = added.topk(k, dim=-1)
            top_ids, lift, probs, tox_added = out[layer]
            top_ids[:, h], probs[:, h] = top.indices.cpu(), top.values.cpu()
            lift[:, h] = (base - ablated).gather(1, top.indices).cpu()
            tox_added[:, h] = (added @ tox.to(added.device)).cpu()
        return out

    def mechanisms(self, batch: int = 8, seq_len: int = 25, seed: int = 0, effect: bool = False) -> Mechanisms:
        """Return every head's induction / previous-token scores and copy rates (logit and trained lens) on `batch`
        sequences `[BOS] + r + r`, r = `seq_len` random token ids (special ids excluded, drawn with `seed`).

        Runs the full model once with eager attention; layers without a trained lens get only the logit lens.
        `effect`: also each head's copy rate read from what it adds to the model's output (the model's log-probs
        minus those with the head mean-ablated): one more forward pass per head.
        """
        from loralens.api.mechanisms import Mechanisms
        from loralens.lens.evaluation.mechanisms import mechanism_rows, model_mechanism_scores

        for name, value, low in (("batch", batch, 1), ("seq_len", seq_len, 2), ("seed", seed, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ApiError(f"{name}: must be an integer >= {low}, got {value!r}")
        if not isinstance(effect, bool):
            raise ApiError(f"effect: must be True or False, got {effect!r}")
        scores = model_mechanism_scores(self.model, self.reader.banks, batch=batch, seq_len=seq_len, seed=seed,
                                        effect=effect)
        return Mechanisms.from_rows(mechanism_rows(scores), model_top1=scores.model_top1,
                                    n_positions=scores.n_positions, train_version=self.version, batch=batch,
                                    seq_len=seq_len, seed=seed)

    def token_texts(self) -> np.ndarray:
        """Return every token id's surface text (as the decode stage stores it), padded to the vocabulary."""
        if self._texts is None:
            vocab = self.lean.dims.vocab
            self._texts = np.array((token_texts(self.lean.tokenizer) + [""] * vocab)[:vocab], dtype=object)
        return self._texts


def _token_toxicity(home: Home, train_version: str) -> torch.Tensor | None:
    """Return `[V]` token toxicity of the newest complete decode version of these lenses (what it read them with),
    or None when there is none."""
    from loralens.warehouse.artifacts import ArtifactDir
    from loralens.warehouse.decodings import token_toxicity_scores

    decode = home.latest("decode", parent=train_version)
    if decode is None:
        return None
    return torch.from_numpy(token_toxicity_scores(ArtifactDir(home.path, "decode", decode)))
