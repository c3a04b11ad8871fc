"""Lora Lens: find and remove the attention heads that make a language model toxic, with per-head low-rank lenses.

The public API (see the README's "Python API"), imported on first use so that `import loralens` stays light:

- `loralens.open(path)` (or `open_home`) -> `Home`: versions, head scores, interventions, SQL on the warehouse;
- `Home.lenses()` -> `Lenses`, whose `decode(text, heads, k)` gives each head's top tokens under both lenses
  and `mechanisms()` every head's induction score and copy rates under both (`Mechanisms`);
- `Lenses.save_pretrained(dir)`, `loralens.Lenses.from_pretrained(dir_or_hub_id, model)`: portable lens folders;
  `loralens.export_lenses(out_dir, home)` writes one from a project home;
- `loralens.ablate(model, heads, kind="zero")`: a context manager editing heads of a loaded HF model;
- `loralens.load_model(name)`: a frozen HF causal LM (embedded alias, local folder or hub id).

Heads are typed as "L21H3", "L21H3,L5H0", ["L21H3", "L5H0"], [(21, 3)] or mixed lists (`loralens.parse_heads`).
"""

__version__ = "0.1.0"

_API = {"open": "open_home", "open_home": "open_home", "load_model": "load_model", "ablate": "ablate",
        "Home": "Home", "Lenses": "Lenses", "Decoding": "Decoding", "Mechanisms": "Mechanisms",
        "ApiError": "ApiError", "parse_heads": "parse_heads", "export_lenses": "export_lenses"}
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    """Import the API package on first access of one of its names (it imports torch)."""
    if name in _API:
        from loralens import api

        return getattr(api, _API[name])
    raise AttributeError(f"module 'loralens' has no attribute {name!r}")
