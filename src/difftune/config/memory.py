"""Memory settings that only work together in one form, decided when the config is loaded.

optimum-quanto keeps its weights in tensor subclasses that diffusers' group-offload hooks cannot move
between devices, while torchao's tensors are moved by those hooks. The quickstarts' lowest-VRAM recipe
(`int8-quanto` with `enable_group_offload`) therefore trains with torchao's weight-only quantisation of
the same width, and says so; widths torchao has no weight-only form of on every device are refused.
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from difftune.config.schema import TrainConfig

# quanto precision -> the torchao precision used under group offload (None: no equivalent)
QUANTO_UNDER_GROUP_OFFLOAD = {
    "int8-quanto": "int8-torchao",
    "fp8-quanto": "fp8-torchao",
    "fp8uz-quanto": "fp8-torchao",
    "int4-quanto": None,
    "int2-quanto": None,
}


def resolve_memory_settings(
    train: TrainConfig, origin: dict[str, str], warnings: list[str], problems: list[str]
) -> TrainConfig:
    """`train` with the quantisation backend group offload can move; warnings and problems appended."""
    precision = train.base_model_precision
    if not train.enable_group_offload or precision not in QUANTO_UNDER_GROUP_OFFLOAD:
        return train
    where = origin.get("base_model_precision", "config")
    replacement = QUANTO_UNDER_GROUP_OFFLOAD[precision]
    if replacement is None:
        problems.append(
            f"{where}: 'base_model_precision' is '{precision}' and 'enable_group_offload' is true, but "
            "group offload cannot move optimum-quanto weights and torchao has no weight-only form of "
            "that width; use 'int8-quanto' (trained as int8-torchao under group offload) or set "
            "'enable_group_offload' to false"
        )
        return train
    if importlib.util.find_spec("torchao") is None:
        problems.append(
            f"{where}: 'base_model_precision' '{precision}' with 'enable_group_offload' trains with "
            f"torchao's {replacement} (group offload cannot move optimum-quanto weights), and torchao is "
            "not installed; run: pip install torchao (or pip install 'difftune[quant]')"
        )
        return train
    warnings.append(
        f"{where}: 'base_model_precision' '{precision}' with 'enable_group_offload': group offload cannot "
        f"move optimum-quanto weights, so the base model is quantised with torchao's {replacement} "
        "instead (the same weight width; the saved adapter does not depend on it)"
    )
    return train.model_copy(update={"base_model_precision": replacement})
