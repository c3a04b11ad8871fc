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

from loralens.api.decoding import Decoding, text_positions
from loralens.api.errors import ApiError
from loralens.api.heads import HeadsLike, check_heads
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
               chunk: int = 64) -> Decoding:
        """Return the top-`k` tokens of each head at each position of `text` under the trained and the logit lens.

        `heads`: "L21H3", "L21H3,L5H0", ["L21H3", (5, 0)], ... (default: every lensed head). `position`: "all",
        "last" or one index. The text is tokenized as the cache stage tokenizes prompts; `[chunk, H, V]` is the
        largest buffer built.
        """
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ApiError(f"k: must be an integer >= 1, got {k!r}")
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
        blocks = []
        for layer in layers:
            keep = pa.array([h for lay, h in wanted if lay == layer], pa.int16())
            z = from_storage(arrays.z[layer][positions], self.store_dtype).to(dev)
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
