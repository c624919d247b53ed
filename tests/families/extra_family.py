"""A fourth family, written the way a new one is added: this module, its registry row and a tiny model.

Stable Diffusion 1.x: one CLIP text encoder, a UNet with cross-attention, a 4-channel VAE, epsilon
prediction. Latents (B, 4, H/8, W/8) times scaling_factor; timesteps integers 0..999; prompt tensors
per text: "prompt_embeds" (77, D), the encoder's last hidden states, as StableDiffusionPipeline.
The contract suite registers the row for its tests only.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from difftune.families.base import Components, Family, GenerationRequest, Objective
from difftune.families.objectives import EpsilonObjective
from difftune.families.registry import FamilySpec, Flavour

SPEC = FamilySpec(
    name="sd15-test",
    title="Stable Diffusion 1.5 (test family)",
    module="tests.families.extra_family:SD15Family",
    tiny_model="tests.families.extra_family:build_tiny_sd15",
    flavours={"v1-5": Flavour("stable-diffusion-v1-5/stable-diffusion-v1-5", "SD 1.5", "t2i")},
    default_flavour="v1-5",
    defaults={"validation_guidance": 7.5, "validation_resolution": "512x512"},
    pixel_multiple=64,
    adapter_prefix="unet",
)


class SD15Family(Family):
    spec = SPEC

    def load(self, device: torch.device, weight_dtype: torch.dtype) -> Components:
        from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        source = self.model_id()
        vae = AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=weight_dtype)
        text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", dtype=weight_dtype)
        for module in (vae, text_encoder):
            module.requires_grad_(False)
            module.to(device).eval()
        return Components(
            denoiser=UNet2DConditionModel.from_pretrained(source, subfolder="unet", torch_dtype=weight_dtype),
            vae=vae,
            text_encoders=[text_encoder],
            tokenizers=[CLIPTokenizer.from_pretrained(source, subfolder="tokenizer")],
            scheduler=EulerDiscreteScheduler.from_pretrained(source, subfolder="scheduler"),
        )

    @torch.no_grad()
    def encode_prompts(self, components: Components, texts: list[str]) -> list[dict[str, torch.Tensor]]:
        tokenizer, encoder = components.tokenizers[0], components.text_encoders[0]
        ids = tokenizer(
            texts,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        hidden = encoder(ids.to(encoder.device))[0]
        return [{"prompt_embeds": row.clone()} for row in hidden]

    @torch.no_grad()
    def encode_pixels(self, components: Components, pixels: torch.Tensor) -> torch.Tensor:
        vae = components.vae
        latents = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist.mode()
        return latents * vae.config.scaling_factor

    @torch.no_grad()
    def decode_latents(self, components: Components, latents: torch.Tensor) -> torch.Tensor:
        vae = components.vae
        return vae.decode(latents.to(device=vae.device, dtype=vae.dtype) / vae.config.scaling_factor).sample

    def objective(self, components: Components) -> Objective:
        return EpsilonObjective(components.scheduler)

    def model_forward(self, components, denoiser, noisy_latents, timesteps, batch) -> torch.Tensor:
        dtype = next(denoiser.parameters()).dtype
        embeds = batch["prompt_embeds"].to(device=noisy_latents.device, dtype=dtype)
        return denoiser(noisy_latents.to(dtype), timesteps, encoder_hidden_states=embeds).sample

    def lora_targets(self) -> list[str]:
        return ["to_k", "to_q", "to_v", "to_out.0"]

    def pipeline(self, components: Components, denoiser: torch.nn.Module):
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline(
            vae=components.vae,
            text_encoder=components.text_encoders[0],
            tokenizer=components.tokenizers[0],
            unet=denoiser,
            scheduler=components.scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )

    def generate(self, pipeline, request: GenerationRequest) -> list:
        return pipeline(
            prompt=request.prompt,
            negative_prompt=request.negative_prompt,
            width=request.width,
            height=request.height,
            num_inference_steps=request.num_inference_steps,
            guidance_scale=request.guidance_scale,
            guidance_rescale=request.guidance_rescale,
            generator=request.generator,
            callback_on_step_end=request.on_step_end,
        ).images

    def save_lora(self, output_dir: Path, lora_state_dict: dict[str, torch.Tensor]) -> Path:
        from diffusers import StableDiffusionPipeline

        layers = {key.removeprefix("unet."): value for key, value in lora_state_dict.items()}
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        StableDiffusionPipeline.save_lora_weights(
            output_dir, unet_lora_layers=layers, unet_lora_adapter_metadata=self.lora_metadata()
        )
        return Path(output_dir) / "pytorch_lora_weights.safetensors"


def build_tiny_sd15(path: Path, seed: int = 0) -> Path:
    """A tiny random Stable Diffusion 1.x folder: SDXL's tiny VAE and CLIP parts, a plain cross-attention UNet."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    from difftune.testing import sdxl
    from difftune.testing.tokenizers import clip_tokenizer

    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = clip_tokenizer(Path(scratch) / "tokenizer")
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=4,
        cross_attention_dim=sdxl.TEXT_HIDDEN,
        norm_num_groups=8,
    )
    torch.manual_seed(seed)
    pipeline = StableDiffusionPipeline(
        vae=sdxl.tiny_sdxl_vae(seed),
        text_encoder=CLIPTextModel(sdxl.clip_text_config()).eval(),
        tokenizer=tokenizer,
        unet=unet,
        scheduler=EulerDiscreteScheduler(**sdxl.SDXL_SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(path)
    return Path(path)
