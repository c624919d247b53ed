"""Rectified-flow objective: x_t = (1 - sigma) x0 + sigma noise, the denoiser predicts noise - x0.

Timesteps at this boundary are sigmas in [0, 1] (B,); a family whose denoiser wants another scale
(Kandinsky 5's pipelines pass sigma * 1000) converts in its `model_forward`.
"""

from __future__ import annotations

import math

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
    """Flow matching with logit-normal (default), uniform or Beta sigmas and a shift.

    `sigmoid_scale` multiplies the normal draw before the sigmoid (wider -> more mass near 0 and 1).
    `beta` = (alpha, beta) draws sigmas from Beta(alpha, beta) instead. With `auto_shift` the shift
    depends on each batch's latent size as in the SD3 paper (section 5.3.2) and the Flux pipeline:
    mu rises linearly from 0.5 at 256 tokens to 1.15 at 4096 tokens (2x2 patches, times the latent
    frames of a video), shift = exp(mu). With `snr_gamma` the velocity loss is weighted so that the
    x0 error is weighted by min(SNR, gamma) (Hang et al. 2023): sigma^2 * min(SNR, gamma), SNR =
    ((1 - sigma) / sigma)^2; `soft_min_snr` uses the soft minimum SNR * gamma / (SNR + gamma).
    `num_train_timesteps` is the scheduler's count of steps over [0, 1] (the pipelines' sigma -> timestep
    scale): one step is 1 / num_train_timesteps in sigma, as scheduled sampling's rollouts step.
    """

    t_max = 1.0  # the noisiest sigma: pure noise

    def __init__(
        self,
        shift: float = 1.0,
        uniform: bool = False,
        sigmoid_scale: float = 1.0,
        beta: tuple[float, float] | None = None,
        auto_shift: bool = False,
        snr_gamma: float | None = None,
        soft_min_snr: bool = False,
        num_train_timesteps: int = 1000,
    ):
        if shift <= 0:
            raise ValueError(f"flow_schedule_shift must be > 0, got {shift}")
        self.shift = float(shift)
        self.uniform = bool(uniform)
        self.sigmoid_scale = float(sigmoid_scale)
        self.beta = beta
        self.auto_shift = bool(auto_shift)
        self.snr_gamma = snr_gamma
        self.soft_min_snr = bool(soft_min_snr)
        self.num_train_timesteps = int(num_train_timesteps)

    @classmethod
    def from_config(cls, config, num_train_timesteps: int = 1000) -> FlowMatchingObjective:
        """The objective a TrainConfig describes (flow_* keys, snr_gamma, use_soft_min_snr), on a scheduler
        of `num_train_timesteps` steps."""
        beta = None
        if config.flow_use_beta_schedule:
            beta = (config.flow_beta_schedule_alpha, config.flow_beta_schedule_beta)
        return cls(
            shift=config.flow_schedule_shift,
            uniform=config.flow_use_uniform_schedule,
            sigmoid_scale=config.flow_sigmoid_scale,
            beta=beta,
            auto_shift=config.flow_schedule_auto_shift,
            snr_gamma=config.snr_gamma,
            soft_min_snr=config.use_soft_min_snr,
            num_train_timesteps=num_train_timesteps,
        )

    def sample_timesteps(self, batch_size: int, generator: torch.Generator, device) -> torch.Tensor:
        """Sigmas (B,) in [0, 1], float32, drawn only from `generator` (on its device), then moved to `device`."""
        return shift_sigmas(self._draw(batch_size, generator), self.shift).to(device)

    def sample_timesteps_for(
        self, latent_shape: tuple[int, ...], batch_size: int, generator: torch.Generator, device
    ) -> torch.Tensor:
        """As sample_timesteps, with the resolution-dependent shift when auto_shift is on."""
        shift = resolution_shift(latent_shape) if self.auto_shift else self.shift
        return shift_sigmas(self._draw(batch_size, generator), shift).to(device)

    def _draw(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        gen_device = generator.device
        if self.beta is not None:
            # torch's Beta sampler takes no generator: seed a forked global RNG from ours
            seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=gen_device))
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                return torch.distributions.Beta(*map(float, self.beta)).sample((batch_size,)).to(gen_device)
        if self.uniform:
            return torch.rand(batch_size, generator=generator, device=gen_device)
        normal = torch.randn(batch_size, generator=generator, device=gen_device)
        return torch.sigmoid(normal * self.sigmoid_scale)

    def loss_weights(self, timesteps: torch.Tensor) -> torch.Tensor | None:
        """sigma^2 * min(SNR, gamma) (soft minimum with soft_min_snr) per sample (B,), or None."""
        if self.snr_gamma is None:
            return None
        sigma = timesteps.float().clamp(1e-6, 1.0)
        snr = self.snr(timesteps)
        return sigma**2 * snr_minimum(snr, self.snr_gamma, self.soft_min_snr)

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """(1 - sigma) x0 + sigma noise, for latents of any rank (B, ...)."""
        sigma = _per_sample(timesteps, latents)
        return (1.0 - sigma) * latents + sigma * noise

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The velocity d x_t / d sigma = noise - x0."""
        return noise - latents


def snr_minimum(snr: torch.Tensor, gamma: float, soft: bool) -> torch.Tensor:
    """min(SNR, gamma), or its soft form SNR * gamma / (SNR + gamma)."""
    return snr * gamma / (snr + gamma) if soft else snr.clamp(max=gamma)


def resolution_shift(latent_shape: tuple[int, ...], patch: int = 2) -> float:
    """exp(mu), mu linear in the token count: 0.5 at 256 tokens, 1.15 at 4096 (the Flux pipeline's line).

    latent_shape is (B, C, H, W) or (B, C, F, H, W); tokens = F * (H // patch) * (W // patch).
    """
    frames = latent_shape[2] if len(latent_shape) == 5 else 1
    tokens = frames * (latent_shape[-2] // patch) * (latent_shape[-1] // patch)
    slope = (1.15 - 0.5) / (4096 - 256)
    return math.exp(0.5 + slope * (tokens - 256))
