"""Stable Diffusion XL: two CLIP text encoders, a UNet with size/crop conditioning, a 4-channel VAE.

Layouts at the Family boundary: latents (B, 4, H/f, W/f) times the VAE's scaling_factor, where f is
the VAE's downsampling (8 for SDXL, read from vae.config); timesteps are integers 0..999.
Prompt embeddings per text: "prompt_embeds" (77, D1 + D2), the penultimate hidden states of both
encoders side by side (2048 for SDXL), and "pooled_prompt_embeds" (D2p,), the projected pooled
output of encoder 2 (1280 for SDXL), as StableDiffusionXLPipeline.encode_prompt computes them.

Batches for `model_forward` carry, besides the collated prompt tensors, SDXL's micro-conditioning
as (B, 2) tensors or lists of pairs: "original_sizes" (height, width) of the source image,
"crop_coords" (top, left) of the crop taken from it, "target_sizes" (height, width) trained at;
`batch_extras` makes them from the samples' geometry.

The VAE runs in fp32 (SDXL's overflows in fp16) unless a replacement VAE is given with
pretrained_vae_model_name_or_path (such as an fp16-fixed one), which runs in the weight dtype.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from difftune.errors import ConfigError
from difftune.families import registry
from difftune.families.base import (
    Components,
    Family,
    GenerationRequest,
    KohyaTextEncoder,
    Objective,
    SampleGeometry,
)
from difftune.families.objectives import Diff2FlowObjective, EpsilonObjective
from difftune.families.vae_source import load_vae

LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")
MICRO_CONDITIONING_KEYS = ("original_sizes", "crop_coords", "target_sizes")
ENCODE_CHUNK = 16  # prompts per text-encoder call
MAX_PROMPT_TOKENS = 77  # CLIP's position embeddings: the longest prompt both text encoders take


def _pairs(value: Any, key: str, batch_size: int) -> torch.Tensor:
    """A batch's (B, 2) size or crop entry as a float tensor; errors name the key."""
    pairs = torch.as_tensor(value if isinstance(value, torch.Tensor) else [list(v) for v in value])
    if pairs.shape != (batch_size, 2):
        raise ValueError(
            f"batch['{key}'] must hold one (height, width) or (top, left) pair per sample, "
            f"shape ({batch_size}, 2); got {tuple(pairs.shape)}"
        )
    return pairs.float()


