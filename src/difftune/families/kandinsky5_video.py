"""Kandinsky 5.0 Video (T2V and I2V, Lite and Pro): Qwen2.5-VL + CLIP text, HunyuanVideo 3D VAE, flow-matching DiT.

Layouts: pixels at the Family boundary are (B, 3, T, H, W) in [-1, 1] with (T - 1) % 4 == 0; latents
are (B, 16, T', H/8, W/8) with T' = (T - 1) / 4 + 1, multiplied by the VAE's scaling_factor as the
pipelines do. Inside `model_forward` latents are channels-last (B, T', h, w, 16), the transformer's
layout, and the prediction is turned back into (B, 16, T', h, w). Timesteps are sigmas in [0, 1]; the
transformer gets sigma * 1000, the pipelines' scheduler timesteps.

Image-to-video, as `Kandinsky5I2VPipeline` does it: the first latent frame of the noisy input is
replaced by the clean latent of the first frame, encoded alone (batch["conditioning_latents"],
(B, 16, 1, h, w), see `encode_condition`); a visual_cond transformer also gets zero condition
channels and a mask that is 1 on the first frame only. That frame is given, so `loss_mask` leaves it
out of the loss.

NABLA sparse attention (10s and Pro flavours) is what the pipelines use at inference; training runs
the same transformer with dense attention (which NABLA approximates), and a warning says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from difftune.errors import ConfigError
from difftune.families import kandinsky5 as k5
from difftune.families import registry
from difftune.families.base import Components, Conditioning, GenerationRequest

GUIDANCE_RANGE = (2.0, 6.0)  # outside it validation videos tend to come out black or noisy
I2V_MIN_FRAMES = 17  # the I2V pipeline rescales its first 4 latent frames by the statistics of later ones


def _channels_last(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, T, H, W) -> (B, T, H, W, C)."""
    return latents.permute(0, 2, 3, 4, 1)


