"""The original tool's optimizer names: each one is difftune's own, the same optimizer under another
name, or refused at load time with the nearest optimizer difftune has.

The names are those SimpleTuner 4.10.1 documents for `--optimizer` and accepts in its optimizer
table (its `torch-*` names included), plus the names it has retired. Torch-free: the loader applies
this before validation.
"""

from __future__ import annotations

import typing
from typing import Any

from difftune.config.schema import TrainConfig

# The same optimizer (same update rule and defaults) under the original tool's other name.
SAME_OPTIMIZER = {
    "torch-adamw": "adamw",  # torch.optim.AdamW in both
}

_LOW_MEMORY = "adamw_bf16", "its optimizer state is bf16, the nearest to an 8-bit or 4-bit state"
_ADAM_FAMILY = "adamw", "another Adam variant; difftune has AdamW"
_SCHEDULE_FREE = "adamw", "schedule-free AdamW; use adamw with lr_scheduler constant_with_warmup"

# name -> (the nearest optimizer difftune has, why). A name that difftune's schema accepts is never
# refused, so adding an optimizer to the schema is enough to build it.
NEAREST = {
    "torch-adam": ("adamw", "AdamW with adam_weight_decay 0 is Adam"),
    "torch-sgd": ("adamw", "difftune has no SGD"),
    "torch-radam": _ADAM_FAMILY,
    "torch-nadam": _ADAM_FAMILY,
    "torch-rmsprop": ("adamw", "difftune has no RMSprop"),
    "torch-adagrad": ("adamw", "difftune has no Adagrad"),
    "torch-adadelta": ("adamw", "difftune has no Adadelta"),
    "torch-adafactor": ("adamw_bf16", "the lowest-memory Adam difftune has"),
    "torch-adamax": _ADAM_FAMILY,
    "torch-asgd": ("adamw", "difftune has no averaged SGD"),
    "torch-sparseadam": ("adamw", "difftune trains dense weights"),
    "ao-adamw8bit": _LOW_MEMORY,
    "ao-adamw4bit": _LOW_MEMORY,
    "ao-adamfp8": _LOW_MEMORY,
    "ao-adamwfp8": _LOW_MEMORY,
    "adamw_schedulefree": _SCHEDULE_FREE,
    "adamw_schedulefree+aggressive": _SCHEDULE_FREE,
    "adamw_schedulefree+no_kahan": _SCHEDULE_FREE,
    "optimi-stableadamw": ("optimi-adamw", "torch-optimi's AdamW, also with Kahan summation"),
    "optimi-radam": ("optimi-adamw", "torch-optimi's AdamW, also with Kahan summation"),
    "optimi-ranger": ("optimi-adamw", "torch-optimi's AdamW, also with Kahan summation"),
    "optimi-adan": ("optimi-adamw", "torch-optimi's AdamW, also with Kahan summation"),
    "optimi-adam": ("optimi-adamw", "with adam_weight_decay 0 it is Adam"),
    "optimi-sgd": ("optimi-adamw", "difftune has no SGD"),
    "soap": ("adamw", "difftune has no SOAP"),
    "muon": ("adamw", "difftune has no Muon"),
    "bnb-adagrad": ("adamw", "difftune has no Adagrad"),
    "bnb-adagrad8bit": ("adamw_bf16", "difftune has no Adagrad; the lowest-memory Adam it has"),
    "bnb-adam": ("adamw", "AdamW with adam_weight_decay 0 is Adam"),
    "bnb-adam8bit": _LOW_MEMORY,
    "bnb-adamw": ("adamw", "the same update in 32 bits; the original's default adam_epsilon there is 1e-6"),
    "bnb-adamw8bit": _LOW_MEMORY,
    "bnb-adamw-paged": ("adamw", "the same update without paging"),
    "bnb-adamw8bit-paged": _LOW_MEMORY,
    "bnb-lion": ("optimi-lion", "torch-optimi's Lion"),
    "bnb-lion8bit": ("optimi-lion", "torch-optimi's Lion"),
    "bnb-lion-paged": ("optimi-lion", "torch-optimi's Lion"),
    "bnb-lion8bit-paged": ("optimi-lion", "torch-optimi's Lion"),
    "bnb-ademamix": _ADAM_FAMILY,
    "bnb-ademamix8bit": _LOW_MEMORY,
    "bnb-ademamix-paged": _ADAM_FAMILY,
    "bnb-ademamix8bit-paged": _LOW_MEMORY,
    # retired by the original tool itself
    "adamw8bit": _LOW_MEMORY,
    "adafactor": ("adamw_bf16", "the lowest-memory Adam difftune has"),
    "dadaptation": ("prodigy", "Prodigy adapts the step size as D-Adaptation did"),
}


def ours() -> tuple[str, ...]:
    """The optimizer names difftune's schema accepts."""
    return typing.get_args(TrainConfig.model_fields["optimizer"].annotation)


def apply_original_name(values: dict[str, Any], origin: dict[str, str], problems: list[str]) -> None:
    """Replace an original-tool alias in values["optimizer"], or add a problem naming the nearest optimizer."""
    given = values.get("optimizer")
    if not isinstance(given, str):
        return
    name = given.strip().lower()
    if name in ours():
        values["optimizer"] = name
    elif name in SAME_OPTIMIZER:
        values["optimizer"] = SAME_OPTIMIZER[name]
    elif name in NEAREST:
        nearest, why = NEAREST[name]
        problems.append(
            f"{origin.get('optimizer', 'config')}: 'optimizer' is {given!r}, an optimizer of the original "
            f"tool that difftune does not have; the nearest it has is '{nearest}' ({why}). "
            f'Set "optimizer": "{nearest}"; difftune\'s optimizers are {", ".join(ours())}'
        )
        del values["optimizer"]