class SDXLFamily(Family):
    """Stable Diffusion XL base 1.0 and models that share its layout."""

    spec = registry.SDXL
    max_prompt_tokens = MAX_PROMPT_TOKENS
    prompt_limit_owner = "SDXL's CLIP text encoders"

    def __init__(self, config, emit=None):
        super().__init__(config, emit)
        seed = config.seed if config.seed is not None else 0
        self._latent_generator = torch.Generator().manual_seed(seed)
        self._diff2flow: Diff2FlowObjective | None = None  # set by objective() with diff2flow_enabled

    # -- loading ------------------------------------------------------------------------------
    def load(self, device: torch.device, weight_dtype: torch.dtype) -> Components:
        """Each part from its subfolder of a Hub id or local folder; frozen parts in eval mode."""
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        model_id, revision = self.model_id(), self.config.revision
        part = {"revision": revision}
        unet = UNet2DConditionModel.from_pretrained(
            model_id, subfolder="unet", torch_dtype=weight_dtype, **part
        )
        vae_source = self.config.pretrained_vae_model_name_or_path
        if vae_source:
            vae = load_vae(AutoencoderKL, vae_source, torch_dtype=weight_dtype)
        else:
            vae = AutoencoderKL.from_pretrained(model_id, subfolder="vae", torch_dtype=torch.float32, **part)
        text_encoder = CLIPTextModel.from_pretrained(
            model_id, subfolder="text_encoder", dtype=weight_dtype, **part
        )
        text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(
            model_id, subfolder="text_encoder_2", dtype=weight_dtype, **part
        )
        for module in (vae, text_encoder, text_encoder_2):
            module.requires_grad_(False)
            module.to(device).eval()
        return Components(
            denoiser=unet.to(device),
            vae=vae,
            text_encoders=[text_encoder, text_encoder_2],
            tokenizers=[
                CLIPTokenizer.from_pretrained(model_id, subfolder="tokenizer", **part),
                CLIPTokenizer.from_pretrained(model_id, subfolder="tokenizer_2", **part),
            ],
            scheduler=self._load_scheduler(model_id, revision),
        )

    def _load_scheduler(self, model_id: str, revision: str | None):
        from diffusers import EulerDiscreteScheduler

        return EulerDiscreteScheduler.from_pretrained(model_id, subfolder="scheduler", revision=revision)

    # -- conditioning -------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, components: Components, texts: list[str]) -> list[dict[str, torch.Tensor]]:
        """Per text: {"prompt_embeds": (77, D1 + D2), "pooled_prompt_embeds": (D2p,)} (see module doc)."""
        results: list[dict[str, torch.Tensor]] = []
        for start in range(0, len(texts), ENCODE_CHUNK):
            prompt_embeds, pooled = self._encode_chunk(components, list(texts[start : start + ENCODE_CHUNK]))
            results += [
                {"prompt_embeds": e.clone(), "pooled_prompt_embeds": p.clone()}
                for e, p in zip(prompt_embeds, pooled)
            ]
        return results

    def _encode_chunk(self, components: Components, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return self._encode_texts(components.tokenizers, components.text_encoders, texts)

    def _prompt_tokens(self, tokenizer) -> int:
        """Token positions per prompt: tokenizer_max_length (at most 77, see `check`), else the tokenizer's."""
        asked = self.config.tokenizer_max_length
        return min(asked, tokenizer.model_max_length) if asked else tokenizer.model_max_length

    def _encode_texts(self, tokenizers, encoders, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L, D1 + D2) penultimate hidden states of both encoders and (B, D2p) pooled of encoder 2.

        L is 77, or tokenizer_max_length when that is shorter.
        """
        hidden_states, pooled = [], None
        for tokenizer, encoder in zip(tokenizers, encoders):
            input_ids = tokenizer(
                texts,
                padding="max_length",
                max_length=self._prompt_tokens(tokenizer),
                truncation=True,
                return_tensors="pt",
            ).input_ids
            output = encoder(input_ids.to(encoder.device), output_hidden_states=True)
            if output[0].ndim == 2:  # CLIPTextModelWithProjection: text_embeds come first
                pooled = output[0]
            hidden_states.append(output.hidden_states[-2])
        if pooled is None:
            raise ValueError(
                "SDXL's second text encoder must be a CLIPTextModelWithProjection (pooled output)"
            )
        dtype = encoders[-1].dtype
        return torch.cat(hidden_states, dim=-1).to(dtype), pooled.to(dtype)

    def vae_scale_factor(self, components: Components) -> int:
        """Pixels per latent along each side, from the VAE's number of levels (8 for SDXL)."""
        return 2 ** (len(components.vae.config.block_out_channels) - 1)

    @torch.no_grad()
    def encode_pixels(
        self,
        components: Components,
        pixels: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
    ) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, 4, H/f, W/f) latents * scaling_factor.

        A sample of the VAE's posterior (as SDXL training does), drawn from `generator`, else from a
        generator seeded with the config's seed.
        """
        vae = components.vae
        posterior = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist
        noise = generator if generator is not None else self._latent_generator
        return posterior.sample(generator=noise) * vae.config.scaling_factor

    @torch.no_grad()
    def decode_latents(self, components: Components, latents: torch.Tensor) -> torch.Tensor:
        """(B, 4, h, w) scaled latents -> (B, 3, f*h, f*w) pixels in [-1, 1] (unclamped)."""
        vae = components.vae
        return vae.decode(latents.to(device=vae.device, dtype=vae.dtype) / vae.config.scaling_factor).sample

    # -- training -----------------------------------------------------------------------------
    def objective(self, components: Components) -> Objective:
        """Epsilon (or the config's / scheduler's prediction type) with optional min-SNR weighting."""
        prediction_type = self.config.prediction_type or components.scheduler.config.prediction_type
        if prediction_type == "flow_matching":
            raise ConfigError(
                "prediction_type 'flow_matching' does not apply to SDXL; "
                "use epsilon or v_prediction (or leave it unset)"
            )
        if self.config.diff2flow_enabled:  # flow times at this boundary; model_forward maps them
            self._diff2flow = Diff2FlowObjective(
                components.scheduler,
                prediction_type=prediction_type,
                velocity_loss=self.config.diff2flow_loss,
            )
            return self._diff2flow
        return EpsilonObjective(
            components.scheduler,
            snr_gamma=self.config.snr_gamma,
            prediction_type=prediction_type,
            soft_min_snr=self.config.use_soft_min_snr,
        )

    def batch_extras(self, geometry: Sequence[SampleGeometry]) -> dict[str, Any]:
        """The micro-conditioning of the batch's samples (see module doc), as long tensors (B, 2)."""
        return {
            "original_sizes": torch.tensor([g.original_size for g in geometry]),
            "crop_coords": torch.tensor([g.crop_top_left for g in geometry]),
            "target_sizes": torch.tensor([g.target_size for g in geometry]),
        }

    def add_time_ids(self, batch: dict[str, Any], batch_size: int) -> torch.Tensor:
        """(B, 6): original (h, w), crop (top, left), target (h, w), the pipeline's _get_add_time_ids order."""
        missing = [key for key in MICRO_CONDITIONING_KEYS if key not in batch]
        if missing:
            raise KeyError(
                f"SDXL batches need {', '.join(MICRO_CONDITIONING_KEYS)}; missing {', '.join(missing)}"
            )
        return torch.cat([_pairs(batch[key], key, batch_size) for key in MICRO_CONDITIONING_KEYS], dim=1)

    def model_forward(
        self,
        components: Components,
        denoiser: torch.nn.Module,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        batch: dict[str, Any],
    ) -> torch.Tensor:
        """UNet prediction (B, 4, h, w) for noisy latents (B, 4, h, w) and integer timesteps (B,).

        With diff2flow_enabled the latents are flow states and the timesteps flow times (B,) in [0, 1]:
        they are mapped onto the diffusion schedule, and with diff2flow_loss the velocity is returned.
        """
        if self.config.diff2flow_enabled and self._diff2flow is None:
            self.objective(components)
        flow = self._diff2flow if self.config.diff2flow_enabled else None
        flow_times = timesteps
        if flow is not None:
            noisy_latents, timesteps = flow.model_inputs(noisy_latents, timesteps)
        device = noisy_latents.device
        dtype = next(denoiser.parameters()).dtype
        time_ids = self.add_time_ids(batch, noisy_latents.shape[0]).to(device=device, dtype=dtype)
        added = {
            "text_embeds": batch["pooled_prompt_embeds"].to(device=device, dtype=dtype),
            "time_ids": time_ids,
        }
        prediction = denoiser(
            noisy_latents.to(dtype),
            timesteps.to(device),
            encoder_hidden_states=batch["prompt_embeds"].to(device=device, dtype=dtype),
            added_cond_kwargs=added,
            return_dict=False,
        )[0]
        return prediction if flow is None else flow.model_output(prediction, noisy_latents, flow_times)

    def lora_targets(self) -> list[str]:
        """The attention projections of every transformer block (diffusers' SDXL LoRA recipe)."""
        return list(LORA_TARGETS)

    # -- output -------------------------------------------------------------------------------
    def pipeline(self, components: Components, denoiser: torch.nn.Module):
        """StableDiffusionXLPipeline with `denoiser` as its UNet and its own copy of the scheduler."""
        from diffusers import StableDiffusionXLPipeline

        scheduler = type(components.scheduler).from_config(components.scheduler.config)
        if self.config.prediction_type in ("epsilon", "v_prediction", "sample"):
            scheduler.register_to_config(prediction_type=self.config.prediction_type)
        text_encoder, text_encoder_2 = components.text_encoders
        pipeline = StableDiffusionXLPipeline(
            vae=components.vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=components.tokenizers[0],
            tokenizer_2=components.tokenizers[1],
            unet=denoiser,
            scheduler=scheduler,
        )
        pipeline.set_progress_bar_config(disable=True)
        return pipeline

    def generate(self, pipeline, request: GenerationRequest) -> list:
        """PIL images at the asked size (multiples of 8), with guidance rescale as asked.

        When the VAE's dtype differs from the latents' (fp32 VAE beside bf16 weights) the pipeline
        stops at latents and they are decoded in the VAE's dtype, as the pipeline itself does
        when it upcasts its VAE.
        """
        arguments: dict[str, Any] = dict(
            prompt=request.prompt,
            negative_prompt=request.negative_prompt or None,
            width=request.width,
            height=request.height,
            num_inference_steps=request.num_inference_steps,
            guidance_scale=request.guidance_scale,
            guidance_rescale=request.guidance_rescale,
            generator=request.generator,
        )
        if request.on_step_end is not None:
            arguments["callback_on_step_end"] = request.on_step_end
        if self._prompt_tokens(pipeline.tokenizer) < pipeline.tokenizer.model_max_length:
            # the stock pipeline always encodes 77 tokens; give it prompts encoded as in training
            arguments.update(
                self._validation_prompt_embeds(pipeline, request.prompt, request.negative_prompt)
            )
            arguments["prompt"] = arguments["negative_prompt"] = None
        if pipeline.vae.dtype == pipeline.text_encoder_2.dtype:  # the pipeline's latents take that dtype
            return list(pipeline(**arguments).images)
        latents = pipeline(output_type="latent", **arguments).images
        with torch.no_grad():
            vae = pipeline.vae
            image = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
        if pipeline.watermark is not None:
            image = pipeline.watermark.apply_watermark(image)
        return list(pipeline.image_processor.postprocess(image, output_type="pil"))

    @torch.no_grad()
    def _validation_prompt_embeds(
        self, pipeline, prompt: str, negative_prompt: str | None
    ) -> dict[str, torch.Tensor]:
        """The pipeline's prompt_embeds arguments, encoded at tokenizer_max_length as the training prompts.

        Without a negative prompt the negatives are zeros when the pipeline's
        `force_zeros_for_empty_prompt` says so (SDXL's does), else the encoded empty prompt.
        """
        tokenizers = [pipeline.tokenizer, pipeline.tokenizer_2]
        encoders = [pipeline.text_encoder, pipeline.text_encoder_2]
        embeds, pooled = self._encode_texts(tokenizers, encoders, [prompt])
        if negative_prompt or not pipeline.config.force_zeros_for_empty_prompt:
            negative, negative_pooled = self._encode_texts(tokenizers, encoders, [negative_prompt or ""])
        else:
            negative, negative_pooled = torch.zeros_like(embeds), torch.zeros_like(pooled)
        return {
            "prompt_embeds": embeds,
            "pooled_prompt_embeds": pooled,
            "negative_prompt_embeds": negative,
            "negative_pooled_prompt_embeds": negative_pooled,
        }

    def text_encoder_lora_targets(self) -> list[str]:
        """The CLIP attention projections of both text encoders, as diffusers' SDXL DreamBooth script."""
        return ["q_proj", "k_proj", "v_proj", "out_proj"]

    def kohya_text_encoders(self) -> dict[str, KohyaTextEncoder]:
        """kohya's "lora_te1" (CLIP-L) and "lora_te2" (CLIP-G), with module paths from "text_model." as in a
        CLIP checkpoint (transformers 5's CLIPTextModel leaves it out of its module names, and so of the
        saved keys, while CLIPTextModelWithProjection keeps it)."""
        return {
            "text_encoder": KohyaTextEncoder("lora_te1", "text_model."),
            "text_encoder_2": KohyaTextEncoder("lora_te2", "text_model."),
        }

    def encode_prompts_with_gradients(
        self, components: Components, texts: list[str]
    ) -> dict[str, torch.Tensor]:
        """{"prompt_embeds": (B, L, D1 + D2), "pooled_prompt_embeds": (B, D2p)}, differentiable."""
        embeds, pooled = self._encode_texts(components.tokenizers, components.text_encoders, texts)
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def save_text_encoder_lora(
        self, lora_file: Path, layers: list[dict[str, torch.Tensor]], metadata: dict[str, Any]
    ) -> None:
        """Rewrite lora_file with the UNet's layers and both encoders' ("text_encoder.", "text_encoder_2.")."""
        from diffusers import StableDiffusionXLPipeline
        from safetensors.torch import load_file

        prefix = f"{self.adapter_prefix}."
        unet = {key.removeprefix(prefix): value for key, value in load_file(str(lora_file)).items()}
        first, second = layers
        StableDiffusionXLPipeline.save_lora_weights(
            Path(lora_file).parent,
            unet_lora_layers=unet,
            text_encoder_lora_layers=first,
            text_encoder_2_lora_layers=second,
            weight_name=Path(lora_file).name,
            unet_lora_adapter_metadata=self.lora_metadata(),
            text_encoder_lora_adapter_metadata=metadata,
            text_encoder_2_lora_adapter_metadata=metadata,
        )

    def save_lora(self, output_dir: Path, lora_state_dict: dict[str, torch.Tensor]) -> Path:
        """Write pytorch_lora_weights.safetensors ("unet."-prefixed peft keys + LoraConfig metadata).

        `lora_state_dict` is peft's state dict of the UNet, keys with or without "unet.".
        """
        from diffusers import StableDiffusionXLPipeline

        prefix = f"{self.adapter_prefix}."
        layers = {
            key.removeprefix(prefix): value.detach().contiguous() for key, value in lora_state_dict.items()
        }
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        StableDiffusionXLPipeline.save_lora_weights(
            output_dir, unet_lora_layers=layers, unet_lora_adapter_metadata=self.lora_metadata()
        )
        return output_dir / "pytorch_lora_weights.safetensors"

    @property
    def validation_pixel_multiple(self) -> int:
        """The SDXL pipeline takes any multiple of 8 (the VAE factor), finer than the bucket grid."""
        return 8
