"""Optimizers and learning-rate schedules named by config.json."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from contextlib import contextmanager
from typing import Any

import torch

from difftune.config.schema import TrainConfig, parse_optimizer_config
from difftune.errors import ConfigError


def scaled_learning_rate(config: TrainConfig, num_processes: int = 1) -> float:
    """learning_rate, times batch x accumulation x processes with lr_scale (its square root with lr_scale_sqrt)."""
    if not config.lr_scale:
        return config.learning_rate
    factor = config.train_batch_size * config.gradient_accumulation_steps * num_processes
    return config.learning_rate * (math.sqrt(factor) if config.lr_scale_sqrt else factor)


def build_optimizer(
    params: Iterable[torch.nn.Parameter], config: TrainConfig, num_processes: int = 1
) -> torch.optim.Optimizer:
    """The optimizer config.optimizer names; the torch-optimi ones use Kahan summation on bf16 weights.

    Betas are optimizer_beta1/2 where set, else adam_beta1/2; optimizer_config (key=value,...) wins
    over both. The learning rate is scaled_learning_rate.
    """
    params = [p for p in params if p.requires_grad]
    extra = parse_optimizer_config(config.optimizer_config)
    betas = config.optimizer_betas
    lr = scaled_learning_rate(config, num_processes)
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
    if name == "adamw_schedulefree":
        import schedulefree

        options = dict(
            lr=lr,
            betas=betas,
            eps=config.adam_epsilon,
            weight_decay=config.adam_weight_decay,
            warmup_steps=config.lr_warmup_steps,  # the optimizer warms up; the schedule stays constant
        )
        return schedulefree.AdamWScheduleFree(params, **{**options, **extra})
    if name == "ao-adamw8bit":
        from torchao.optim import AdamW8bit

        # torch.compile notes once that torchao's 8-bit state tensors have no stable hash, so its compiled
        # step is not cached across processes: torchao's to change, nothing a run can act on
        warnings.filterwarnings(
            "ignore", message="OptimState8bit does not implement _stable_hash_for_caching"
        )
        options = dict(lr=lr, betas=betas, eps=config.adam_epsilon, weight_decay=config.adam_weight_decay)
        return AdamW8bit(params, **{**options, **extra})
    if name in BITSANDBYTES:
        return _bitsandbytes(name, params, lr, betas, config, extra)
    if name == "prodigy":
        from prodigyopt import Prodigy

        options = dict(
            lr=lr,
            betas=betas,
            weight_decay=config.adam_weight_decay,
            safeguard_warmup=True,
            use_bias_correction=True,
        )
        optimizer = Prodigy(params, **{**options, **extra})
        if config.prodigy_steps:
            optimizer.register_step_post_hook(_freeze_prodigy_after(config.prodigy_steps))
        return optimizer
    raise ValueError(f"optimizer '{name}' is not one difftune builds")


BITSANDBYTES = {"bnb-adamw8bit": "AdamW8bit", "bnb-adam8bit": "Adam8bit", "bnb-lion8bit": "Lion8bit"}


def _bitsandbytes(name: str, params, lr: float, betas, config: TrainConfig, extra: dict[str, Any]):
    """bitsandbytes' 8-bit optimizers, which run on NVIDIA GPUs (CUDA) only."""
    if not torch.cuda.is_available():
        raise ConfigError(
            f"optimizer '{name}' is one of bitsandbytes' 8-bit optimizers, which run on NVIDIA GPUs (CUDA) "
            "only, and this machine has none; use ao-adamw8bit (torchao's 8-bit AdamW, which runs on the "
            "CPU too) or adamw_bf16"
        )
    import bitsandbytes

    options: dict[str, Any] = dict(lr=lr, betas=betas, weight_decay=config.adam_weight_decay)
    if name != "bnb-lion8bit":
        options["eps"] = config.adam_epsilon
    return getattr(bitsandbytes.optim, BITSANDBYTES[name])(params, **{**options, **extra})


