"""The training loss, shared by the recipe and the eval loss."""

from __future__ import annotations

import torch


def per_sample_loss(
    prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """Mean squared error per sample (B,), in fp32, over the unmasked elements (mask 1 = counted)."""
    error = (prediction.float() - target.float()) ** 2
    dims = tuple(range(1, error.ndim))
    if mask is None:
        return error.mean(dim=dims)
    mask = mask.to(error.dtype).expand_as(error)
    return (error * mask).sum(dim=dims) / mask.sum(dim=dims).clamp_min(1.0)


def build_crepa(config, denoiser: torch.nn.Module, components, device):
    """The CREPA regulariser when crepa_enabled (its projector trains with the denoiser), else None."""
    if not config.crepa_enabled:
        return None
    from difftune.training.crepa import Crepa, drop_vae_encoder

    crepa = Crepa(config, denoiser, device)
    if config.crepa_drop_vae_encoder and components.vae is not None:
        drop_vae_encoder(components.vae)
    return crepa


def crepa_loss(crepa, family, components, batch: dict, latents: torch.Tensor) -> torch.Tensor:
    """CREPA's term for this step: clean frames from the batch, or decoded from the cached latents."""
    frames = batch.get("pixels")
    if frames is None:
        with torch.no_grad():
            frames = family.decode_latents(components, latents)
    row_order = family.denoiser_row_order(batch) if hasattr(family, "denoiser_row_order") else None
    return crepa.loss(frames, row_order=row_order)
