"""Model families: `registry` says what each one is, its module says how it works."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from difftune.families import registry

if TYPE_CHECKING:
    from difftune.config.schema import TrainConfig
    from difftune.families.base import Emit, Family


def family_class(name: str) -> type[Family]:
    """The Family class of a registered family (any accepted spelling of its name)."""
    module_name, class_name = registry.spec(name).module.split(":")
    return getattr(importlib.import_module(module_name), class_name)


def get_family(config: TrainConfig, emit: Emit | None = None) -> Family:
    """Instantiate the family a config names; its warnings go to `emit` (the run's event bus)."""
    return family_class(config.model_family)(config, emit)
