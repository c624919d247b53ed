"""Kandinsky 5.0 Video (T2V and I2V, Lite and Pro): Qwen2.5-VL + CLIP text, HunyuanVideo 3D VAE, flow-matching DiT.

Layouts: pixels at the Family boundary are (B, 3, T, H, W) in [-1, 1] with (T - 1) % 4 == 0; latents
are (B, 16, T', H/8, W/8) with T' = (T - 1) / 4 + 1, multiplied by the VAE's scaling_factor as the
pipelines do. Inside `model_forward` latents are channels-last (B, T', h, w, 16), the transformer's
layout, and the prediction is turned back into (B, 16, T', h, w). Timesteps are sigmas in [0, 1]; the
transformer gets sigma * 1000, the pipelines' scheduler timesteps.

Image-to-video, as `Kandinsky5I2VPipeline` does it: the first latent frame of the noisy input is
replaced by the clean latent of the first frame, encoded alone (batch["conditioning_latents"],
(B, 16, 1, h, w), see `conditioning_latents`); a visual_cond transformer also gets zero condition
channels and a mask that is 1 on the first frame only. That frame is given, so `loss_mask` leaves it
out of the loss.

NABLA sparse attention (10s and Pro flavours) is what the pipelines use at inference; training runs
the same transformer with dense attention (which NABLA approximates), and a warning says so.
"""

from __future__ import annotations

import json
import logging
import types
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from difftune.data.video import check_frame_count, write_video
from difftune.errors import ConfigError
from difftune.families import kandinsky5_common as k5
from difftune.families import registry
from difftune.families.base import Components, Family, Objective
from difftune.families.flow_matching import FlowMatchingObjective
from difftune.families.vae_source import load_vae

logger = logging.getLogger(__name__)

GUIDANCE_RANGE = (2.0, 6.0)  # outside it validation videos tend to come out black or noisy
DEFAULT_VALIDATION_FRAMES = 61
I2V_MIN_FRAMES = 17
PATCH_CONV_FRAMES = 8  # output frames per slice of a VAE 3D convolution with vae_enable_patch_conv


