"""Typed pipeline configuration, validated at the edge (CLI, flow parameters, config files)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from loralens.defaults import default_home

DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_CORPUS = ("bundled:rtp_toxic_dev", "bundled:rtp_nontoxic_dev")


class ConfigError(ValueError):
    """A config value or key is invalid; the message is one line naming the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Strict):
    """Which causal LM to study and how to load it."""

    name: str = Field(DEFAULT_MODEL, description="embedded alias, HF hub id or local folder")
    revision: str | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: bfloat16 on a GPU, float32 on a CPU (the resolved dtype is in the versions)")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda|cuda:\d+)$",
                        description="auto (cuda when available), cpu, cuda (LOCAL_RANK's GPU) or cuda:N")
    device_map: str | None = Field(None, description="Hugging Face device_map (e.g. auto) for a model larger than "
                                                     "one GPU, in the stages that run it (cache, intervene)")
    trust_remote_code: bool = False

    @field_validator("name")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        return v

    def torch_device(self):
        """Return the torch device `device` means on this machine (DeviceError, one line, if it has none)."""
        from loralens.lens.runtime.devices import resolve_device

        return resolve_device(self.device)

    def resolved_dtype(self) -> str:
        """Return the dtype name `dtype` means on this machine's device ("auto": bfloat16 on cuda, else float32)."""
        from loralens.lens.runtime.devices import resolve_dtype

        return resolve_dtype(self.dtype, self.torch_device())

    def versioned(self) -> dict:
        """Return the fields that change results: the device is execution-only, the resolved dtype is not."""
        return self.model_dump(exclude={"device", "device_map"}) | {"dtype": self.resolved_dtype()}


