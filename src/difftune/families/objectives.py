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

    def __init__(
        self,
        noise_scheduler,
        snr_gamma: float | None = None,
        prediction_type: str | None = None,
        soft_min_snr: bool = False,
    ):
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
        self.soft_min_snr = bool(soft_min_snr)
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

    def noise_fraction(self, timesteps: torch.Tensor) -> torch.Tensor:
        """t / num_train_timesteps (B,), fp32: 0 is clean, 1 pure noise."""
        return timesteps.float() / self.num_train_timesteps

    def snr(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio a_t / (1 - a_t) per sample (B,), fp32, on the timesteps' device."""
        alphas = self._alphas(timesteps)
        return (alphas / (1.0 - alphas)).to(timesteps.device)

    def loss_weights(self, timesteps: torch.Tensor) -> torch.Tensor | None:
        """Min-SNR weights (B,) (soft minimum with soft_min_snr), or None without snr_gamma."""
        if self.snr_gamma is None:
            return None
        snr = self.snr(timesteps)
        clipped = flow_matching.snr_minimum(snr, self.snr_gamma, self.soft_min_snr)
        if self.prediction_type == "epsilon":
            return clipped / snr
        if self.prediction_type == "v_prediction":
            return clipped / (snr + 1.0)
        return clipped


class Diff2FlowObjective(Objective):
    """Flow matching on a diffusion (DDPM-style) model, after "Diff2Flow: Training Flow Matching Models
    via Diffusion Model Alignment" (Schusterbauer et al. 2025).

    Timesteps at the Family boundary are flow times t in [0, 1] (B,), float32, and the noisy latents
    are the flow interpolant x_t = (1 - t) x0 + t noise. The diffusion state a x0 + s noise
    (a = sqrt(alphas_cumprod), a^2 + s^2 = 1) lies on the same line when s / a = t / (1 - t), so
    x_diff = x_t / sqrt((1 - t)^2 + t^2), and the model is called at the diffusion timestep of that
    signal-to-noise ratio, interpolated in log-SNR between the scheduler's integer timesteps
    (fractional; the UNet's sinusoidal time embedding takes it). Its epsilon / v / sample prediction
    is converted to the velocity noise - x0. With `velocity_loss` (diff2flow_loss) that velocity is
    regressed to noise - x0; without it the native target at the mapped timestep is.
    Flow times are drawn uniformly over the range the diffusion schedule covers.
    """

    def __init__(self, noise_scheduler, prediction_type: str | None = None, velocity_loss: bool = True):
        config = noise_scheduler.config
        self.prediction_type = prediction_type or getattr(config, "prediction_type", None) or "epsilon"
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"diff2flow_enabled: prediction_type '{self.prediction_type}' does not fit a diffusion "
                f"model; use one of {', '.join(PREDICTION_TYPES)}"
            )
        self.velocity_loss = bool(velocity_loss)
        self.num_train_timesteps = int(config.num_train_timesteps)
        alphas = noise_scheduler.alphas_cumprod.detach().to(torch.float64).cpu()
        self._alphas_cumprod = alphas
        self._log_snr_ascending = -torch.log(alphas / (1.0 - alphas))  # -log SNR rises with the timestep
        self.t_min, self.t_max = (float(self.flow_time(torch.tensor(k))) for k in (0, len(alphas) - 1))

    # -- the mapping ---------------------------------------------------------------------------
    def flow_time(self, diffusion_timesteps: torch.Tensor) -> torch.Tensor:
        """Integer diffusion timesteps (B,) -> flow times s / (a + s) (B,), float32."""
        alphas = self._alphas_cumprod[diffusion_timesteps.detach().long().cpu()]
        a, s = alphas.sqrt(), (1.0 - alphas).sqrt()
        return (s / (a + s)).to(torch.float32)

    def diffusion_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """Flow times (B,) -> fractional diffusion timesteps (B,) of equal SNR, float32, on t's device."""
        t64 = t.detach().to(torch.float64).cpu().clamp(self.t_min, self.t_max)
        target = -2.0 * torch.log((1.0 - t64) / t64)  # -log SNR of the flow state
        table = self._log_snr_ascending
        upper = torch.searchsorted(table, target).clamp(1, len(table) - 1)
        lower = upper - 1
        fraction = ((target - table[lower]) / (table[upper] - table[lower])).clamp(0.0, 1.0)
        return (lower + fraction).to(device=t.device, dtype=torch.float32)

    def coefficients(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, s) of the diffusion state matching flow time t, each (B, 1, ..., 1) fp32 like `like`."""
        t = _per_sample(t, like)
        norm = ((1.0 - t) ** 2 + t**2).rsqrt()
        return (1.0 - t) * norm, t * norm

    def model_inputs(self, noisy: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Flow state x_t (B, ...) and times (B,) -> diffusion state x_diff (B, ...) and timesteps (B,)."""
        a, s = self.coefficients(t, noisy)
        return (noisy.float() * (a + s)).to(noisy.dtype), self.diffusion_timesteps(t)

    def prediction_to_velocity(
        self, prediction: torch.Tensor, x_diff: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        """The model's epsilon / v / sample prediction at x_diff -> the flow velocity noise - x0 (fp32)."""
        a, s = self.coefficients(t, x_diff)
        x0, noise = split_prediction(prediction, x_diff, a, s, self.prediction_type)
        return noise - x0

    def model_output(self, prediction: torch.Tensor, x_diff: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the family returns: the velocity with velocity_loss, else the model's own prediction."""
        if not self.velocity_loss:
            return prediction
        return self.prediction_to_velocity(prediction, x_diff, t).to(prediction.dtype)

    def velocity(self, output: torch.Tensor, noisy: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The flow velocity from what the family returned for flow state `noisy` (used by rollouts)."""
        if self.velocity_loss:
            return output.float()
        x_diff, _ = self.model_inputs(noisy, t)
        return self.prediction_to_velocity(output, x_diff, t)

    # -- the Objective -------------------------------------------------------------------------
    def sample_timesteps(self, batch_size: int, generator: torch.Generator, device) -> torch.Tensor:
        """Flow times (B,) uniform over [t_min, t_max], the span of the diffusion schedule; float32."""
        u = torch.rand(batch_size, generator=generator, device=generator.device)
        return (self.t_min + u * (self.t_max - self.t_min)).to(device)

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The flow interpolant (1 - t) x0 + t noise, in the latents' dtype."""
        t = _per_sample(timesteps, latents)
        return ((1.0 - t) * latents.float() + t * noise.float()).to(latents.dtype)

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """noise - x0 with velocity_loss; else epsilon / v / x0 of the matching diffusion state."""
        if self.velocity_loss:
            return (noise.float() - latents.float()).to(latents.dtype)
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "sample":
            return latents
        a, s = self.coefficients(timesteps, latents)
        return (a * noise.float() - s * latents.float()).to(latents.dtype)


def split_prediction(
    prediction: torch.Tensor,
    x: torch.Tensor,
    signal: torch.Tensor,
    noise_scale: torch.Tensor,
    prediction_type: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, noise) from a denoiser's epsilon / v / sample prediction at x = signal*x0 + noise_scale*noise (fp32)."""
    prediction, x = prediction.float(), x.float()
    if prediction_type == "epsilon":
        return (x - noise_scale * prediction) / signal, prediction
    if prediction_type == "v_prediction":
        return signal * x - noise_scale * prediction, noise_scale * x + signal * prediction
    return prediction, (x - signal * prediction) / noise_scale
