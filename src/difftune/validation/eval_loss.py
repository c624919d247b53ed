"""Eval loss that is comparable across a run: fixed batches, fixed noise, fixed timesteps.

The timesteps are quantiles (0.1 .. 0.9 by default) of the family's own training timestep distribution,
found once by drawing many timesteps from `objective.sample_timesteps` with a seeded generator; so the
numbers mean the same for epsilon/v models (timesteps 0..999) and flow models (0..1). Noise is drawn
once per batch and reused on every call. Only the Family protocol is used.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from difftune.families.base import Components, Family
from difftune.training.losses import per_sample_loss

DEFAULT_QUANTILES = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
_DISTRIBUTION_SAMPLES = 8192


@dataclass
class EvalResult:
    """Mean loss over every batch and timestep, and per timestep (keyed by the timestep's value)."""

    loss: float
    per_timestep: dict[float, float]

    def as_event(self, step: int) -> dict[str, Any]:
        """Flat numbers for an `eval` event: eval_loss and eval_loss_t<timestep>."""
        event: dict[str, Any] = {"step": step, "eval_loss": self.loss}
        event.update({f"eval_loss_t{t:g}": value for t, value in self.per_timestep.items()})
        return event


class EvalLoss:
    """Loss of a denoiser on held-out cached batches (dicts as the trainer's load_batch gives, with "latents")."""

    def __init__(
        self,
        family: Family,
        components: Components,
        batches: Sequence[dict[str, Any]],
        seed: int = 0,
        quantiles: Sequence[float] = DEFAULT_QUANTILES,
        timesteps: Sequence[float] | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        if not batches:
            raise ValueError(
                "eval loss needs at least one batch; give it an eval dataset or held-out samples"
            )
        self.family = family
        self.components = components
        self.batches = list(batches)
        self.device = torch.device(device)
        self.objective = family.objective(components)
        generator = torch.Generator().manual_seed(seed)
        self.timesteps = self._fixed_timesteps(generator, quantiles, timesteps)
        # Noise per batch, drawn once on the CPU so the numbers do not depend on the device's RNG.
        self.noise = [
            torch.randn(batch["latents"].shape, generator=generator, dtype=torch.float32)
            for batch in self.batches
        ]

    def _fixed_timesteps(
        self, generator: torch.Generator, quantiles: Sequence[float], timesteps: Sequence[float] | None
    ) -> torch.Tensor:
        """(K,) timesteps in the family's convention, in the dtype its sampler returns."""
        drawn = self.objective.sample_timesteps(_DISTRIBUTION_SAMPLES, generator, torch.device("cpu"))
        if timesteps is not None:
            return torch.tensor(list(timesteps), dtype=drawn.dtype)
        if not all(0.0 <= q <= 1.0 for q in quantiles):
            raise ValueError(f"eval loss quantiles must be in [0, 1], got {list(quantiles)}")
        values = torch.quantile(drawn.double(), torch.tensor(list(quantiles), dtype=torch.float64))
        if not drawn.is_floating_point():
            values = values.round()
        return values.to(drawn.dtype)

    @torch.no_grad()
    def __call__(self, denoiser: torch.nn.Module) -> EvalResult:
        """Evaluate; the denoiser is put in eval mode for the call and its mode restored after."""
        was_training = denoiser.training
        denoiser.eval()
        try:
            sums = torch.zeros(len(self.timesteps), dtype=torch.float64)
            counts = torch.zeros(len(self.timesteps), dtype=torch.float64)
            for batch, noise_cpu in zip(self.batches, self.noise):
                latents = batch["latents"].to(self.device)
                noise = noise_cpu.to(self.device, dtype=latents.dtype)
                mask = self.family.loss_mask(batch, latents)
                for k, value in enumerate(self.timesteps.tolist()):
                    timesteps = torch.full(
                        (latents.shape[0],), value, dtype=self.timesteps.dtype, device=self.device
                    )
                    noisy = self.objective.add_noise(latents, noise, timesteps)
                    prediction = self.family.model_forward(self.components, denoiser, noisy, timesteps, batch)
                    losses = per_sample_loss(
                        prediction, self.objective.target(latents, noise, timesteps), mask
                    )
                    sums[k] += losses.double().sum().cpu()
                    counts[k] += losses.numel()
        finally:
            denoiser.train(was_training)
        means = (sums / counts).tolist()
        keys = [round(float(t), 6) for t in self.timesteps.tolist()]
        return EvalResult(loss=float(sum(means) / len(means)), per_timestep=dict(zip(keys, means)))