class Kandinsky5VideoFamily(k5.Kandinsky5Family):
    """Kandinsky 5.0 Video Lite and Pro, text-to-video and image-to-video."""

    spec = registry.KANDINSKY5_VIDEO

    def __init__(self, config, emit=None):
        super().__init__(config, emit)
        self._warned: set[str] = set()
        self._bare_pipeline = None  # a component-less pipeline, for its size rules

    @property
    def is_i2v(self) -> bool:
        """True for the i2v flavours, or a local folder saved from `Kandinsky5I2VPipeline`."""
        if self.spec.flavour(self.config.model_flavour).kind == "i2v":
            return True
        index = Path(self.model_id()) / "model_index.json"
        return index.is_file() and '"Kandinsky5I2VPipeline"' in index.read_text()

    @property
    def conditioning(self) -> Conditioning:
        return "first_frame" if self.is_i2v else "none"

    def pipeline_class(self) -> type:
        """Kandinsky5I2VPipeline for image-to-video, else Kandinsky5T2VPipeline."""
        from diffusers import Kandinsky5I2VPipeline, Kandinsky5T2VPipeline

        return Kandinsky5I2VPipeline if self.is_i2v else Kandinsky5T2VPipeline

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            self.emit("warning", {"message": message})

    # -- conditioning -------------------------------------------------------------------------
    def encode_pixels(
        self,
        components: Components,
        pixels: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
    ) -> torch.Tensor:
        """(B, 3, T, H, W) in [-1, 1] -> (B, 16, (T - 1) / 4 + 1, H/8, W/8) latents times scaling_factor."""
        if pixels.ndim != 5:
            raise ValueError(f"expected video pixels shaped (B, C, T, H, W), got {tuple(pixels.shape)}")
        problem = self.spec.frame_count_problem(pixels.shape[2])
        if problem:
            raise ValueError(f"{pixels.shape[2]} frames cannot be encoded: {problem}")
        return super().encode_pixels(components, pixels, generator)

    def decode_pipeline_latents(self, components: Components, latents: torch.Tensor) -> torch.Tensor:
        return self.decode_latents(components, self.pipeline_latents(components, latents))

    # -- training -----------------------------------------------------------------------------
    def model_forward(
        self,
        components: Components,
        denoiser: torch.nn.Module,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        batch: dict[str, Any],
    ) -> torch.Tensor:
        """Velocity prediction (B, 16, T', h, w) for noisy latents (B, 16, T', h, w) and sigmas (B,).

        `batch` holds the collated prompt tensors and, for I2V, "conditioning_latents"
        (B, 16, 1, h, w); without them the first frame of batch["latents"] is used, with a warning.
        """
        latents = _channels_last(noisy_latents)
        condition = mask = None
        if self.is_i2v:
            first = self._first_frame_latents(batch).to(device=latents.device, dtype=latents.dtype)
            latents = torch.cat([_channels_last(first), latents[:, 1:]], dim=1)
            if denoiser.config.visual_cond:
                condition = torch.zeros_like(latents)
                mask = torch.zeros_like(latents[..., :1])
                mask[:, 0] = 1
        if denoiser.config.get("attention_type", "regular") == "nabla":
            self._warn_once(
                "nabla",
                "this transformer uses NABLA sparse attention at inference; training uses dense attention "
                "(validation videos still go through the pipeline's sparse attention)",
            )
        spatial = components.vae.config.spatial_compression_ratio if components.vae is not None else 8
        _, _, height, width, _ = latents.shape
        prediction = k5.transformer_forward(
            denoiser,
            latents,
            timesteps,
            batch,
            condition_bthwc=condition,
            mask_bthwc=mask,
            scale_factor=self._rope_scale_factor(height * spatial, width * spatial),
            num_train_timesteps=self.num_train_timesteps(components),
        )
        return prediction.permute(0, 4, 1, 2, 3)

    def _first_frame_latents(self, batch: dict[str, Any]) -> torch.Tensor:
        """(B, 16, 1, h, w): batch["conditioning_latents"], else the first frame of batch["latents"]."""
        condition = batch.get("conditioning_latents")
        if condition is not None:
            return condition[:, :, :1] if condition.ndim == 5 else condition.unsqueeze(2)
        if batch.get("latents") is None:
            raise ValueError(
                "image-to-video training needs batch['conditioning_latents'] (the first frame encoded alone, "
                "see Family.encode_condition) or batch['latents']"
            )
        self._warn_once(
            "i2v-condition",
            "batch has no 'conditioning_latents'; using the first latent frame of the clip as the I2V condition "
            "(the pipeline encodes the image alone, which differs slightly)",
        )
        return batch["latents"][:, :, :1]

    def _rope_scale_factor(self, height: int, width: int) -> tuple:
        """The RoPE scale the pipelines use at this pixel size (their `_get_scale_factor`)."""
        if self._bare_pipeline is None:
            self._bare_pipeline = k5.text_pipeline(self.pipeline_class(), None, None, None, None)
        return tuple(self._bare_pipeline._get_scale_factor(height, width))

    def loss_mask(self, batch: dict[str, Any], latents: torch.Tensor) -> torch.Tensor | None:
        """I2V: (B, 1, T', 1, 1), 0 on the given first frame and 1 elsewhere; T2V: None."""
        if not self.is_i2v:
            return None
        mask = torch.ones(latents.shape[0], 1, latents.shape[2], 1, 1, device=latents.device)
        mask[:, :, 0] = 0
        return mask

    # -- output -------------------------------------------------------------------------------
    def generate(self, pipeline, request: GenerationRequest) -> list:
        """One video: [[PIL frames]]; `request.num_frames` or validation_num_video_frames frames.

        I2V takes `request.image` (a PIL image). Without one, the first frame is generated by a one-frame
        text-to-video pass of the same components, then animated: validation still shows the model.
        """
        num_frames = (
            request.num_frames
            or self.config.validation_num_video_frames
            or self.spec.defaults["validation_num_video_frames"]
        )
        problem = self.spec.frame_count_problem(num_frames)
        if problem:
            raise ValueError(f"num_frames {num_frames}: {problem}")
        if self.is_i2v and num_frames < I2V_MIN_FRAMES:
            raise ValueError(
                f"validation_num_video_frames={num_frames}: Kandinsky5I2VPipeline needs at least {I2V_MIN_FRAMES} "
                "frames (5 latent frames) to normalise its first frames; use 17 or more"
            )
        arguments = self.pipeline_arguments(request)
        if self.is_i2v:
            image = request.image
            if image is None:
                from diffusers import Kandinsky5T2VPipeline

                still = {key: value for key, value in arguments.items() if key != "callback_on_step_end"}
                image = Kandinsky5T2VPipeline(**pipeline.components)(num_frames=1, **still).frames[0][0]
            arguments["image"] = image
        output = pipeline(num_frames=num_frames, output_type="pil", **arguments)
        return [list(output.frames[0])]

    def save_sample(self, sample: list, path: Path) -> Path:
        """Write one generated video (`generate`'s [[frames]]) as .mp4 at config.framerate."""
        from difftune.data.video import write_video

        return write_video(Path(path).with_suffix(".mp4"), sample[0], fps=self.config.framerate)

    def check(self, datasets: Sequence[Any]) -> list[str]:
        """Image-to-video refuses datasets holding only the condition frame and validation under 17
        frames; guidance outside 2-6 warns."""
        from difftune.config.training_checks import image_to_video_problems

        warnings = super().check(datasets)
        if self.is_i2v:
            problems = image_to_video_problems(
                datasets,
                "multidatabackend.json",
                f"the model '{self.model_id()}'",
                self.spec.frames_per_latent,
            )
            if problems:
                raise ConfigError("\n".join(problems))
        frames = self.config.validation_num_video_frames
        if frames is not None and self.is_i2v and frames < I2V_MIN_FRAMES:
            raise ConfigError(
                f"'validation_num_video_frames' is {frames}, too short for image-to-video validation: "
                f"Kandinsky5I2VPipeline needs at least {I2V_MIN_FRAMES} frames; use 17 or more (61 for 5 s)"
            )
        low, high = GUIDANCE_RANGE
        guidance = self.config.validation_guidance
        if guidance > high or guidance < low:
            side = "high" if guidance > high else "low"
            warnings.append(
                f"validation_guidance {guidance} is {side} for Kandinsky 5 Video: outside {low}-{high} validation "
                "videos tend to come out black or noisy; 5.0 is recommended"
            )
        return warnings
