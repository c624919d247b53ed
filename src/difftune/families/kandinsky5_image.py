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

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from difftune.errors import ConfigError
from difftune.families import kandinsky5_common as k5
from difftune.families import registry
from difftune.families.base import Components, Family, Objective
from difftune.families.flow_matching import FlowMatchingObjective
from difftune.families.vae_source import load_vae

BURNT_GUIDANCE = 7.0


def _channels_last(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, 1, H, W, C), the transformer's layout for one-frame images."""
    return latents.unsqueeze(2).permute(0, 2, 3, 4, 1)


class Kandinsky5ImageFamily(Family):
    """Kandinsky 5.0 Image Lite, text-to-image and image-to-image."""

    spec = registry.KANDINSKY5_IMAGE

    # -- identity -----------------------------------------------------------------------------
    @property
    def is_i2i(self) -> bool:
        """True for the image-to-image flavours (or a local folder whose transformer has visual_cond)."""
        if self.spec.flavour(self.config.model_flavour).kind == "i2i":
            return True
        path = Path(self.model_id()) / "transformer" / "config.json"
        if path.is_file():
            import json

            return bool(json.loads(path.read_text()).get("visual_cond", False))
        return False

    def denoiser_block_count(self) -> int | None:
        """The transformer's visual blocks, from its config.json."""
        return k5.visual_block_count(self.model_id())

    def pipeline_class(self) -> type:
        """Kandinsky5I2IPipeline for i2i flavours, else Kandinsky5T2IPipeline."""
        from diffusers import Kandinsky5I2IPipeline, Kandinsky5T2IPipeline

        return Kandinsky5I2IPipeline if self.is_i2i else Kandinsky5T2IPipeline

    # -- loading ------------------------------------------------------------------------------
    def load(self, device: torch.device, weight_dtype: torch.dtype) -> Components:
        """Load each component from its subfolder with the class named in model_index.json."""
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
            vae = load_vae(diffusers.AutoencoderKL, vae_source, torch_dtype=weight_dtype)
        else:
            vae = load_part("vae", torch_dtype=weight_dtype)
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
    def encode_prompts(
        self, components: Components, texts: list[str], images: Sequence[Any] | None = None
    ) -> list[dict[str, torch.Tensor]]:
        """Per text: {"prompt_embeds_qwen": (L, D) with L varying, "prompt_embeds_clip": (D2,)}.

        Computed by the stock pipeline's `encode_prompt`, one prompt at a time (no padding). I2I
        flavours need `images` (one PIL source image per text): their template holds the image.
        """
        if self.is_i2i and images is None:
            raise ValueError(
                f"{self.config.model_flavour or self.model_id()}: image-to-image prompt embeddings include the "
                "source image; pass images=[one conditioning image per prompt] to encode_prompts"
            )
        qwen, clip = components.text_encoders
        pipeline = k5.text_pipeline(
            self.pipeline_class(), qwen, components.tokenizers[0], clip, components.tokenizers[1]
        )
        return k5.encode_prompt_embeds(
            pipeline,
            texts,
            device=qwen.device,
            dtype=qwen.dtype,
            images=images,
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
        """(B, 3, H, W) in [-1, 1] -> (B, 16, H/8, W/8) latents times scaling_factor (as the pipelines)."""
        vae = components.vae
        posterior = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist
        latents = posterior.sample(generator=generator)
        return latents * vae.config.scaling_factor

    @torch.no_grad()
    def decode_latents(self, components: Components, latents: torch.Tensor) -> torch.Tensor:
        """(B, 16, h, w) -> (B, 3, 8h, 8w) pixels in [-1, 1] (unclamped), as the pipelines decode."""
        vae = components.vae
        return vae.decode(latents.to(device=vae.device, dtype=vae.dtype) / vae.config.scaling_factor).sample

    def decode_pipeline_latents(self, components: Components, latents: torch.Tensor) -> torch.Tensor:
        """The Kandinsky 5 pipelines sample channels-last (B, T, h, w, C + condition channels)."""
        channels = components.denoiser.config.in_visual_dim
        latents = latents[..., :channels].permute(0, 4, 1, 2, 3)  # -> (B, C, T, h, w)
        return self.decode_latents(components, latents[:, :, 0])

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
        """Velocity prediction (B, 16, h, w) for noisy latents (B, 16, h, w) and sigmas (B,).

        `batch` holds the collated prompt tensors and, for I2I, "conditioning_latents" (B, 16, h, w).
        """
        condition = batch.get("conditioning_latents")
        if self.is_i2i and condition is None:
            raise ValueError(
                "image-to-image training needs batch['conditioning_latents'] from a conditioning dataset"
            )
        num_train_timesteps = getattr(
            components.scheduler.config, "num_train_timesteps", k5.DEFAULT_NUM_TRAIN_TIMESTEPS
        )
        prediction = k5.transformer_forward(
            denoiser,
            _channels_last(noisy_latents),
            timesteps,
            batch,
            condition_bthwc=None if condition is None else _channels_last(condition.to(noisy_latents.device)),
            num_train_timesteps=num_train_timesteps,
        )
        return prediction[:, 0].permute(0, 3, 1, 2)

    def lora_targets(self) -> list[str]:
        """Attention (query, key, value, out) and feed-forward projections; modulation layers excluded."""
        return list(k5.LORA_TARGETS)

    # -- output -------------------------------------------------------------------------------
    def pipeline(self, components: Components, denoiser: torch.nn.Module):
        """The stock Kandinsky5T2IPipeline (I2I: Kandinsky5I2IPipeline) with `denoiser` as its transformer."""
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
        """Images at exactly width x height; I2I needs `image=` (a PIL image) in kwargs.

        The pipelines snap sizes outside their list of 1K resolutions to the nearest aspect ratio;
        the requested size is added to this pipeline's list so that it is used as asked.
        """
        if width % self.pixel_multiple or height % self.pixel_multiple:
            raise ValueError(
                f"validation_resolution {width}x{height}: Kandinsky 5 sizes must be multiples of {self.pixel_multiple}"
            )
        if self.is_i2i and kwargs.get("image") is None:
            raise ValueError("image-to-image validation needs a conditioning image: pass image=<PIL image>")
        if (width, height) not in pipeline.resolutions:
            pipeline.resolutions = [*pipeline.resolutions, (width, height)]
        if self.config.tokenizer_max_length is not None:  # the prompt length the model was trained with
            kwargs.setdefault("max_sequence_length", self.config.tokenizer_max_length)
        output = pipeline(
            prompt=prompt,
            negative_prompt=negative_prompt,
            width=width,
            height=height,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            generator=generator,
            **kwargs,
        )
        return list(output.image)

    def save_lora(self, output_dir: Path, lora_state_dict: dict[str, torch.Tensor]) -> Path:
        """Write pytorch_lora_weights.safetensors with "transformer." keys, via the pipeline's own saver.

        `lora_state_dict` is peft's state dict of the transformer (keys with or without "transformer.").
        """
        from diffusers import Kandinsky5T2IPipeline

        prefix = f"{self.adapter_prefix}."
        layers = {key.removeprefix(prefix): value for key, value in lora_state_dict.items()}
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        Kandinsky5T2IPipeline.save_lora_weights(
            output_dir, transformer_lora_layers=layers, transformer_lora_adapter_metadata=self.lora_metadata()
        )
        return output_dir / "pytorch_lora_weights.safetensors"

    def validate_config(self) -> list[str]:
        """Warn on guidance that burns images."""
        warnings_out = []
        if self.config.validation_guidance >= BURNT_GUIDANCE:
            warnings_out.append(
                f"validation_guidance {self.config.validation_guidance} is high for Kandinsky 5: values of "
                f"{BURNT_GUIDANCE} and above tend to give burnt (over-saturated) images; 5.0 is recommended"
            )
        return warnings_out

    def check_datasets(self, datasets: Sequence[Any]) -> None:
        """I2I flavours train on (source, target) pairs: require an enabled conditioning dataset.

        `datasets` are the DatasetConfig entries of multidatabackend.json.
        """
        if not self.is_i2i:
            return
        enabled = [d for d in datasets if not getattr(d, "disabled", False)]
        if not any(getattr(d, "dataset_type", None) == "conditioning" for d in enabled):
            raise ConfigError(
                f"model_flavour '{self.config.model_flavour}' trains image-to-image and needs a dataset with "
                '"dataset_type": "conditioning" in multidatabackend.json, linked from the image dataset by '
                '"conditioning_data": "<its id>"'
            )
