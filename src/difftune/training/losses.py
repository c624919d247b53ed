"""The training loss, shared by the recipe, the eval loss and the benchmarks' bare loop."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch


@dataclass(frozen=True)
class LossKind:
    """loss_type with huber_c and huber_schedule, as the original tool defines them.

    l2: d^2. huber: 2 c (sqrt(d^2 + c^2) - c). smooth_l1: 2 (sqrt(d^2 + c^2) - c); d = prediction
    - target. huber_schedule sets c per sample: constant c; exponential c ** u, u the noise
    fraction of the timestep (c at pure noise, 1 when clean); snr (1 - c) / (1 + r)^2 + c, r = 1 /
    sqrt(SNR) the noise-to-signal ratio.
    """

    loss_type: str = "l2"
    huber_c: float = 0.1
    huber_schedule: str = "snr"

    @classmethod
    def from_config(cls, config) -> LossKind:
        return cls(config.loss_type, config.huber_c, config.huber_schedule)

    def c(self, objective, timesteps: torch.Tensor) -> torch.Tensor:
        """huber_c per sample (B,), fp32."""
        if self.huber_schedule == "constant":
            return torch.full(timesteps.shape, float(self.huber_c), device=timesteps.device)
        if self.huber_schedule == "exponential":
            return float(self.huber_c) ** objective.noise_fraction(timesteps).float()
        ratio = objective.snr(timesteps).float().clamp_min(1e-12).rsqrt()
        return (1.0 - self.huber_c) / (1.0 + ratio) ** 2 + self.huber_c

    def elementwise(self, error: torch.Tensor, objective, timesteps: torch.Tensor) -> torch.Tensor:
        """The loss of each element of `error` (prediction - target, (B, ...), fp32)."""
        if self.loss_type == "l2":
            return error**2
        c = self.c(objective, timesteps).to(error.device).reshape(-1, *([1] * (error.ndim - 1)))
        smooth = 2.0 * (torch.sqrt(error**2 + c**2) - c)
        return c * smooth if self.loss_type == "huber" else smooth


def loss_mask(family, batch: dict, latents: torch.Tensor) -> torch.Tensor | None:
    """What the loss counts: the family's mask (e.g. a given first frame) times the batch's "loss_mask"
    (linked mask images on the latent grid), broadcast against the latents; None counts everything."""
    own = family.loss_mask(batch, latents)
    data = batch.get("loss_mask")
    if data is None:
        return own
    data = data.to(latents.device)
    return data if own is None else own.to(latents.device) * data


def per_sample_loss(
    prediction: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor | None,
    kind: LossKind | None = None,
    objective=None,
    timesteps: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean loss per sample (B,), in fp32, over the unmasked elements (mask 1 = counted).

    Squared error unless `kind` says otherwise (huber and smooth_l1 need the objective and timesteps).
    """
    difference = prediction.float() - target.float()
    if kind is None or kind.loss_type == "l2":
        error = difference**2
    else:
        error = kind.elementwise(difference, objective, timesteps)
    dims = tuple(range(1, error.ndim))
    if mask is None:
        return error.mean(dim=dims)
    mask = mask.to(error.dtype).expand_as(error)
    return (error * mask).sum(dim=dims) / mask.sum(dim=dims).clamp_min(1.0)


def diffusion_loss(
    family,
    objective,
    batch: dict,
    latents: torch.Tensor,
    prediction: torch.Tensor,
    target: torch.Tensor,
    timesteps: torch.Tensor,
    kind: LossKind | None = None,
    sample_weights: torch.Tensor | None = None,
    reduction: Literal["mean", "none"] = "mean",
    timestep_weights: bool = True,
) -> torch.Tensor:
    """The mean loss of a batch, a scalar in fp32 (with reduction "none", each sample's loss, (B,)).

    Per sample: `kind`'s loss (squared error when None) over what `loss_mask` counts (the family's mask
    times the batch's masked-loss mask), times `sample_weights` (B,) (prior preservation) when given,
    times the objective's timestep weights (e.g. min-SNR) unless `timestep_weights` is False; then the
    mean over the batch.
    """
    losses = per_sample_loss(
        prediction, target, loss_mask(family, batch, latents), kind, objective, timesteps
    )
    if sample_weights is not None:
        losses = losses * sample_weights
    weights = objective.loss_weights(timesteps) if timestep_weights else None
    if weights is not None:
        losses = losses * weights
    return losses if reduction == "none" else losses.mean()