def is_schedule_free(config: TrainConfig) -> bool:
    """Whether the optimizer keeps averaged weights apart from the ones it trains (schedule-free AdamW)."""
    return config.optimizer == "adamw_schedulefree"


def use_training_weights(optimizer, config: TrainConfig) -> None:
    """Put a schedule-free optimizer's training weights in the model (before the first step)."""
    if is_schedule_free(config):
        optimizer.train()


def use_averaged_weights(optimizer, config: TrainConfig) -> None:
    """Put a schedule-free optimizer's averaged weights in the model: what it is evaluated and saved with."""
    if is_schedule_free(config):
        optimizer.eval()


@contextmanager
def averaged_weights(optimizer, config: TrainConfig):
    """Inside, a schedule-free optimizer's averaged weights are in the model; after, the training ones."""
    use_averaged_weights(optimizer, config)
    try:
        yield
    finally:
        use_training_weights(optimizer, config)


def _freeze_prodigy_after(steps: int):
    """A step hook: from step `steps` on, Prodigy's step size d keeps the value it had then.

    Prodigy counts its steps in each group's "k"; the frozen d is stored in the group
    ("prodigy_frozen_d"), so it is saved with the optimizer state and survives a resume.
    """

    def hook(optimizer, _args, _kwargs) -> None:
        for group in optimizer.param_groups:
            if group["k"] >= steps:
                group["d"] = group.setdefault("prodigy_frozen_d", group["d"])

    return hook


def clip_gradients(accelerator, optimizer: torch.optim.Optimizer, config: TrainConfig) -> None:
    """Clip the gradients of every parameter the optimizer trains (the adapter or denoiser and any
    feature's own weights, such as CREPA's projector) to max_grad_norm: each element (grad_clip_method
    value) or their joint norm (norm)."""
    if config.max_grad_norm <= 0:
        return
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    if config.grad_clip_method == "norm":
        accelerator.clip_grad_norm_(parameters, config.max_grad_norm)
    else:
        accelerator.clip_grad_value_(parameters, config.max_grad_norm)


def build_lr_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int):
    """diffusers' schedules: constant, constant_with_warmup, linear, cosine, cosine_with_restarts, polynomial.

    Counted in optimizer steps (`lr_warmup_steps`, `total_steps`) whatever the number of processes: the
    schedule is not handed to accelerate, whose wrapper would step it once per process per optimizer step;
    the recipe steps it with `step_lr_schedule`.
    """
    from diffusers.optimization import get_scheduler

    name = config.lr_scheduler
    if is_schedule_free(config):  # it has no schedule: warm-up happens inside the optimizer
        return get_scheduler("constant", optimizer)
    if name == "constant" and config.lr_warmup_steps:
        name = "constant_with_warmup"
    kwargs: dict[str, Any] = {}
    if name == "cosine_with_restarts":
        kwargs["num_cycles"] = int(config.lr_num_cycles)
    elif name == "polynomial":
        from diffusers.optimization import get_polynomial_decay_schedule_with_warmup

        return get_polynomial_decay_schedule_with_warmup(
            optimizer,
            num_warmup_steps=config.lr_warmup_steps,
            num_training_steps=total_steps,
            lr_end=config.lr_end if config.lr_end is not None else 1e-7,  # 1e-7: diffusers' default
            power=config.lr_power,
        )
    return get_scheduler(
        name, optimizer, num_warmup_steps=config.lr_warmup_steps, num_training_steps=total_steps, **kwargs
    )


def step_lr_schedule(lr_scheduler, optimizer, sync_gradients: bool) -> None:
    """Advance the schedule by one after an optimizer step that happened: not between accumulated
    micro-batches, and not when the fp16 grad scaler skipped the step (`optimizer` is accelerate's)."""
    if sync_gradients and not optimizer.step_was_skipped:
        lr_scheduler.step()
