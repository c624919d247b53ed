"""What a step draws besides the batch: timestep bias, offset-noise probability, input perturbation.

All randomness comes from the run's noise generator, drawn for the whole global batch (see
`difftune.training.distributed.global_rows`), so a run repeats exactly and resumes exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BIAS_BINS = 1000  # the original tool's timestep grid: bias ranges are given in these units


@dataclass(frozen=True)
class TimestepBias:
    """Relative density of drawn timesteps over the noise scale, in BIAS_BINS equal bins (0 = clean).

    'later' multiplies the density of the noisiest `portion` of the scale by `multiplier`, 'earlier'
    that of the cleanest, 'range' that of bins [begin, end). For a diffusion model (1000 integer
    timesteps) each bin is one timestep, as in the original tool; for flow models a bin is a 1/1000
    slice of sigma. The objective's own distribution is reweighted by rejection sampling.
    """

    weights: torch.Tensor  # (BIAS_BINS,), max 1

    @classmethod
    def from_config(cls, config) -> TimestepBias | None:
        """The bias timestep_bias_* describe, or None for strategy 'none'."""
        strategy = config.timestep_bias_strategy
        if strategy == "none":
            return None
        weights = torch.ones(BIAS_BINS)
        count = int(config.timestep_bias_portion * BIAS_BINS)
        if strategy == "later":
            chosen = slice(BIAS_BINS - count, BIAS_BINS)
        elif strategy == "earlier":
            chosen = slice(0, count)
        else:
            chosen = slice(config.timestep_bias_begin, config.timestep_bias_end)
        weights[chosen] *= config.timestep_bias_multiplier
        return cls(weights / weights.max())

    def draw(
        self, objective, latent_shape, batch_size: int, generator: torch.Generator, device
    ) -> torch.Tensor:
        """batch_size timesteps from the objective's distribution reweighted by the bias."""
        kept: list[torch.Tensor] = []
        found = 0
        while found < batch_size:
            candidates = objective.sample_timesteps_for(latent_shape, 4 * batch_size, generator, "cpu")
            bins = (objective.noise_fraction(candidates) * BIAS_BINS).long().clamp(0, BIAS_BINS - 1)
            accept = (
                torch.rand(len(candidates), generator=generator, device=generator.device) < self.weights[bins]
            )
            kept.append(candidates[accept])
            found += int(accept.sum())
        return torch.cat(kept)[:batch_size].to(device)


def draws_offset(probability: float, generator: torch.Generator) -> bool:
    """Whether this global batch gets offset noise: always at 1, never at 0, else one draw."""
    if probability >= 1.0:
        return True
    if probability <= 0.0:
        return False
    return bool(torch.rand(1, generator=generator, device=generator.device) < probability)


def input_perturbation_scale(amount: float, steps: int, step: int) -> float:
    """The input perturbation at `step`: `amount`, decaying linearly to 0 over `steps` when steps > 0."""
    if amount == 0 or (steps and step >= steps):
        return 0.0
    return amount * (1.0 - step / steps) if steps else amount