def _channels_last(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, T, H, W) -> (B, T, H, W, C)."""
    return latents.permute(0, 2, 3, 4, 1)


class Kandinsky5VideoFamily(Family):
    """Kandinsky 5.0 Video Lite and Pro, text-to-video and image-to-video."""

    spec = registry.KANDINSKY5_VIDEO
    configures_vae = True  # load() applies vae_enable_patch_conv / tiling / slicing itself

    def __init__(self, config):
        super().__init__(config)
        self._warned: set[str] = set()
        self._bare_pipeline = None  # a component-less pipeline, for its size rules

    # -- identity -----------------------------------------------------------------------------
    @property
    def is_i2v(self) -> bool:
        """True for the i2v flavours, or a local folder saved from `Kandinsky5I2VPipeline`."""
        if self.spec.flavour(self.config.model_flavour).kind == "i2v":
            return True
        index = Path(self.model_id()) / "model_index.json"
        if index.is_file():
            return json.loads(index.read_text()).get("_class_name") == "Kandinsky5I2VPipeline"
        return False

    def denoiser_block_count(self) -> int | None:
        """The transformer's visual blocks, from its config.json."""
        return k5.visual_block_count(self.model_id())

    def pipeline_class(self) -> type:
        """Kandinsky5I2VPipeline for image-to-video, else Kandinsky5T2VPipeline."""
        from diffusers import Kandinsky5I2VPipeline, Kandinsky5T2VPipeline

        return Kandinsky5I2VPipeline if self.is_i2v else Kandinsky5T2VPipeline

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(message)

    # -- loading ------------------------------------------------------------------------------
    def load(self, device: torch.device, weight_dtype: torch.dtype) -> Components:
        """Load each component from its subfolder; apply vae_enable_tiling / _slicing / _patch_conv."""
        import diffusers
        import transformers

        model_id, revision = self.model_id(), self.config.revision
        index = diffusers.DiffusionPipeline.load_config(model_id, revision=revision)

        def load_part(name: str, **kwargs):
            library, class_name = index[name]
            cls = getattr(diffusers if library == "diffusers" else transformers, class_name)
            return cls.from_pretrained(model_id, subfolder=name, revision=revision, **kwargs)

        transformer = load_part("transformer", torch_dtype=weight_dtype).to(device)
        vae_source = self.config.pretrained_vae_model_name_or_path
        if vae_source:
            vae = load_vae(diffusers.AutoencoderKLHunyuanVideo, vae_source, torch_dtype=weight_dtype)
        else:
            vae = load_part("vae", torch_dtype=weight_dtype)
        configure_vae(
            vae,
            tiling=self.config.vae_enable_tiling,
            slicing=self.config.vae_enable_slicing,
            patch_conv=self.config.vae_enable_patch_conv,
        )
        text_encoder = load_part("text_encoder", dtype=weight_dtype).to(device).eval()
        text_encoder_2 = load_part("text_encoder_2", dtype=weight_dtype).to(device).eval()
        for module in (vae, text_encoder, text_encoder_2):
            module.requires_grad_(False)
        return Components(
            denoiser=transformer,
            vae=vae.to(device).eval(),
            text_encoders=[text_encoder, text_encoder_2],
            tokenizers=[k5.load_qwen_tokenizer(index, model_id, revision), load_part("tokenizer_2")],
            scheduler=load_part("scheduler"),
        )

    # -- conditioning -------------------------------------------------------------------------
    def encode_prompts(self, components: Components, texts: list[str]) -> list[dict[str, torch.Tensor]]:
        """Per text: {"prompt_embeds_qwen": (L, D) with L varying, "prompt_embeds_clip": (D2,)}.

        Computed by the stock pipeline's `encode_prompt` (video template), one prompt at a time.
        """
        qwen, clip = components.text_encoders
        pipeline = k5.text_pipeline(
            self.pipeline_class(), qwen, components.tokenizers[0], clip, components.tokenizers[1]
        )
        return k5.encode_prompt_embeds(
            pipeline,
            texts,
            device=qwen.device,
            dtype=qwen.dtype,
            max_sequence_length=self.config.tokenizer_max_length,
        )

    def collate_prompts(self, embeds: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Zero-padded Qwen embeddings (B, L_max, D), their cu_seqlens (B + 1,) and CLIP pooled (B, D2)."""
        return k5.collate_prompt_embeds(embeds)

    @torch.no_grad()
    def encode_pixels(
        self,
        components: Components,
        pixels: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
    ) -> torch.Tensor:
        """(B, 3, T, H, W) in [-1, 1] -> (B, 16, (T - 1) / 4 + 1, H/8, W/8) latents times scaling_factor."""
        if pixels.ndim != 5:
            raise ValueError(f"expected video pixels shaped (B, C, T, H, W), got {tuple(pixels.shape)}")
        check_frame_count(pixels.shape[2], "frame count of the pixels to encode")
        vae = components.vae
        posterior = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist
        latents = posterior.sample(generator=generator)
        return latents * vae.config.scaling_factor

    def conditioning_latents(
        self,
        components: Components,
        pixels: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
    ) -> torch.Tensor:
        """Image-to-video condition: the first frame of (B, 3, T, H, W) encoded alone -> (B, 16, 1, h, w).

        As `Kandinsky5I2VPipeline` encodes its input image. The VAE's group norms span all frames,
        so this differs slightly from the first latent frame of the whole clip.
        """
        return self.encode_pixels(components, pixels[:, :, :1], generator)

    @torch.no_grad()
    def decode_latents(self, components: Components, latents: torch.Tensor) -> torch.Tensor:
        """(B, 16, T', h, w) -> (B, 3, 4(T' - 1) + 1, 8h, 8w) pixels in [-1, 1] (unclamped)."""
        vae = components.vae
        return vae.decode(latents.to(device=vae.device, dtype=vae.dtype) / vae.config.scaling_factor).sample

    def decode_pipeline_latents(self, components: Components, latents: torch.Tensor) -> torch.Tensor:
        """The Kandinsky 5 pipelines sample channels-last (B, T, h, w, C + condition channels)."""
        channels = components.denoiser.config.in_visual_dim
        latents = latents[..., :channels].permute(0, 4, 1, 2, 3)  # -> (B, C, T, h, w)
        return self.decode_latents(components, latents)

    # -- training -----------------------------------------------------------------------------
    def objective(self, components: Components) -> Objective:
        """Flow matching with the config's shift, schedule, sigmoid scale and min-SNR weighting."""
        return FlowMatchingObjective.from_config(self.config)

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
        if getattr(denoiser.config, "attention_type", "regular") == "nabla":
            self._warn_once(
                "nabla",
                "this transformer uses NABLA sparse attention at inference; training uses dense attention "
                "(validation videos still go through the pipeline's sparse attention)",
            )
        spatial = components.vae.config.spatial_compression_ratio if components.vae is not None else 8
        _, _, height, width, _ = latents.shape
        num_train_timesteps = getattr(
            components.scheduler.config, "num_train_timesteps", k5.DEFAULT_NUM_TRAIN_TIMESTEPS
        )
        prediction = k5.transformer_forward(
            denoiser,
            latents,
            timesteps,
            batch,
            condition_bthwc=condition,
            mask_bthwc=mask,
            scale_factor=self._rope_scale_factor(height * spatial, width * spatial),
            num_train_timesteps=num_train_timesteps,
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
                "see Kandinsky5VideoFamily.conditioning_latents) or batch['latents']"
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

    def denoiser_row_order(self, batch: dict[str, Any]) -> list[int]:
        """Batch rows in the order the transformer sees them (grouped by prompt length, see kandinsky5_common)."""
        return [row for group in k5.text_length_groups(batch["prompt_cu_seqlens"]) for row in group]

    def lora_targets(self) -> list[str]:
        """Attention (query, key, value, out) and feed-forward projections; modulation layers excluded."""
        return list(k5.LORA_TARGETS)

    # -- output -------------------------------------------------------------------------------
    def pipeline(self, components: Components, denoiser: torch.nn.Module):
        """The stock Kandinsky5T2VPipeline (I2V: Kandinsky5I2VPipeline) with `denoiser` as its transformer."""
        qwen, clip = components.text_encoders
        return self.pipeline_class()(
            transformer=denoiser,
            vae=components.vae,
            text_encoder=qwen,
            tokenizer=components.tokenizers[0],
            text_encoder_2=clip,
            tokenizer_2=components.tokenizers[1],
            scheduler=components.scheduler,
        )

    def generate(
        self,
        pipeline,
        *,
        prompt: str,
        negative_prompt: str | None,
        width: int,
        height: int,
        num_inference_steps: int,
        guidance_scale: float,
        generator: torch.Generator,
        **kwargs,
    ) -> list:
        """One video: [[PIL frames]]. num_frames defaults to validation_num_video_frames.

        I2V takes `image=` (a PIL image). Without one, the first frame is generated by a one-frame
        text-to-video pass of the same components, then animated: validation still shows the model.
        """
        if width % self.pixel_multiple or height % self.pixel_multiple:
            raise ValueError(
                f"validation_resolution {width}x{height}: Kandinsky 5 sizes must be multiples of {self.pixel_multiple}"
            )
        num_frames = kwargs.pop("num_frames", None) or self.config.validation_num_video_frames
        num_frames = num_frames or DEFAULT_VALIDATION_FRAMES
        check_frame_count(num_frames, "validation_num_video_frames")
        if self.is_i2v and num_frames < I2V_MIN_FRAMES:
            # the I2V pipeline rescales the first 4 latent frames by the statistics of the later ones
            raise ValueError(
                f"validation_num_video_frames={num_frames}: Kandinsky5I2VPipeline needs at least {I2V_MIN_FRAMES} "
                "frames (5 latent frames) to normalise its first frames; use 17 or more"
            )
        if kwargs.pop("guidance_rescale", None):
            self._warn_once(
                "rescale",
                "validation_guidance_rescale is not supported by the Kandinsky 5 video pipelines; ignored",
            )
        common = {
            "prompt": prompt,
            "negative_prompt": negative_prompt,
            "width": width,
            "height": height,
            "num_inference_steps": num_inference_steps,
            "guidance_scale": guidance_scale,
            "generator": generator,
        }
        if self.config.tokenizer_max_length is not None:  # the prompt length the model was trained with
            common["max_sequence_length"] = self.config.tokenizer_max_length
        if self.is_i2v and kwargs.get("image") is None:
            from diffusers import Kandinsky5T2VPipeline

            first = Kandinsky5T2VPipeline(**pipeline.components)(num_frames=1, **common)
            kwargs["image"] = first.frames[0][0]
        output = pipeline(num_frames=num_frames, output_type="pil", **common, **kwargs)
        return [list(output.frames[0])]

    def save_validation(self, frames: list, path: str | Path, fps: float | None = None) -> Path:
        """Write one generated video (PIL frames, or `generate`'s [[frames]]) as .mp4 at config.framerate."""
        if frames and isinstance(frames[0], list):
            frames = frames[0]
        path = Path(path)
        if path.suffix.lower() not in (".mp4", ".mov", ".mkv", ".webm"):
            path = path.with_suffix(".mp4")
        return write_video(path, frames, fps=fps if fps is not None else self.config.framerate)

    def save_lora(self, output_dir: Path, lora_state_dict: dict[str, torch.Tensor]) -> Path:
        """Write pytorch_lora_weights.safetensors with "transformer." keys, via the pipeline's own saver."""
        from diffusers import Kandinsky5T2VPipeline

        prefix = f"{self.adapter_prefix}."
        layers = {key.removeprefix(prefix): value for key, value in lora_state_dict.items()}
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        Kandinsky5T2VPipeline.save_lora_weights(
            output_dir, transformer_lora_layers=layers, transformer_lora_adapter_metadata=self.lora_metadata()
        )
        return output_dir / "pytorch_lora_weights.safetensors"

    def validate_config(self) -> list[str]:
        """Frame counts breaking (n - 1) % 4 == 0 are errors; odd guidance warns."""
        frames = self.config.validation_num_video_frames
        if frames is not None:
            try:
                check_frame_count(frames, "validation_num_video_frames")
            except ValueError as error:
                raise ConfigError(str(error)) from error
            if self.is_i2v and frames < I2V_MIN_FRAMES:
                raise ConfigError(
                    f"validation_num_video_frames={frames} is too short for image-to-video validation: "
                    f"Kandinsky5I2VPipeline needs at least {I2V_MIN_FRAMES} frames; use 17 or more (61 for 5 s)"
                )
        warnings_out = []
        low, high = GUIDANCE_RANGE
        guidance = self.config.validation_guidance
        if guidance > high or guidance < low:
            side = "high" if guidance > high else "low"
            warnings_out.append(
                f"validation_guidance {guidance} is {side} for Kandinsky 5 Video: outside {low}-{high} validation "
                "videos tend to come out black or noisy; 5.0 is recommended"
            )
        return warnings_out

    def check_datasets(self, datasets) -> None:
        """Image-to-video (a flavour, or a local I2V folder) refuses datasets holding only the condition frame."""
        from difftune.config.training_checks import image_to_video_problems

        if self.is_i2v:
            problems = image_to_video_problems(
                datasets,
                "multidatabackend.json",
                f"the model '{self.model_id()}'",
                self.spec.frames_per_latent,
            )
            if problems:
                raise ConfigError("\n".join(problems))


# ---------------------------------------------------------------------------------------------
# VAE memory options


def configure_vae(vae, *, tiling: bool = False, slicing: bool = False, patch_conv: bool = False) -> None:
    """Turn on the VAE's own tiling / slicing, and time-sliced 3D convolutions (`enable_patch_conv`)."""
    if tiling:
        vae.enable_tiling()
    if slicing:
        vae.enable_slicing()
    if patch_conv:
        enable_patch_conv(vae)


def enable_patch_conv(vae, frames_per_slice: int = PATCH_CONV_FRAMES) -> int:
    """Run every causal 3D convolution of a HunyuanVideo VAE over slices of output frames; returns how many.

    Each slice reads its input frames plus the kernel's overlap, so results equal the unsliced
    convolution; the peak memory of one call shrinks with the number of frames it sees.
    """
    from diffusers.models.autoencoders.autoencoder_kl_hunyuan_video import HunyuanVideoCausalConv3d

    count = 0
    for module in vae.modules():
        if isinstance(module, HunyuanVideoCausalConv3d):
            if module.conv.padding[0] != 0:
                raise ValueError(
                    f"vae_enable_patch_conv: a causal convolution pads time inside its Conv3d "
                    f"(padding {module.conv.padding}); this VAE cannot be sliced, set vae_enable_patch_conv=false"
                )
            module.frames_per_slice = frames_per_slice
            module.forward = types.MethodType(_sliced_causal_conv_forward, module)
            count += 1
    return count


def _sliced_causal_conv_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """HunyuanVideoCausalConv3d.forward, computed `frames_per_slice` output frames at a time."""
    padded = F.pad(hidden_states, self.time_causal_padding, mode=self.pad_mode)
    conv = self.conv
    stride, span = conv.stride[0], (conv.kernel_size[0] - 1) * conv.dilation[0] + 1
    frames_out = (padded.shape[2] - span) // stride + 1
    if frames_out <= self.frames_per_slice:
        return conv(padded)
    slices = []
    for start in range(0, frames_out, self.frames_per_slice):
        stop = min(start + self.frames_per_slice, frames_out)
        slices.append(conv(padded[:, :, start * stride : (stop - 1) * stride + span]))
    return torch.cat(slices, dim=2)


def latent_frame_count(frames: int) -> int:
    """Latent frames of a clip of `frames` pixel frames: (frames - 1) / 4 + 1."""
    check_frame_count(frames, "frames")
    return (frames - 1) // 4 + 1
