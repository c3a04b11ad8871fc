"""The `intervene` section: which head sets to edit, how to sample continuations, and how to measure them."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from loralens.config.base import Section, execution_field


class HeadSetConfig(Section):
    """One set of heads to intervene on: hand-written, the top N of a score method, or a SQL query."""

    name: str | None = Field(None, description="condition label; derived from the source when omitted")
    heads: str | None = Field(None, description='explicit heads, e.g. "L3H1,L5H0" or "3.1 5.0"')
    top_n: int | None = Field(None, gt=0, description="the N best-ranked heads of `method` in head_scores")
    method: str = Field("lens_contrast", description="score method for top_n")
    sql: str | None = Field(None, description="read-only query over the warehouse returning (layer, head) rows")
    selected: bool | None = Field(None, description="true: the set the select stage chose (greedy, causal)")

    @model_validator(mode="after")
    def _one_source(self) -> HeadSetConfig:
        if self.selected is False:
            raise ValueError("selected: give true (the select stage's set) or leave it out")
        given = [k for k in ("heads", "top_n", "sql", "selected") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of heads, top_n, sql, selected (got {', '.join(given) or 'none'})")
        return self


class InterveneConfig(Section):
    """How the `intervene` stage ablates heads, samples continuations and measures toxicity and fluency."""

    prompts: tuple[str, ...] = Field(("bundled:rtp_toxic_dev",), description="prompt files (challenging prompts)")
    max_prompts: int = Field(24, gt=0, description="evaluation prompts (the first N of the evaluation split)")
    held_out: bool = Field(True, description="skip prompts of the cache corpus: heads were attributed on those, so "
                                             "the evaluation uses prompts the head selection never saw")
    # RealToxicityPrompts protocol: k=25 samples, nucleus p=0.9, 20 new tokens. k=4 keeps the CPU default run short.
    k: int = Field(4, gt=0, description="continuations sampled per prompt (RealToxicityPrompts: 25)")
    max_new_tokens: int = Field(20, gt=0, description="tokens per continuation (also select's samples)")
    top_p: float = Field(0.9, gt=0, le=1, description="nucleus sampling p (also select's samples)")
    seed: int = Field(0, description="base seed: a sample's seed is a hash of (seed, prompt text, sample index); "
                                     "also select's samples and the bootstrap")
    kind: Literal["zero", "mean", "scale", "project"] = Field("zero", description="how a head is edited")
    factor: float = Field(0.0, description="scale: multiply the head's output by this")
    head_sets: tuple[HeadSetConfig, ...] = Field(
        (*(HeadSetConfig(top_n=n) for n in (1, 3, 5)), HeadSetConfig(top_n=3, method="ablation_tox_drop"),
         HeadSetConfig(selected=True)), description="conditions besides the baseline (their resolved heads are "
                                                    "versioned)")
    random_seeds: tuple[int, ...] = Field((0,), description="random head sets of each size, one per seed")
    ppl_tokens: int = Field(2048, gt=1, description="WikiText-2 tokens for perplexity (also select's)")
    ppl_window: int = Field(256, gt=1, description="perplexity window in tokens (also select's)")
    mean_tokens: int = Field(4096, gt=0, description="WikiText-2 tokens averaged for the 'mean' intervention")
    ablation_candidates: int = Field(0, ge=0, description="top heads scored causally one at a time by sampling "
                                                          "(0: off; select's ablation_tox_drop is the cheap score)")
    ablation_method: str = Field("lens_contrast", description="score method whose top heads ablation_candidates "
                                                              "takes")
    ablation_prompts: int = Field(16, gt=0, description="prompts per single-head ablation condition")
    ablation_k: int = Field(2, gt=0, description="samples per prompt in the single-head ablation conditions")
    n_boot: int = Field(1000, gt=0, description="bootstrap resamples of the confidence intervals")
    batch_prompts: int = execution_field(8, gt=0, description="prompts per generation batch (the unit of work and "
                                                              "of resumption; never changes a sample)")
