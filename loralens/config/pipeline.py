"""The whole pipeline's configuration (`PipelineConfig`), the `run` section, and reading a config at the edge."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from loralens.config.base import ConfigError, Section, Strict, execution_field
from loralens.config.heads import AttributeConfig, GoalConfig, SelectConfig
from loralens.config.inputs import CacheConfig, CorpusConfig, ModelConfig
from loralens.config.intervene import InterveneConfig
from loralens.config.lens import DecodeConfig, TrainConfig
from loralens.defaults import default_home


class RunConfig(Section):
    """Where a run's work units execute (hashed by no stage: it never changes a result)."""

    workers: int = execution_field(1, ge=1, description="1: in this process; N > 1: a local Dask cluster of N worker "
                                                        "processes for cache shards and generation units")
    dask_address: str | None = execution_field(None, description="an existing Dask scheduler (tcp://host:8786) to "
                                                                 "run the work units on instead of a local cluster")

    @field_validator("dask_address")
    @classmethod
    def _address(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"([a-z]+://)?[^\s/:]+:\d+", v.strip()):
            raise ValueError("must look like tcp://host:port")
        return v.strip() if v is not None else None


class PipelineConfig(Strict):
    """The whole pipeline's configuration; each stage hashes the science fields of the sections it reads."""

    home: Path = execution_field(default_factory=lambda: default_home(),
                                 description="folder of the artifacts and the DuckDB warehouse")
    model: ModelConfig = Field(ModelConfig(), description="the causal LM studied")
    corpus: CorpusConfig = Field(CorpusConfig(), description="the prompts the heads are decoded and scored on")
    cache: CacheConfig = Field(CacheConfig(), description="the cache stage")
    train: TrainConfig = Field(TrainConfig(), description="the train stage")
    decode: DecodeConfig = Field(DecodeConfig(), description="the decode stage")
    attribute: AttributeConfig = Field(AttributeConfig(), description="the attribute stage")
    select: SelectConfig = Field(SelectConfig(), description="the select stage")
    intervene: InterveneConfig = Field(InterveneConfig(), description="the intervene stage")
    goal: GoalConfig = Field(GoalConfig(), description="the goal a head set is held to (select, intervene)")
    run: RunConfig = Field(RunConfig(), description="where the work units run")

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

    @model_validator(mode="after")
    def _bf16_lenses_need_zero(self) -> PipelineConfig:
        # DeepSpeed 0.19 (runtime/engine.py, _do_optimizer_sanity_check) refuses bf16 parameters with fp32 gradient
        # accumulation without ZeRO, and at ZeRO-1 its BF16_Optimizer sums micro-batch gradients in bf16.
        if self.train.param_dtype == "bfloat16" and self.train.zero_stage < 2:
            raise ValueError("train.param_dtype 'bfloat16' needs train.zero_stage 2 or 3 (DeepSpeed 0.19 sums a bf16 "
                             "lens's micro-batch gradients in bf16 at ZeRO 0 and 1)")
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
