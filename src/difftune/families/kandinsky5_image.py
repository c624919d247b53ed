"""Kandinsky 5.0 Image (T2I and I2I Lite): Qwen2.5-VL + CLIP text, Flux VAE, flow-matching DiT.

Layouts: at the Family boundary latents are (B, 16, H/8, W/8), already multiplied by the VAE's
scaling_factor. The Kandinsky 5 pipelines do not use the Flux VAE's shift_factor (they encode
with `* scaling_factor` and decode with `/ scaling_factor`), so neither do we: training latents
must be what the pipeline decodes. Inside `model_forward` latents become channels-last
(B, 1, H/8, W/8, 16), the layout of the transformer and its pipelines, and the prediction is
turned back into (B, 16, H/8, W/8).

Timesteps from the objective are sigmas in [0, 1]; the transformer is given sigma * 1000, which is
what the pipelines pass (FlowMatchEulerDiscreteScheduler timesteps).

I2I flavours: the batch carries "conditioning_latents" (B, 16, H/8, W/8), the encoded source
image; their Qwen prompt embeddings include the source image, so `encode_prompts` needs `images`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from difftune.errors import ConfigError
from difftune.families import kandinsky5 as k5
from difftune.families import registry
from difftune.families.base import Components, Conditioning, GenerationRequest

BURNT_GUIDANCE = 7.0


def _channels_last(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, 1, H, W, C), the transformer's layout for one-frame images."""
    return latents.unsqueeze(2).permute(0, 2, 3, 4, 1)


class Kandinsky5ImageFamily(k5.Kandinsky5Family):
    """Kandinsky 5.0 Image Lite, text-to-image and image-to-image."""

    spec = registry.KANDINSKY5_IMAGE

    @property
    def is_i2i(self) -> bool:
        """True for the image-to-image flavours (or a local folder whose transformer has visual_cond)."""
        if self.spec.flavour(self.config.model_flavour).kind == "i2i":
            return True
        path = Path(self.model_id()) / "transformer" / "config.json"
        return path.is_file() and bool(json.loads(path.read_text()).get("visual_cond", False))

    @property
    def conditioning(self) -> Conditioning:
        return "prompt_image" if self.is_i2i else "none"

    def pipeline_class(self) -> type:
        """Kandinsky5I2IPipeline for i2i flavours, else Kandinsky5T2IPipeline."""
        from diffusers import Kandinsky5I2IPipeline, Kandinsky5T2IPipeline

        return Kandinsky5I2IPipeline if self.is_i2i else Kandinsky5T2IPipeline

    def encode_prompts(
        self, components: Components, texts: list[str], images: Sequence[Any] | None = None
    ) -> list[dict[str, torch.Tensor]]:
        """See `Kandinsky5Family.encode_prompts`; I2I flavours need `images` (one source image per text)."""
        if self.is_i2i and images is None:
            raise ValueError(
                f"{self.config.model_flavour or self.model_id()}: image-to-image prompt embeddings include the "
                "source image; pass images=[one conditioning image per prompt] to encode_prompts"
            )
        return super().encode_prompts(components, texts, images)

    def decode_pipeline_latents(self, components: Components, latents: torch.Tensor) -> torch.Tensor:
        return self.decode_latents(components, self.pipeline_latents(components, latents)[:, :, 0])

    def model_forward(
        self,
        components: Components,
        denoiser: torch.nn.Module,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        batch: dict[str, Any],
    ) -> torch.Tensor:
        """Velocity prediction (B, 16, h, w) for noisy latents (B, 16, h, w) and sigmas (B,).

        `batch` holds the collated prompt tensors and, for I2I, "conditioning_latents" (B, 16, h, w).
        """
        condition = batch.get("conditioning_latents")
        if self.is_i2i and condition is None:
            raise ValueError(
                "image-to-image training needs batch['conditioning_latents'] from a conditioning dataset"
            )
        prediction = k5.transformer_forward(
            denoiser,
            _channels_last(noisy_latents),
            timesteps,
            batch,
            condition_bthwc=None if condition is None else _channels_last(condition.to(noisy_latents.device)),
            num_train_timesteps=self.num_train_timesteps(components),
        )
        return prediction[:, 0].permute(0, 3, 1, 2)

    def generate(self, pipeline, request: GenerationRequest) -> list:
        """Images at exactly the asked size; I2I needs `request.image` (a PIL image).

        The pipelines snap sizes outside their list of 1K resolutions to the nearest aspect ratio;
        the requested size is added to this pipeline's list so that it is used as asked.
        """
        arguments = self.pipeline_arguments(request)
        if self.is_i2i:
            if request.image is None:
                raise ValueError("image-to-image validation needs a conditioning image (request.image)")
            arguments["image"] = request.image
        size = (request.width, request.height)
        if size not in pipeline.resolutions:
            pipeline.resolutions = [*pipeline.resolutions, size]
        return list(pipeline(**arguments).image)

    def check(self, datasets: Sequence[Any]) -> list[str]:
        """I2I needs an enabled conditioning dataset; guidance that burns images warns."""
        warnings = super().check(datasets)
        sources = [
            d for d in datasets if not d.disabled and (d.dataset_type == "conditioning" or d.conditioning)
        ]
        if self.is_i2i and not sources:  # a dataset's `conditioning` block generates its source images
            raise ConfigError(
                f"model_flavour '{self.config.model_flavour}' trains image-to-image and needs a dataset with "
                '"dataset_type": "conditioning" in multidatabackend.json, linked from the image dataset by '
                '"conditioning_data": "<its id>"'
            )
        if self.config.validation_guidance >= BURNT_GUIDANCE:
            warnings.append(
                f"validation_guidance {self.config.validation_guidance} is high for Kandinsky 5: values of "
                f"{BURNT_GUIDANCE} and above tend to give burnt (over-saturated) images; 5.0 is recommended"
            )
        return warnings