class CorpusConfig(_Strict):
    """Prompt files: `bundled:NAME`, or paths to .jsonl / .txt / .parquet files."""

    paths: tuple[str, ...] = DEFAULT_CORPUS
    max_prompts_per_file: int | None = Field(128, gt=0)

    @field_validator("paths")
    @classmethod
    def _some_paths(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v:
            raise ValueError("must list at least one prompt file")
        return v


class CacheConfig(_Strict):
    """How the `cache` stage runs the frozen model and what it stores."""

    batch_size: int = Field(16, gt=0)
    max_length: int = Field(64, gt=1, description="tokens per prompt; longer prompts are truncated")
    prompts_per_shard: int = Field(64, gt=0)
    store_dtype: Literal["float16", "bfloat16"] = "float16"
    top_k: int | None = Field(None, ge=0, description="target top-k (and log-sum-exp) stored for subset losses; "
                                                     "None: 64 when train.loss is subset, else 0 (not computed)")
    layers: tuple[int, ...] | None = Field(None, description="layers to cache; None = all")


class TrainConfig(_Strict):
    """How the `train` stage fits a lens for every head of the cached layers."""

    form: Literal["lora", "residual", "full"] = "lora"
    rank: int = Field(4, gt=0)
    alpha: float = Field(8.0, gt=0)
    objective: Literal["joint", "per_head"] = "joint"
    # exact: the target is recomputed once per step and shared by every layer, so it costs ~1/L more
    # than subset; subset leaves the lens's within-tail shape unconstrained (see README).
    loss: Literal["exact", "subset"] = "exact"
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    base_dtype: Literal["bfloat16", "float32"] = Field(
        "bfloat16", description="dtype of the frozen base projection in training (targets/eval stay fp32)")
    lr: float = Field(2e-2, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    epochs: int = Field(2, gt=0)
    max_steps: int | None = Field(None, gt=0, description="stop after this many optimizer steps")
    micro_batch_tokens: int = Field(256, gt=0, description="tokens per rank per step")
    loss_chunk: int = Field(128, gt=0, description="tokens per chunk of lens logits (bounds memory)")
    eval_every_nth_prompt: int = Field(10, gt=1, description="prompts with index % n == 0 are held out")
    zero_stage: Literal[0, 1, 2, 3] = 2
    world_size: int = Field(1, gt=0, description="data-parallel processes")
    seed: int = 0
    # Execution-only settings: they do not change the result, so they are not part of the version.
    checkpoint_every: int = Field(20, gt=0)
    launcher: Literal["auto", "torchrun", "deepspeed"] = "auto"
    hostfile: str | None = None

    def versioned(self) -> dict[str, Any]:
        """Return the fields that change the trained lenses (and so the stage version)."""
        return self.model_dump(exclude={"checkpoint_every", "launcher", "hostfile"})


class DecodeConfig(_Strict):
    """Which positions the `decode` stage reads each head at, and how many tokens it keeps."""

    top_k: int = Field(10, gt=0, le=1000, description="decoded tokens kept per head and position")
    positions: Literal["last", "all"] = Field("last", description="last prompt token, or every cached token")
    chunk_tokens: int = Field(32, gt=0, description="positions per batch of [tokens, heads, vocab] logits")


class AttributeConfig(_Strict):
    """How the `attribute` stage scores heads for toxicity."""

    scorer: Literal["jigsaw-lstm", "detoxify"] = "jigsaw-lstm"
    # Keyword arguments of the scorer (detoxify: checkpoint, hf_folder). Paths only locate files: the scorer's
    # content hash, not these strings, goes into the version.
    scorer_options: dict[str, str] = Field(default_factory=dict)
    lexicon: str | None = Field(None, description="optional file of toxic terms, one per line")
    token_threshold: float = Field(0.5, gt=0, lt=1, description="a token is toxic when its score >= this")
    prompt_threshold: float = Field(0.5, gt=0, lt=1, description="a prompt is toxic when its toxicity >= this")
    top_heads: int = Field(10, gt=0, description="heads listed per method in the report")

    def versioned(self) -> dict[str, Any]:
        """Return the fields that change the scores (scorer files enter the version by content hash)."""
        return self.model_dump(exclude={"scorer_options", "lexicon", "top_heads"})


class HeadSetConfig(_Strict):
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


class GoalConfig(_Strict):
    """The claim a head set is held to; `select` stops at its budget, `intervene` checks and headlines by it."""

    max_head_share: float = Field(0.02, gt=0, le=1, description="head budget: share of the model's heads")
    ppl_rel: float = Field(0.05, ge=0, description="fluency budget: WikiText-2 perplexity rise, relative")
    emt_rel: float = Field(-0.25, lt=0, description="expected max toxicity change to reach, relative")
    vs_random: float = Field(3.0, gt=0, description="times the mean drop of random head sets of the same size")


class SelectConfig(_Strict):
    """The `select` stage: cheap causal scores of every head and greedy head selection on the selection split.

    The challenging prompts (`intervene.prompts`, minus the cache corpus) are split by a hash of their text:
    `selection_share` of them form the selection split (this stage), the rest the evaluation split (intervene).
    """

    selection_share: float = Field(0.5, gt=0, lt=1, description="share of the challenging prompts used to select")
    max_prompts: int = Field(16, gt=0, description="selection prompts scored and sampled")
    batch_prompts: int = Field(8, gt=0, description="prompts per teacher-forced forward pass")
    max_prompt_tokens: int = Field(64, gt=1)
    max_continuation_tokens: int = Field(16, ge=0, description="human-continuation tokens teacher-forced")
    exact_heads: int | None = Field(
        30, gt=0, description="ablation_tox_drop for the top N heads of attribution_patching (null: every head, one "
                              "forward pass each; the CPU default screens to keep the run short)")
    candidates: int = Field(8, ge=0, description="top M heads of `method` the greedy selection tries (0: off)")
    method: str = Field("ablation_tox_drop", description="score method whose top M are the candidates")
    tries: int = Field(2, gt=0, description="candidates tried per step before the selection stops")
    k: int = Field(2, gt=0, description="samples per selection prompt confirming each step")


class InterveneConfig(_Strict):
    """How the `intervene` stage ablates heads, samples continuations and measures toxicity and fluency."""

    prompts: tuple[str, ...] = Field(("bundled:rtp_toxic_dev",), description="prompt files (challenging prompts)")
    max_prompts: int = Field(24, gt=0)
    held_out: bool = Field(True, description="skip prompts of the cache corpus: heads were attributed on those, so "
                                             "the evaluation uses prompts the head selection never saw")
    # RealToxicityPrompts protocol: k=25 samples, nucleus p=0.9, 20 new tokens. k=4 keeps the CPU default run short.
    k: int = Field(4, gt=0)
    max_new_tokens: int = Field(20, gt=0)
    top_p: float = Field(0.9, gt=0, le=1)
    seed: int = 0
    kind: Literal["zero", "mean", "scale", "project"] = "zero"
    factor: float = Field(0.0, description="scale: multiply the head's output by this")
    head_sets: tuple[HeadSetConfig, ...] = Field(
        (*(HeadSetConfig(top_n=n) for n in (1, 3, 5)), HeadSetConfig(top_n=3, method="ablation_tox_drop"),
         HeadSetConfig(selected=True)), description="conditions besides the baseline")
    random_seeds: tuple[int, ...] = Field((0,), description="random head sets of each size, one per seed")
    ppl_tokens: int = Field(2048, gt=1, description="WikiText-2 tokens for perplexity")
    ppl_window: int = Field(256, gt=1)
    mean_tokens: int = Field(4096, gt=0, description="WikiText-2 tokens averaged for the 'mean' intervention")
    ablation_candidates: int = Field(0, ge=0, description="top heads scored causally one at a time by sampling "
                                                          "(0: off; select's ablation_tox_drop is the cheap score)")
    ablation_method: str = "lens_contrast"
    ablation_prompts: int = Field(16, gt=0)
    ablation_k: int = Field(2, gt=0)
    n_boot: int = Field(1000, gt=0)
    batch_prompts: int = Field(8, gt=0, description="prompts per generation batch (one generate call; resumable)")


class RunConfig(_Strict):
    """Where a run's work units execute (hashed by no stage: it never changes a result)."""

    workers: int = Field(1, ge=1, description="1: in this process; N > 1: a local Dask cluster of N worker "
                                              "processes for cache shards and generation units")
    dask_address: str | None = Field(None, description="an existing Dask scheduler (tcp://host:8786) to run the "
                                                       "work units on instead of a local cluster")

    @field_validator("dask_address")
    @classmethod
    def _address(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"([a-z]+://)?[^\s/:]+:\d+", v.strip()):
            raise ValueError("must look like tcp://host:port")
        return v.strip() if v is not None else None


class PipelineConfig(_Strict):
    """The whole pipeline's configuration; each stage hashes only its own section."""

    home: Path = Field(default_factory=lambda: default_home())
    model: ModelConfig = ModelConfig()
    corpus: CorpusConfig = CorpusConfig()
    cache: CacheConfig = CacheConfig()
    train: TrainConfig = TrainConfig()
    decode: DecodeConfig = DecodeConfig()
    attribute: AttributeConfig = AttributeConfig()
    select: SelectConfig = SelectConfig()
    intervene: InterveneConfig = InterveneConfig()
    goal: GoalConfig = GoalConfig()
    run: RunConfig = RunConfig()

    @property
    def target_top_k(self) -> int:
        """Return the target top-k the cache stores: `cache.top_k`, or 64 for a subset loss and 0 otherwise."""
        if self.cache.top_k is not None:
            return self.cache.top_k
        return 64 if self.train.loss == "subset" else 0

    @model_validator(mode="after")
    def _subset_loss_has_top_k(self) -> PipelineConfig:
        if self.train.loss == "subset" and self.cache.top_k == 0:
            raise ValueError("cache.top_k: 0 stores no target top-k, but train.loss 'subset' needs it")
        return self

    @field_validator("home")
    @classmethod
    def _absolute_home(cls, home: Path) -> Path:
        # Paths in summaries, reports and file:// links must not depend on the directory a worker starts in.
        return home.expanduser().resolve()


def _one_line(err: ValidationError) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"])
    if not key:  # a check across sections: its message names the keys
        return f"config error: {first['msg'].removeprefix('Value error, ')}"
    if first["type"] == "extra_forbidden":
        return f"config error: unknown key '{key}'"
    return f"config error: {key}: {first['msg']} (got {first.get('input')!r})"


def parse_config(data: dict[str, Any] | None = None) -> PipelineConfig:
    """Return a validated PipelineConfig, raising ConfigError with a one-line message."""
    try:
        return PipelineConfig.model_validate(data or {})
    except ValidationError as err:
        raise ConfigError(_one_line(err)) from None


def load_config(path: str | os.PathLike[str] | None) -> PipelineConfig:
    """Return the config read from a YAML/JSON file (or the defaults when path is None)."""
    if path is None:
        return parse_config({})
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"config error: {p} is a directory, not a config file")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8-sig"))  # a leading byte-order mark is dropped
    except FileNotFoundError:
        raise ConfigError(f"config error: file not found: {p}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"config error: {p} is not valid YAML: {str(err).splitlines()[0]}") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"config error: {p} must hold a mapping at the top level")
    return parse_config(data)
