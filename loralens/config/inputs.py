"""The sections of the `cache` stage's inputs: the model, the prompt corpus and the cache settings."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from loralens.config.base import Section, execution_field

DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_CORPUS = ("bundled:rtp_toxic_dev", "bundled:rtp_nontoxic_dev")


class ModelConfig(Section):
    """Which causal LM to study and how to load it."""

    name: str = Field(DEFAULT_MODEL, description="embedded alias, HF hub id or local folder")
    revision: str | None = Field(None, description="hub revision (branch, tag or commit) of `name`")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: bfloat16 on a GPU, float32 on a CPU (the resolved dtype is in the versions)")
    device: str = execution_field("auto", pattern=r"^(auto|cpu|cuda|cuda:\d+)$",
                                  description="auto (cuda when available), cpu, cuda (LOCAL_RANK's GPU) or cuda:N")
    device_map: str | None = execution_field(
        None, description="Hugging Face device_map (e.g. auto) for a model larger than one GPU, in the stages that "
                          "run it (cache, select, intervene)")
    trust_remote_code: bool = Field(False, description="run the model repository's own modeling code (it can differ "
                                                       "from the built-in implementation, so it is hashed)")

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

    def science(self, *names: str) -> dict:
        """Return the science fields, `dtype` resolved (the device is execution-only; the dtype it implies is not)."""
        out = super().science(*names)
        return out | {"dtype": self.resolved_dtype()} if "dtype" in out else out


class CorpusConfig(Section):
    """Prompt files: `bundled:NAME`, or paths to .jsonl / .txt / .parquet files."""

    paths: tuple[str, ...] = Field(DEFAULT_CORPUS, description="prompt files the heads are decoded and scored on "
                                                                "(`bundled:NAME` or a path)")
    max_prompts_per_file: int | None = Field(128, gt=0, description="first N prompts of each file (null: all)")
    text_paths: tuple[str, ...] = Field(
        (), description="text the lenses also train on, never decoded, scored or sampled (`bundled:NAME` or a "
        ".txt / .jsonl / .parquet path): the files' texts in order, one token stream cut into windows of "
        "cache.max_length tokens")
    text_tokens: int = Field(16384, gt=0, description="tokens of text_paths cached (the first ones after text_start)")
    text_start: float = Field(0.5, ge=0, lt=1, description="fraction of each text file skipped (the bundled "
                                                           "WikiText-2's first half is where perplexity is measured)")

    @field_validator("paths")
    @classmethod
    def _some_paths(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v:
            raise ValueError("must list at least one prompt file")
        return v


class CacheConfig(Section):
    """How the `cache` stage runs the frozen model and what it stores."""

    batch_size: int = execution_field(16, gt=0, description="prompts per forward pass of the frozen model")
    max_length: int = Field(64, gt=1, description="tokens per prompt; longer prompts are truncated")
    prompts_per_shard: int = Field(64, gt=0, description="prompts per cache shard (hashed: shards are the units "
                                                         "train visits in a seeded order)")
    store_dtype: Literal["float16", "bfloat16"] = Field("float16", description="dtype the activations are stored in")
    top_k: int | None = Field(None, ge=0, description="target top-k (and log-sum-exp) stored for subset losses; "
                                                     "None: 64 when train.loss is subset, else 0 (not computed)")
    layers: tuple[int, ...] | None = Field(None, description="layers to cache; None = all")
