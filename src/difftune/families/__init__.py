"""Registry of model families: model_family (+ model_flavour) -> Family class and Hub id."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from difftune.config.schema import TrainConfig
    from difftune.families.base import Family

# model_family -> "module:Class"; imported on use so that the CLI starts fast.
REGISTRY: dict[str, str] = {
    "sdxl": "difftune.families.sdxl:SDXLFamily",
    "kandinsky5-image": "difftune.families.kandinsky5_image:Kandinsky5ImageFamily",
    "kandinsky5-video": "difftune.families.kandinsky5_video:Kandinsky5VideoFamily",
}


def canonical_family_name(name: str) -> str:
    """`kandinsky5_image` and `Kandinsky5-Image` both name `kandinsky5-image`."""
    return name.strip().lower().replace("_", "-")


def family_class(name: str) -> type[Family]:
    """The Family class registered under `name` (any accepted spelling)."""
    target = REGISTRY[canonical_family_name(name)]
    module_name, class_name = target.split(":")
    return getattr(importlib.import_module(module_name), class_name)


def get_family(config: TrainConfig) -> Family:
    """Instantiate the family a config names."""
    return family_class(config.model_family)(config)
