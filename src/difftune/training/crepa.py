"""CREPA: cross-frame representation alignment, a temporal regulariser for video diffusion transformers.

After Hwang et al. 2025, "Cross-Frame Representation Alignment for Fine-Tuning Video Diffusion Models".
The hidden tokens z_f of latent frame f at transformer block `crepa_block_index` go through a small
trainable MLP h; they are pulled towards the frozen vision encoder's (DINOv2) patch features y_k of
the clean frame f itself and of its neighbours k, 1 <= |k - f| <= crepa_adjacent_distance:

    align = 1/F * sum_f [ sim(y_f, h(z_f)) + sum_k exp(-|k - f| / crepa_adjacent_tau) * sim(y_k, h(z_f)) ]
    loss  = -crepa_lambda * align        (added to the diffusion loss; averaged over the batch)

sim is the cosine similarity of matching tokens averaged over the token grid; the encoder's patch grid
is resized (bilinear) to the transformer's token grid, both covering the whole frame. Distance 0 is
per-frame REPA. Latent frame f stands for pixel frame k*f, k the VAE's frames per latent (the last
frame its causal VAE step saw).

How a run uses it (`TrainingFeatures` in training/features.py, for a family whose `token_grid` says how
block tokens lay out frames): `TrainingFeatures.build`, before the optimizer, hooks the block

    crepa = Crepa(config, denoiser, family.transformer_blocks(denoiser), device,
                  token_grid=family.token_grid(), frames_per_latent=family.spec.frames_per_latent)

(with crepa_drop_vae_encoder it also frees the family's `vae_encoder_parts` through `drop_vae_encoder`),
and `features.trainable_parameters()` gives its projector to the optimizer. The step's
`family.model_forward(...)` fills the hook; `features.extra_loss(batch, latents)` then adds

    crepa.loss(frames, row_order=family.row_order(batch))

where `frames` are the batch's clean "pixels" (B, 3, T, H, W) in [-1, 1], or the clean latents decoded
by the family when the latents come from the cache. `frames` may also hold one frame per latent frame
(T == T'). `crepa.state_dict()` goes into every checkpoint under "crepa" (`features.state_dict()`) for
an exact resume; `features.close()` removes the hook. The projector is used only for the loss, not at
inference.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from difftune.errors import ConfigError

if TYPE_CHECKING:
    from difftune.families.base import TokenGrid

ENCODER_HUB_IDS = {
    "dinov2_vits14": "facebook/dinov2-small",
    "dinov2_vitb14": "facebook/dinov2-base",
    "dinov2_vitl14": "facebook/dinov2-large",
    "dinov2_vitg14": "facebook/dinov2-giant",
}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ENCODER_FRAMES_PER_CALL = 16


def load_vision_encoder(
    name_or_path: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
):
    """The frozen DINOv2 of `crepa_model`: a short name (dinov2_vitg14 ...), a Hub id or a local folder."""
    from transformers import Dinov2Model

    from difftune.offline import check_fetchable

    source = str(name_or_path)
    if source in ENCODER_HUB_IDS:
        source = ENCODER_HUB_IDS[source]
    elif not Path(source).exists() and "/" not in source:
        raise ValueError(
            f"crepa_model '{name_or_path}' is not a known vision encoder; use one of {sorted(ENCODER_HUB_IDS)}, "
            "a Hub id such as facebook/dinov2-small, or a local folder saved by Dinov2Model.save_pretrained"
        )
    check_fetchable(source, "crepa_model")
    encoder = Dinov2Model.from_pretrained(source, dtype=dtype)
    return encoder.to(device).eval().requires_grad_(False)


def build_projector(hidden_dim: int, feature_dim: int, width: int = 2048) -> nn.Sequential:
    """The trainable MLP from transformer hidden size to encoder feature size (REPA's three layers)."""
    return nn.Sequential(
        nn.Linear(hidden_dim, width),
        nn.SiLU(),
        nn.Linear(width, width),
        nn.SiLU(),
        nn.Linear(width, feature_dim),
    )


def neighbour_weights(frames: int, distance: int, tau: float) -> torch.Tensor:
    """(F, F) weights: 1 on the diagonal, exp(-|k - f| / tau) for 1 <= |k - f| <= distance, else 0."""
    index = torch.arange(frames)
    gap = (index[:, None] - index[None, :]).abs().float()
    weights = torch.exp(-gap / tau) * (gap <= distance)
    weights.fill_diagonal_(1.0)
    return weights


class Crepa:
    """Hooks one transformer block, projects its tokens and scores them against DINOv2 features of the frames.

    `blocks` is the transformer's block stack (`Family.transformer_blocks`); `token_grid` how those
    blocks' tokens lay out the frames (`Family.token_grid`); `frames_per_latent` the VAE's temporal
    compression (the family row's); `encoder` (a loaded Dinov2Model) skips `load_vision_encoder`;
    `projector_width` is the MLP's width.
    """

    def __init__(
        self,
        config,
        transformer: nn.Module,
        blocks: nn.ModuleList,
        device: torch.device | str,
        *,
        token_grid: TokenGrid | None,
        frames_per_latent: int = 1,
        encoder: nn.Module | None = None,
        projector_width: int = 2048,
    ):
        if token_grid is None:
            raise ConfigError(
                f"crepa_enabled: the family of {type(transformer).__name__} does not say how its blocks hold the "
                "latents as frames of tokens for CREPA to align; remove crepa_enabled"
            )
        self.token_grid = token_grid
        self.frames_per_latent = frames_per_latent
        self.weight = float(config.crepa_lambda)
        self.distance = int(config.crepa_adjacent_distance)
        self.tau = float(config.crepa_adjacent_tau)
        self.image_size = int(config.crepa_encoder_image_size)
        index = int(config.crepa_block_index)
        if not -len(blocks) <= index < len(blocks):
            raise ValueError(
                f"crepa_block_index {index} is out of range: this transformer has {len(blocks)} blocks "
                f"(0..{len(blocks) - 1}); an early block (about a quarter of the depth) works best"
            )
        from difftune.config.training_checks import crepa_tread_problems

        overlap = crepa_tread_problems(config, {}, num_blocks=len(blocks))  # negative indices resolved
        if overlap:
            raise ConfigError("\n".join(overlap))
        self.encoder = encoder if encoder is not None else load_vision_encoder(config.crepa_model, device)
        self.encoder.eval().requires_grad_(False)
        patch = self.encoder.config.patch_size
        if self.image_size % patch:
            raise ValueError(
                f"crepa_encoder_image_size {self.image_size} is not a multiple of the encoder's patch size {patch}; "
                f"use {self.image_size // patch * patch} or {(self.image_size // patch + 1) * patch}"
            )
        hidden_dim = token_grid.hidden_size(transformer)
        self.projector = build_projector(hidden_dim, self.encoder.config.hidden_size, projector_width).to(
            device
        )
        self.last_similarity: float | None = None
        self._calls: list[Callable[[torch.Tensor], torch.Tensor]] = []  # per call: tokens -> grid
        self._hidden: list[torch.Tensor] = []
        self._handles = [
            transformer.register_forward_pre_hook(self._before_transformer, with_kwargs=True),
            blocks[index].register_forward_hook(self._after_block),
        ]

    # -- hooks --------------------------------------------------------------------------------
    def _before_transformer(self, module, args, kwargs) -> None:
        """Note how each training call of the transformer lays its tokens out (`TokenGrid.layout_of_call`)."""
        if not torch.is_grad_enabled():
            return
        self._calls.append(self.token_grid.layout_of_call(module, args, kwargs))

    def _after_block(self, module, args, output) -> None:
        """Keep the block's output (B, tokens, D) once per transformer call (not in checkpoint recomputes)."""
        if torch.is_grad_enabled() and len(self._hidden) < len(self._calls):
            self._hidden.append(output[0] if isinstance(output, tuple) else output)

    def remove(self) -> None:
        """Detach the hooks from the transformer."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # -- loss ---------------------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        """The projector's parameters: give them to the optimizer with the adapter's."""
        return list(self.projector.parameters())

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Projector weights, for checkpoints."""
        return self.projector.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore projector weights from `state_dict()`."""
        self.projector.load_state_dict(state)

    def loss(self, frames: torch.Tensor, row_order: Sequence[int] | None = None) -> torch.Tensor:
        """-crepa_lambda * alignment for the transformer calls since the last `loss`; a scalar.

        frames: the clean clip, (B, 3, T, H, W) in [-1, 1], with T = 4(T' - 1) + 1 pixel frames or
        T = T' (one per latent frame). row_order: the batch row of each captured row, when the
        transformer was called on groups of rows (`family.row_order(batch)`).
        """
        hidden = self._take_hidden(row_order)  # (B, T', h, w, D)
        batch, latent_frames, height, width, _ = hidden.shape
        if frames.shape[0] != batch:
            raise ValueError(
                f"Crepa.loss got frames for {frames.shape[0]} clips but the transformer saw {batch}"
            )
        projected = self.projector(hidden.float())
        picked = _frames_per_latent(frames, latent_frames, self.frames_per_latent)
        targets = self.encoder_features(picked, (height, width))
        projected = F.normalize(projected.flatten(2, 3), dim=-1)  # (B, T', h*w, D)
        targets = F.normalize(targets.flatten(2, 3).to(projected), dim=-1)
        # similarity[b, f, k]: frame f's projected tokens against encoder features of frame k
        similarity = torch.einsum("bfnd,bknd->bfk", projected, targets) / projected.shape[2]
        weights = neighbour_weights(latent_frames, self.distance, self.tau).to(similarity)
        alignment = (similarity * weights).sum(dim=(1, 2)) / latent_frames
        self.last_similarity = float(similarity.diagonal(dim1=1, dim2=2).mean().detach())
        return -self.weight * alignment.mean()

    def _take_hidden(self, row_order: Sequence[int] | None) -> torch.Tensor:
        """Captured block outputs as (B, T', h, w, D) in batch order; clears the capture."""
        calls, hidden = self._calls, self._hidden
        self._calls, self._hidden = [], []
        if not hidden or len(hidden) != len(calls):
            raise RuntimeError(
                "Crepa.loss found no captured hidden states: run the transformer forward (with gradients "
                "enabled) on this batch first"
            )
        grids = [to_grid(tokens) for to_grid, tokens in zip(calls, hidden)]
        grid = torch.cat(grids) if len(grids) > 1 else grids[0]
        if row_order is not None:
            if sorted(row_order) != list(range(grid.shape[0])):
                raise ValueError(
                    f"row_order {list(row_order)} is not a permutation of the {grid.shape[0]} rows"
                )
            grid = grid[torch.argsort(torch.tensor(list(row_order), device=grid.device))]
        return grid

    @torch.no_grad()
    def encoder_features(self, frames: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """(B, T, 3, H, W) in [-1, 1] -> DINOv2 patch features resized to the token grid, (B, T, h, w, D)."""
        batch, count = frames.shape[:2]
        flat = frames.flatten(0, 1).float()
        pixels = F.interpolate(
            (flat + 1.0) / 2.0, size=(self.image_size, self.image_size), mode="bicubic", antialias=True
        )
        mean = torch.tensor(IMAGENET_MEAN, device=pixels.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=pixels.device).view(1, 3, 1, 1)
        pixels = ((pixels.clamp(0.0, 1.0) - mean) / std).to(self.encoder.dtype)
        side = self.image_size // self.encoder.config.patch_size
        skip = 1 + int(getattr(self.encoder.config, "num_register_tokens", 0) or 0)
        features = []
        for chunk in pixels.to(self.encoder.device).split(ENCODER_FRAMES_PER_CALL):
            tokens = self.encoder(pixel_values=chunk).last_hidden_state[:, skip:]
            maps = tokens.transpose(1, 2).reshape(chunk.shape[0], -1, side, side).float()
            features.append(F.interpolate(maps, size=grid, mode="bilinear", align_corners=False))
        stacked = torch.cat(features).permute(0, 2, 3, 1)  # (B*T, h, w, D)
        return stacked.reshape(batch, count, *grid, stacked.shape[-1])


def _frames_per_latent(frames: torch.Tensor, latent_frames: int, step: int) -> torch.Tensor:
    """(B, 3, T, H, W) -> (B, T', 3, H, W): pixel frame step*f for latent frame f (or all, when T == T')."""
    if frames.ndim != 5:
        raise ValueError(f"Crepa.loss expects frames shaped (B, C, T, H, W), got {tuple(frames.shape)}")
    total = frames.shape[2]
    if total == latent_frames:
        picked = frames
    elif (total - 1) % step == 0 and (total - 1) // step + 1 == latent_frames:
        index = torch.arange(latent_frames, device=frames.device) * step
        picked = frames.index_select(2, index)
    else:
        expected = (latent_frames - 1) * step + 1
        raise ValueError(
            f"Crepa.loss got {total} frames for {latent_frames} latent frames; pass the clip's "
            f"{expected} pixel frames or {latent_frames} frames, one per latent frame"
        )
    return picked.transpose(1, 2)


class _DroppedEncoder(nn.Module):
    """Stands in for a freed VAE encoder; encoding raises an error that says why."""

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        raise RuntimeError(
            "the VAE encoder was freed (crepa_drop_vae_encoder=true): latents must come from the cache; "
            "set crepa_drop_vae_encoder=false to encode pixels"
        )


def drop_vae_encoder(vae: nn.Module, parts: Sequence[str] = ("encoder", "quant_conv")) -> int:
    """Free the VAE's submodules named `parts` (the family's `vae_encoder_parts`) when training only from
    cached latents; returns parameters freed.

    Decoding still works (CREPA decodes latents to frames); encoding raises a clear error. A VAE with
    none of `parts` frees nothing, which a `warning` event says.
    """
    from difftune import events

    children = dict(vae.named_children())
    found = [name for name in parts if isinstance(children.get(name), nn.Module)]
    if not found:
        events.warn(
            f"crepa_drop_vae_encoder: the VAE ({type(vae).__name__}) has no {' or '.join(parts)} to free, "
            "so its encoder stays in memory; set crepa_drop_vae_encoder false to silence this"
        )
        return 0
    freed = 0
    for name in found:
        if not isinstance(children[name], _DroppedEncoder):
            freed += sum(p.numel() for p in children[name].parameters())
            setattr(vae, name, _DroppedEncoder())
    if freed and torch.cuda.is_available():
        torch.cuda.empty_cache()
    return freed
