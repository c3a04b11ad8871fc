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


class SteeringConfig(Section):
    """Head-wise steering chosen by the `select` stage (on the selection split) and tested by `intervene`.

    Per-head toxic directions from each of `sources` (`contrast`: mean z where the human continuation is toxic
    minus where it is not; `unembed`: the unembedding's toxic direction pulled back to the head; `lens`: through
    the head's trained Lora Lens), edits `steer` (a constant shift of `alpha` sigmas) and `reverse` (remove
    `alpha` x the positive part along the direction). Heads are ranked by a fluency-aware first-order score;
    sizes x alphas are measured exactly; the best within the goal's budgets is preregistered as the headline,
    with `random_sets` random head sets of its size as controls, drawn in seed order (`intervene.seed`) and kept
    only when their perplexity rise under the same edit is within the goal's budget (fluency-matched).
    """

    enabled: bool = Field(True, description="choose and preregister a steering condition (off: zero-ablation "
                                            "selection only)")
    sources: tuple[Literal["contrast", "unembed", "lens"], ...] = Field(
        ("contrast", "unembed", "lens"), min_length=1, description="direction sources tried")
    edits: tuple[Literal["steer", "reverse"], ...] = Field(("steer", "reverse"), min_length=1,
                                                          description="steering edits tried")
    alphas: tuple[float, ...] = Field((1.0, 2.0, 4.0), min_length=1, description="strengths tried (steer: "
                                                                                 "sigmas; reverse: factor)")
    sizes: tuple[int, ...] = Field((1, 2, 4), min_length=1, description="head-set sizes tried (at most the "
                                                                        "goal's head budget)")
    threshold: float = Field(0.5, gt=0, lt=1, description="a human continuation is toxic (contrast labels) when "
                                                          "its score >= this (median split if a group is empty)")
    random_sets: int = Field(20, ge=0, description="random head sets preregistered as the headline's controls (its "
                                                   "permutation test), each within the goal's PPL budget under "
                                                   "the headline's edit")
    random_draws: int = Field(100, ge=1, description="most random head sets drawn to find random_sets within the "
                                                     "PPL budget")
    all_heads: bool = Field(True, description="also preregister the best all-heads steering (a second claim)")
    all_heads_alphas: tuple[float, ...] = Field((0.125, 0.25, 0.5, 1.0), min_length=1,
                                                description="strengths tried when every head is steered")
    all_heads_ppl_rel: float = Field(0.10, ge=0, description="perplexity budget of the all-heads condition")


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
    steering: SteeringConfig = Field(SteeringConfig(), description="head-wise steering: directions, edits, "
                                                                   "strengths; the preregistered headline")
