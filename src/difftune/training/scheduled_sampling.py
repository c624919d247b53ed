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


def rollout_enabled(config: TrainConfig) -> bool:
    return config.scheduled_sampling_max_step_offset > 0 and config.scheduled_sampling_probability > 0


class ScheduledSampler:
    """The rollouts of one run, built once; each step calls it with that step's tensors.

    `generator` is the run's noise generator (its state is saved with every checkpoint, so a resumed
    run draws the same rollouts); `num_processes` and `process_index` pick this process's rows of the
    global batch. The objective's sampler is checked here, before the first step.
    """

    def __init__(
        self,
        family: Family,
        components: Components,
        objective: Objective,
        config: TrainConfig,
        num_processes: int = 1,
        process_index: int = 0,
        generator: torch.Generator | None = None,
    ) -> None:
        self.family, self.components, self.objective = family, components, objective
        self.max_offset = config.scheduled_sampling_max_step_offset
        self.peak_probability = config.scheduled_sampling_probability
        self.ramp_steps = config.scheduled_sampling_ramp_steps
        self.num_processes, self.process_index = num_processes, process_index
        self.generator = generator if generator is not None else torch.Generator()
        self.stepper = _Stepper.for_objective(objective)
        _check_sampler(config)

    def probability(self, step: int) -> float:
        """p at an optimizer step: scheduled_sampling_probability, ramped linearly from 0 over the ramp steps."""
        p, ramp = self.peak_probability, self.ramp_steps
        return p * min(1.0, step / ramp) if ramp > 0 else p

    def draw_offsets(self, batch_size: int, step: int) -> tuple[torch.Tensor, int]:
        """Rollout lengths (B,) of this process's rows (0 = no rollout) and the longest of the global batch."""
        generator = self.generator
        total = batch_size * self.num_processes
        chosen = torch.rand(total, generator=generator, device=generator.device) < self.probability(step)
        offsets = (
            torch.randint(1, self.max_offset + 1, (total,), generator=generator, device=generator.device)
            * chosen
        )
        first = self.process_index * batch_size
        return offsets[first : first + batch_size].cpu(), int(offsets.max())

    def __call__(
        self,
        model: torch.nn.Module,
        latents: torch.Tensor,
        noise: torch.Tensor,
        timesteps: torch.Tensor,
        batch: dict[str, Any],
        step: int,
    ) -> torch.Tensor:
        """The denoiser's noisy input (B, ...): objective.add_noise, with rolled-out rows where drawn.

        `timesteps` (B,) are in the objective's convention; `batch` is what family.model_forward takes;
        `step` the optimizer step (for the ramp).
        """
        objective = self.objective
        noisy = objective.add_noise(latents, noise, timesteps)
        offsets, longest = self.draw_offsets(latents.shape[0], step)
        if longest == 0:
            return noisy
        start, remaining, size = self.stepper.start(timesteps, offsets.to(timesteps.device))
        x, current = objective.add_noise(latents, noise, start), start
        with torch.no_grad():
            for _ in range(longest):  # the same count on every process
                output = self.family.model_forward(self.components, model, x, current, batch)
                active = remaining > 0
                following = torch.where(active, current - size, current)
                stepped = self.stepper.step(output, x, current, following)
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
        top, unit = objective.t_max, 1.0 / objective.num_train_timesteps
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
