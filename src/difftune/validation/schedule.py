"""Validation during a run: when it is due, with which weights, and what the features do with the images.

Every validation_steps (with a schedule-free optimizer's averaged weights in the model) and once at the
end with the weights the run was saved with; each pass ema_validation asks for (the trained weights,
the EMA average); then the features see the images (CLIP score, eval loss).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from difftune.events import EventBus
from difftune.training.features import TrainingFeatures
from difftune.training.optim import averaged_weights


def adapter_strength(model, config):
    """validation_lycoris_strength for a LyCORIS run (a no-op otherwise)."""
    if config.model_type != "lycoris":
        return contextlib.nullcontext()
    from difftune.training.lycoris import lycoris_strength

    return lycoris_strength(model, config.validation_lycoris_strength)


@dataclass
class Validation:
    """What validation needs, gathered once in set-up. `runs_here` is False on the processes that sit
    validation out; `write` False on the other processes of a sharded denoiser, which only join the
    forward passes."""

    family: Any
    components: Any
    model: torch.nn.Module
    config: Any
    bus: EventBus
    conditioning_image: Any
    features: TrainingFeatures
    optimizer: Any
    prompts: list[tuple[str, str]]
    runs_here: bool
    write: bool


def maybe_validate(validation: Validation, step: int, final: bool = False) -> list[Path]:
    """Validation images when due: every validation_steps (with a schedule-free optimizer's averaged
    weights in the model), or once at the end (`final`), with the weights the run was saved
    with. Then the features see the images (CLIP score, eval loss). Returns the files written."""
    config = validation.config
    if not validation.prompts or config.validation_disable or not validation.runs_here:
        return []
    if final:
        weights = contextlib.nullcontext()
    elif config.validation_steps and step % config.validation_steps == 0:
        weights = averaged_weights(validation.optimizer, config)
    else:
        return []
    with weights:
        paths = _validation_images(validation, step)
    validation.features.after_validation(
        validation.model, paths, validation.prompts, step, validation.bus.emit
    )
    return paths


def _validation_images(validation: Validation, step: int) -> list[Path]:
    """Validation images of every pass ema_validation asks for (the trained weights, the EMA average)."""
    from difftune.validation.generate import run_validation

    v = validation
    paths: list[Path] = []
    for suffix, weights in v.features.validation_weights(v.model):
        with weights, adapter_strength(v.model, v.config):
            paths += run_validation(
                v.family,
                v.components,
                v.model,
                v.config,
                step,
                Path(v.config.output_dir),
                v.bus.emit,
                v.conditioning_image,
                suffix=suffix,
                write=v.write,
            )
    return paths
