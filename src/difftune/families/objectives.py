"""Training objectives: DDPM-style epsilon / v prediction (SDXL) and flow matching (Kandinsky 5).

All randomness comes from the torch.Generator the trainer passes, so a run repeats exactly.
"""

from __future__ import annotations

import torch

from difftune.families import flow_matching
from difftune.families.base import Objective

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1) with the rank of `like`, on its device, in fp32."""
    return values.to(device=like.device, dtype=torch.float32).reshape(-1, *([1] * (like.ndim - 1)))


class EpsilonObjective(Objective):
    """Discrete-time diffusion: x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise, a_t = alphas_cumprod[t].

    Timesteps are integers in [0, num_train_timesteps). The target is the noise (epsilon), the
    velocity sqrt(a_t) noise - sqrt(1 - a_t) x0 (v_prediction) or x0 (sample). With `snr_gamma`,
    losses are weighted as in "Efficient Diffusion Training via Min-SNR Weighting Strategy"
    (Hang et al. 2023): min(SNR, gamma) / SNR for epsilon, min(SNR, gamma) / (SNR + 1) for v.
    """

    def __init__(self, noise_scheduler, snr_gamma: float | None = None, prediction_type: str | None = None):
        config = noise_scheduler.config
        self.prediction_type = prediction_type or getattr(config, "prediction_type", None) or "epsilon"
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"prediction_type '{self.prediction_type}' does not fit a diffusion (DDPM-style) model; "
                f"use one of {', '.join(PREDICTION_TYPES)}"
            )
        if snr_gamma is not None and snr_gamma <= 0:
            raise ValueError(f"snr_gamma must be > 0 (5.0 is the paper's value), got {snr_gamma}")
        self.snr_gamma = snr_gamma
        self.num_train_timesteps = int(config.num_train_timesteps)
        self.alphas_cumprod = noise_scheduler.alphas_cumprod.detach().to(torch.float32).cpu()

    def _alphas(self, timesteps: torch.Tensor) -> torch.Tensor:
        return self.alphas_cumprod[timesteps.detach().long().cpu()]

    def sample_timesteps(self, batch_size: int, generator: torch.Generator, device) -> torch.Tensor:
        """Uniform integer timesteps (B,), int64, in [0, num_train_timesteps)."""
        timesteps = torch.randint(
            0, self.num_train_timesteps, (batch_size,), generator=generator, device=generator.device
        )
        return timesteps.to(device)

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """sqrt(a_t) x0 + sqrt(1 - a_t) noise, computed in fp32 and returned in the latents' dtype."""
        alphas = _per_sample(self._alphas(timesteps), latents)
        noisy = alphas.sqrt() * latents.float() + (1.0 - alphas).sqrt() * noise.float()
        return noisy.to(latents.dtype)

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """noise (epsilon), sqrt(a_t) noise - sqrt(1 - a_t) x0 (v_prediction) or x0 (sample)."""
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "sample":
            return latents
        alphas = _per_sample(self._alphas(timesteps), latents)
        velocity = alphas.sqrt() * noise.float() - (1.0 - alphas).sqrt() * latents.float()
        return velocity.to(latents.dtype)

    def snr(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio a_t / (1 - a_t) per sample (B,), fp32, on the timesteps' device."""
        alphas = self._alphas(timesteps)
        return (alphas / (1.0 - alphas)).to(timesteps.device)

    def loss_weights(self, timesteps: torch.Tensor) -> torch.Tensor | None:
        """Min-SNR weights (B,), or None without snr_gamma."""
        if self.snr_gamma is None:
            return None
        snr = self.snr(timesteps)
        clipped = snr.clamp(max=self.snr_gamma)
        if self.prediction_type == "epsilon":
            return clipped / snr
        if self.prediction_type == "v_prediction":
            return clipped / (snr + 1.0)
        return clipped


class FlowMatchingObjective(flow_matching.FlowMatchingObjective):
    """Rectified flow (x_t = (1 - sigma) x0 + sigma noise, target noise - x0); timesteps are sigmas.

    Sigmas are logit-normal (sigmoid(N(0, 1) * sigmoid_scale)) or uniform, then shifted with
    s * sigma / (1 + (s - 1) * sigma). `timestep_for_model` gives what the denoiser is called with:
    the Kandinsky 5 pipelines pass their FlowMatchEulerDiscreteScheduler timesteps, sigma * 1000.
    """

    def __init__(
        self,
        shift: float = 1.0,
        uniform: bool = False,
        sigmoid_scale: float = 1.0,
        num_train_timesteps: int = 1000,
    ):
        super().__init__(shift=shift, uniform=uniform, sigmoid_scale=sigmoid_scale)
        self.num_train_timesteps = int(num_train_timesteps)

    def timestep_for_model(self, sigmas: torch.Tensor) -> torch.Tensor:
        """Sigmas (B,) in [0, 1] -> the denoiser's timestep input (B,), sigma * num_train_timesteps."""
        return sigmas * self.num_train_timesteps


shift_sigmas = flow_matching.shift_sigmas
