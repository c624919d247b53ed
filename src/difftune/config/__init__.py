"""Typed settings of a run: config.json (or .toml) and multidatabackend.json, loaded and checked."""

from __future__ import annotations

from difftune.config.load import LoadedConfig, load_config, parse_cli_overrides, write_resolved
from difftune.config.schema import DatasetConfig, TrainConfig, VideoConfig
from difftune.errors import ConfigError
from difftune.families.registry import flavour_hub_id

__all__ = [
    "ConfigError",
    "DatasetConfig",
    "LoadedConfig",
    "TrainConfig",
    "VideoConfig",
    "flavour_hub_id",
    "load_config",
    "parse_cli_overrides",
    "write_resolved",
]
