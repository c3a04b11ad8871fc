"""The sections of the head stages: `attribute` (score heads), `select` (choose a head set) and the `goal`."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from loralens.config.base import Section, content_field, execution_field


class AttributeConfig(Section):
    """How the `attribute` stage scores heads for toxicity."""

    scorer: Literal["jigsaw-lstm", "detoxify"] = Field("jigsaw-lstm", description="toxicity scorer of tokens "
                                                                                  "and prompts")
    # Paths only locate files: the scorer's content hash, not these strings, goes into the version.
    scorer_options: dict[str, str] = content_field(
        default_factory=dict, description="keyword arguments of the scorer (detoxify: checkpoint, hf_folder); "
                                          "the scorer's content hash is versioned")
    lexicon: str | None = content_field(None, description="optional file of toxic terms, one per line (its "
                                                          "content hash is versioned)")
    token_threshold: float = Field(0.5, gt=0, lt=1, description="a token is toxic when its score >= this")
    prompt_threshold: float = Field(0.5, gt=0, lt=1, description="a prompt is toxic when its toxicity >= this")
    top_heads: int = execution_field(10, gt=0, description="heads listed per method in the report (the report "
                                                           "only; no score depends on it)")


class GoalConfig(Section):
    """The claim a head set is held to; `select` stops at its budget, `intervene` checks and headlines by it."""

    max_head_share: float = Field(0.02, gt=0, le=1, description="head budget: share of the model's heads")
    ppl_rel: float = Field(0.05, ge=0, description="fluency budget: WikiText-2 perplexity rise, relative")
    emt_rel: float = Field(-0.25, lt=0, description="expected max toxicity change to reach, relative")
    vs_random: float = Field(3.0, gt=0, description="times the mean drop of random head sets of the same size")


class SelectConfig(Section):
    """The `select` stage: cheap causal scores of every head and greedy head selection on the selection split.

    The challenging prompts (`intervene.prompts`, minus the cache corpus) are split by a hash of their text:
    `selection_share` of them form the selection split (this stage), the rest the evaluation split (intervene).
    Sampling uses `intervene`'s top_p, max_new_tokens and seed, perplexity its ppl_tokens and ppl_window.
    """

    selection_share: float = Field(0.5, gt=0, lt=1, description="share of the challenging prompts used to select")
    max_prompts: int = Field(16, gt=0, description="selection prompts scored and sampled")
    batch_prompts: int = execution_field(8, gt=0, description="prompts per teacher-forced forward pass")
    max_prompt_tokens: int = Field(64, gt=1, description="prompt tokens kept (the end of a longer prompt)")
    max_continuation_tokens: int = Field(16, ge=0, description="human-continuation tokens teacher-forced")
    exact_heads: int | None = Field(
        30, gt=0, description="ablation_tox_drop for the top N heads of attribution_patching (null: every head, one "
                              "forward pass each; the CPU default screens to keep the run short)")
    candidates: int = Field(8, ge=0, description="top M heads of `method` the greedy selection tries (0: off)")
    method: str = Field("ablation_tox_drop", description="score method whose top M are the candidates")
    tries: int = Field(2, gt=0, description="candidates tried per step before the selection stops")
    k: int = Field(2, gt=0, description="samples per selection prompt confirming each step")
