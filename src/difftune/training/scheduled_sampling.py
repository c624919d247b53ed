"""Scheduled sampling (rollout): some samples' noisy inputs come from the model's own denoising steps.

With probability p (scheduled_sampling_probability, ramped up from 0 over
scheduled_sampling_ramp_steps) a sample starts `offset` timesteps noisier, offset uniform in
[1, scheduled_sampling_max_step_offset], at add_noise(x0, noise, t + offset), and the model, without
gradients, steps it back down to t one timestep at a time. The result replaces x_t; the target stays
the one of the clean latents at t, so the model learns to correct the drift of its own steps
(exposure bias).

Steps are first order: for diffusion objectives (integer timesteps, epsilon / v / sample) a DDIM step
with the scheduler's alphas_cumprod, for flow objectives (times in [0, 1]) an Euler step on the flow
time, one timestep being 1 / num_train_timesteps. Every process draws the choices of the whole global
batch and keeps its rows, and all processes make the same number of model calls (the longest rollout
in the global batch), as sharded (FSDP2) models need.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch

from difftune import events
from difftune.config.schema import TrainConfig
from difftune.families.base import Components, Family, Objective
from difftune.families.flow_matching import FlowMatchingObjective
from difftune.families.objectives import Diff2FlowObjective, EpsilonObjective, split_prediction

_warned_unipc = False


def rollout_probability(config: TrainConfig, step: int) -> float:
    """p at an optimizer step: scheduled_sampling_probability, ramped linearly from 0 when ramp steps are set."""
    p = config.scheduled_sampling_probability
    ramp = config.scheduled_sampling_ramp_steps
    return p * min(1.0, step / ramp) if ramp > 0 else p


def rollout_enabled(config: TrainConfig) -> bool:
    return config.scheduled_sampling_max_step_offset > 0 and config.scheduled_sampling_probability > 0


def draw_offsets(
    config: TrainConfig,
    step: int,
    batch_size: int,
    generator: torch.Generator,
    num_processes: int = 1,
    process_index: int = 0,
) -> tuple[torch.Tensor, int]:
    """Rollout lengths (B,) of this process's rows (0 = no rollout) and the longest of the global batch."""
    total = batch_size * num_processes
    chosen = torch.rand(total, generator=generator, device=generator.device) < rollout_probability(
        config, step
    )
    k = config.scheduled_sampling_max_step_offset
    offsets = torch.randint(1, k + 1, (total,), generator=generator, device=generator.device) * chosen
    mine = offsets[process_index * batch_size : (process_index + 1) * batch_size]
    return mine.cpu(), int(offsets.max())


def rollout_inputs(
    family: Family,
    components: Components,
    model: torch.nn.Module,
    objective: Objective,
    latents: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    batch: dict[str, Any],
    config: TrainConfig,
    step: int,
    generator: torch.Generator,
    num_processes: int = 1,
    process_index: int = 0,
) -> torch.Tensor:
    """The denoiser's noisy input (B, ...): objective.add_noise, with rolled-out rows where drawn.

    `timesteps` (B,) are in the objective's convention; `batch` is what family.model_forward takes.
    Without scheduled sampling configured this is objective.add_noise and draws nothing.
    """
    noisy = objective.add_noise(latents, noise, timesteps)
    if not rollout_enabled(config):
        return noisy
    _check_sampler(config)
    offsets, longest = draw_offsets(config, step, latents.shape[0], generator, num_processes, process_index)
    if longest == 0:
        return noisy
    stepper = _Stepper.for_objective(objective)
    start, remaining, size = stepper.start(timesteps, offsets.to(timesteps.device))
    x, current = objective.add_noise(latents, noise, start), start
    with torch.no_grad():
        for _ in range(longest):  # the same count on every process
            output = family.model_forward(components, model, x, current, batch)
            active = remaining > 0
            following = torch.where(active, current - size, current)
            stepped = stepper.step(output, x, current, following)
            x = torch.where(_rows(active, x), stepped.to(x.dtype), x)
            current, remaining = following, remaining - active.long()
    return torch.where(_rows(offsets.to(x.device) > 0, x), x, noisy).to(noisy.dtype)


def _rows(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return mask.to(like.device).reshape(-1, *([1] * (like.ndim - 1)))


def _check_sampler(config: TrainConfig) -> None:
    global _warned_unipc
    if config.scheduled_sampling_sampler == "unipc" and not _warned_unipc:
        _warned_unipc = True
        events.warn(
            "scheduled_sampling_sampler unipc: rollouts take first-order steps (DDIM for "
            "diffusion models, Euler for flow models); set it to euler to silence this"
        )


class _Stepper(ABC):
    """One first-order step of an objective's sampler; timesteps are per sample (B,)."""

    def __init__(self, objective: Objective):
        self.objective = objective

    @staticmethod
    def for_objective(objective: Objective) -> _Stepper:
        if isinstance(objective, EpsilonObjective):
            return _DDIMStepper(objective)
        if isinstance(objective, (FlowMatchingObjective, Diff2FlowObjective)):
            return _EulerStepper(objective)
        raise TypeError(
            f"scheduled sampling has no sampler for {type(objective).__name__}; "
            "set scheduled_sampling_max_step_offset to 0"
        )

    @abstractmethod
    def start(
        self, timesteps: torch.Tensor, offsets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(start timesteps, steps to take, step size), each (B,)."""

    @abstractmethod
    def step(
        self, output: torch.Tensor, x: torch.Tensor, current: torch.Tensor, following: torch.Tensor
    ) -> torch.Tensor:
        """x (B, ...) at `current` -> x at `following`, given the family's output for x (fp32)."""


class _DDIMStepper(_Stepper):
    """Integer timesteps, one per step: x_{t-1} = sqrt(a') x0_hat + sqrt(1 - a') eps_hat."""

    def start(self, timesteps, offsets):
        top = self.objective.num_train_timesteps - 1
        start = (timesteps.long() + offsets).clamp(max=top)
        return start, start - timesteps.long(), torch.ones_like(start)

    def step(self, output, x, current, following):
        objective = self.objective
        a = objective._alphas(current).to(x.device).reshape(-1, *([1] * (x.ndim - 1)))
        a_next = objective._alphas(following).to(x.device).reshape(-1, *([1] * (x.ndim - 1)))
        x0, noise = split_prediction(output, x, a.sqrt(), (1.0 - a).sqrt(), objective.prediction_type)
        return a_next.sqrt() * x0 + (1.0 - a_next).sqrt() * noise


class _EulerStepper(_Stepper):
    """Flow times: `offset` equal Euler steps from t + offset / num_train_timesteps down to t."""

    def start(self, timesteps, offsets):
        objective = self.objective
        top = getattr(objective, "t_max", 1.0)
        unit = 1.0 / getattr(objective, "num_train_timesteps", 1000)
        start = (timesteps + offsets.to(timesteps.dtype) * unit).clamp(max=top)
        start = torch.maximum(start, timesteps)
        size = torch.where(offsets > 0, (start - timesteps) / offsets.clamp(min=1), torch.zeros_like(start))
        return start, offsets.long(), size

    def step(self, output, x, current, following):
        velocity = (
            self.objective.velocity(output, x, current)
            if isinstance(self.objective, Diff2FlowObjective)
            else output.float()
        )
        dt = (following - current).to(x.device, torch.float32).reshape(-1, *([1] * (x.ndim - 1)))
        return x.float() + dt * velocity
