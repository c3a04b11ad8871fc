"""The prompt splits of a config (`loralens.warehouse.prompt_splits`): one function, used by select and intervene."""

from __future__ import annotations

from loralens.config import ConfigError, PipelineConfig
from loralens.warehouse.corpus import load_corpus
from loralens.warehouse.prompt_splits import Splits, split_challenging


def prompt_splits(cfg: PipelineConfig) -> Splits:
    """Return the corpus (the cache corpus), selection and evaluation splits of `cfg`'s prompt files."""
    ic = cfg.intervene
    corpus = load_corpus(cfg.corpus.paths, cfg.corpus.max_prompts_per_file).prompts
    splits = split_challenging(load_corpus(ic.prompts).prompts, corpus, cfg.select.selection_share,
                               max_selection=cfg.select.max_prompts, max_evaluation=ic.max_prompts,
                               held_out=ic.held_out)
    for name, key in (("evaluation", "intervene.max_prompts"), ("selection", "select.max_prompts")):
        if not splits.of(name):
            raise ConfigError(f"config error: intervene.prompts: no prompt left for the {name} split ({key}) after "
                              "dropping the cache corpus's prompts (add prompt files, change "
                              "select.selection_share, or set intervene.held_out: false)")
    return splits


__all__ = ["prompt_splits"]
