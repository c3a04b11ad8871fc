"""The Python API: open a project home, read its warehouse, decode heads through their lenses, ablate heads,
save lenses to a portable folder and load them onto a model elsewhere.

    import loralens

    home = loralens.open(".loralens")                 # a project home after `loralens run`
    home.head_scores(method="lens_contrast")          # pyarrow.Table: layer, head, method, score, rank, ...
    lenses = home.lenses()                            # the newest complete train version (lean: no model built)
    d = lenses.decode("You are such an", heads="L21H3", k=10)
    d.top("L21H3")                                    # [(token, probability), ...] under the trained lens
    lenses.mechanisms().summary_line()                # induction heads: trained vs logit lens copy rates
    lenses.save_pretrained("smollm2-lenses")          # config.json + safetensors: a hub repository can hold it
    lenses = loralens.Lenses.from_pretrained("smollm2-lenses", "smollm2-135m-instruct")
    lm = loralens.load_model("smollm2-135m-instruct")
    with loralens.ablate(lm.model, ["L21H3", (5, 0)]):  # zero the heads in every forward pass inside the block
        ...

Heads are typed as "L21H3", "L21H3,L5H0", ["L21H3", "L5H0"], [(21, 3)] or mixed lists (`parse_heads`). Tables
are pyarrow Tables (`.to_pylist()`, or `.to_pandas()` with pandas installed).

Modules: `home` (Home, open_home), `lenses` (Lenses.decode, Lenses.mechanisms), `decoding` (Decoding),
`mechanisms` (Mechanisms), `heads` (parse_heads, ablate), `pretrained` (from_pretrained, export_lenses), `models`
(load_model), `errors` (ApiError).
"""

from __future__ import annotations

from loralens.api.decoding import Decoding
from loralens.api.errors import ApiError
from loralens.api.heads import ablate, check_heads, parse_heads
from loralens.api.home import Home, open_home
from loralens.api.lenses import Lenses, ModelSpec
from loralens.api.mechanisms import Mechanisms
from loralens.api.models import load_model
from loralens.api.pretrained import export_lenses, load_lenses
from loralens.lens.heads.edits import KINDS

__all__ = ["KINDS", "ApiError", "Decoding", "Home", "Lenses", "Mechanisms", "ModelSpec", "ablate", "check_heads",
           "export_lenses", "load_lenses", "load_model", "open_home", "parse_heads"]
