"""Prior preservation: regularisation data trains the adapter toward the base model's own prediction.

Samples of datasets with `is_regularisation_data` carry batch["regularisation"] (B,) bool. For those
rows the target is the denoiser's prediction with the adapter switched off (diffusers'
`disable_adapters` for LoRA / DoRA, multiplier 0 for LyCORIS), on the same noisy inputs and
timesteps, so the adapter learns the concept without drifting what the base model does elsewhere;
their loss is weighted by `prior_loss_weight`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch


@contextmanager
def adapter_disabled(model: torch.nn.Module, model_type: str) -> Iterator[None]:
    """Run the block with the trained adapter switched off, then switch it back on."""
    if model_type == "lycoris":
        from difftune.training.lycoris import lycoris_strength

        with lycoris_strength(model, 0.0):
            yield
        return
    model.disable_adapters()
    try:
        yield
    finally:
        model.enable_adapters()


class PriorPreservation:
    """Targets and weights of regularisation rows; a run's features build it when some dataset is
    regularisation data (`TrainingFeatures.attach`)."""

    def __init__(self, family, components, model: torch.nn.Module, model_type: str, weight: float) -> None:
        self.family = family
        self.components = components
        self.model = model  # the unwrapped denoiser, whose adapter is switched off for the base prediction
        self.model_type = model_type
        self.weight = weight

    def target(
        self, noisy: torch.Tensor, timesteps: torch.Tensor, batch: dict[str, Any], target: torch.Tensor
    ) -> torch.Tensor:
        """`target` with the regularisation rows replaced by the base model's prediction (no gradient)."""
        rows = batch.get("regularisation")
        if rows is None or not bool(rows.any()):
            return target
        with torch.no_grad(), adapter_disabled(self.model, self.model_type):
            base = self.family.model_forward(self.components, self.model, noisy, timesteps, batch)
        rows = rows.to(target.device).reshape(-1, *([1] * (target.ndim - 1)))
        return torch.where(rows, base.detach().to(target.dtype), target)

    def weights(self, batch: dict[str, Any], device) -> torch.Tensor | None:
        """(B,) loss weights: prior_loss_weight on regularisation rows, 1 elsewhere; None without any."""
        rows = batch.get("regularisation")
        if rows is None or not bool(rows.any()):
            return None
        ones = torch.ones(rows.shape, device=device)
        return torch.where(rows.to(device), ones * self.weight, ones)
