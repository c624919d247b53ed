"""Typed settings of a run: config.json (or .toml) and multidatabackend.json, loaded and checked."""

from __future__ import annotations


class ConfigError(ValueError):
    """A setting cannot be used; the message names the file, the key, the value and the fix."""


# Imported after ConfigError: the loader and the key tables raise it.
from difftune.config.keys import flavour_hub_id  # noqa: E402
from difftune.config.load import LoadedConfig, load_config, parse_cli_overrides, write_resolved  # noqa: E402
from difftune.config.schema import DatasetConfig, TrainConfig, VideoConfig  # noqa: E402

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
