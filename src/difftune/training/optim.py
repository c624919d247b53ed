"""Optimizers and learning-rate schedules named by config.json."""

from __future__ import annotations

import ast
from collections.abc import Iterable
from typing import Any

import torch

from difftune.config.schema import TrainConfig


def parse_optimizer_config(text: str | None) -> dict[str, Any]:
    """'weight_decay=0.1,betas=(0.9,0.99)' -> {'weight_decay': 0.1, 'betas': (0.9, 0.99)}."""
    if not text:
        return {}
    options: dict[str, Any] = {}
    depth, current, parts = 0, "", []
    for char in text:
        if char in "([":
            depth += 1
        elif char in ")]":
            depth -= 1
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    for part in filter(None, (p.strip() for p in parts)):
        if "=" not in part:
            raise ValueError(f"optimizer_config: '{part}' is not key=value")
        key, value = (s.strip() for s in part.split("=", 1))
        try:
            options[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            options[key] = value
    return options


def build_optimizer(params: Iterable[torch.nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer config.optimizer names; the torch-optimi ones use Kahan summation on bf16 weights."""
    params = [p for p in params if p.requires_grad]
    extra = parse_optimizer_config(config.optimizer_config)
    betas = (config.adam_beta1, config.adam_beta2)
    lr = config.learning_rate
    name = config.optimizer
    if name == "adamw":
        options = dict(lr=lr, betas=betas, eps=config.adam_epsilon, weight_decay=config.adam_weight_decay)
        if torch.cuda.is_available():
            options["fused"] = True
        return torch.optim.AdamW(params, **{**options, **extra})
    if name in ("adamw_bf16", "optimi-adamw"):
        import optimi

        options = dict(lr=lr, betas=betas, eps=config.adam_epsilon, weight_decay=config.adam_weight_decay)
        return optimi.AdamW(params, **{**options, **extra})
    if name == "optimi-lion":
        import optimi

        options = dict(lr=lr, betas=betas, weight_decay=config.adam_weight_decay)
        return optimi.Lion(params, **{**options, **extra})
    if name == "prodigy":
        from prodigyopt import Prodigy

        options = dict(
            lr=lr,
            betas=betas,
            weight_decay=config.adam_weight_decay,
            safeguard_warmup=True,
            use_bias_correction=True,
        )
        return Prodigy(params, **{**options, **extra})
    raise ValueError(
        f"optimizer '{name}' is not one of adamw_bf16, adamw, optimi-adamw, optimi-lion, prodigy"
    )


def build_lr_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int):
    """diffusers' schedules: constant, constant_with_warmup, linear, cosine, cosine_with_restarts, polynomial.

    Counted in optimizer steps (`lr_warmup_steps`, `total_steps`) whatever the number of processes: the
    schedule is not handed to accelerate, whose wrapper would step it once per process per optimizer step;
    the recipe steps it with `step_lr_schedule`.
    """
    from diffusers.optimization import get_scheduler

    name = config.lr_scheduler
    if name == "constant" and config.lr_warmup_steps:
        name = "constant_with_warmup"
    kwargs: dict[str, Any] = {}
    if name == "cosine_with_restarts":
        kwargs["num_cycles"] = int(config.lr_num_cycles)
    elif name == "polynomial":
        kwargs["power"] = config.lr_power
    return get_scheduler(
        name, optimizer, num_warmup_steps=config.lr_warmup_steps, num_training_steps=total_steps, **kwargs
    )


def step_lr_schedule(lr_scheduler, optimizer, sync_gradients: bool) -> None:
    """Advance the schedule by one after an optimizer step that happened: not between accumulated
    micro-batches, and not when the fp16 grad scaler skipped the step (`optimizer` is accelerate's)."""
    if sync_gradients and not optimizer.step_was_skipped:
        lr_scheduler.step()
