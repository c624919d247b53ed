"""Rectified-flow objective: x_t = (1 - sigma) x0 + sigma noise, the denoiser predicts noise - x0.

Timesteps at this boundary are sigmas in [0, 1] (B,); a family whose denoiser wants another scale
(Kandinsky 5's pipelines pass sigma * 1000) converts in its `model_forward`.
"""

from __future__ import annotations

import torch

from difftune.families.base import Objective


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """Time shift of flow models: s * sigma / (1 + (s - 1) * sigma); s > 1 moves weight to noisier steps."""
    if shift == 1.0:
        return sigmas
    return shift * sigmas / (1.0 + (shift - 1.0) * sigmas)


def _per_sample(timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) with the rank of `like`, in its dtype."""
    return timesteps.to(device=like.device, dtype=like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


class FlowMatchingObjective(Objective):
    """Flow matching with logit-normal (default) or uniform sigmas and an optional shift.

    `sigmoid_scale` multiplies the normal draw before the sigmoid (wider -> more mass near 0 and 1).
    """

    def __init__(self, shift: float = 1.0, uniform: bool = False, sigmoid_scale: float = 1.0):
        if shift <= 0:
            raise ValueError(f"flow_schedule_shift must be > 0, got {shift}")
        self.shift = float(shift)
        self.uniform = bool(uniform)
        self.sigmoid_scale = float(sigmoid_scale)

    def sample_timesteps(self, batch_size: int, generator: torch.Generator, device) -> torch.Tensor:
        """Sigmas (B,) in [0, 1], float32, drawn only from `generator` (on its device), then moved to `device`."""
        gen_device = generator.device
        if self.uniform:
            sigmas = torch.rand(batch_size, generator=generator, device=gen_device)
        else:
            normal = torch.randn(batch_size, generator=generator, device=gen_device)
            sigmas = torch.sigmoid(normal * self.sigmoid_scale)
        return shift_sigmas(sigmas, self.shift).to(device)

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """(1 - sigma) x0 + sigma noise, for latents of any rank (B, ...)."""
        sigma = _per_sample(timesteps, latents)
        return (1.0 - sigma) * latents + sigma * noise

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The velocity d x_t / d sigma = noise - x0."""
        return noise - latents
