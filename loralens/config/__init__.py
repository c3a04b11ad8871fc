"""Typed pipeline configuration, validated at the edge (CLI, flow parameters, config files).

One module per group of sections: `inputs` (model, corpus, cache), `lens` (train, decode), `heads` (attribute,
goal, select), `intervene`, and `pipeline` (run, the whole `PipelineConfig`, parsing). `base` marks each field
science, execution or content: what the stage versions hash.
"""

from loralens.config.base import ConfigError, FieldKind, Section, Strict, content_field, execution_field
from loralens.config.heads import AttributeConfig, GoalConfig, SelectConfig, SteeringConfig
from loralens.config.inputs import DEFAULT_CORPUS, DEFAULT_MODEL, CacheConfig, CorpusConfig, ModelConfig
from loralens.config.intervene import HeadSetConfig, InterveneConfig
from loralens.config.lens import DecodeConfig, TrainConfig
from loralens.config.pipeline import PipelineConfig, RunConfig, load_config, parse_config
from loralens.defaults import default_home

__all__ = [
    "DEFAULT_CORPUS", "DEFAULT_MODEL", "AttributeConfig", "CacheConfig", "ConfigError", "CorpusConfig",
    "DecodeConfig", "FieldKind", "GoalConfig", "HeadSetConfig", "InterveneConfig", "ModelConfig", "PipelineConfig",
    "RunConfig", "Section", "SelectConfig", "SteeringConfig", "Strict", "TrainConfig", "content_field", "default_home",
    "execution_field", "load_config", "parse_config",
]
