"""A tiny random Stable Diffusion XL, saved as a diffusers folder that loads like the real one.

Same component classes and wiring as `stabilityai/stable-diffusion-xl-base-1.0`, a few million
parameters: two CLIP text encoders (hidden 32) with CLIP's real tokenizer, a two-level UNet with
SDXL's "text_time" added conditioning, an AutoencoderKL with 4 latent channels and the real 8x
downsampling, and SDXL's EulerDiscreteScheduler settings.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

TEXT_HIDDEN = 32  # each encoder; the UNet sees both concatenated (cross_attention_dim 64)
POOLED_DIM = 32  # text_encoder_2 projection_dim
TIME_EMBED_DIM = 8  # addition_time_embed_dim; six size/crop numbers each
LATENT_CHANNELS = 4
VAE_SCALING_FACTOR = 0.13025

# SDXL base-1.0 scheduler/scheduler_config.json
SDXL_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "interpolation_type": "linear",
    "use_karras_sigmas": False,
    "steps_offset": 1,
    "timestep_spacing": "leading",
}


def tiny_sdxl_unet(seed: int = 0):
    """`UNet2DConditionModel` with SDXL's added conditioning: (B, 4, h, w) -> (B, 4, h, w), h and w even."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=32,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        transformer_layers_per_block=(1, 1),
        use_linear_projection=True,
        cross_attention_dim=2 * TEXT_HIDDEN,
        norm_num_groups=8,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=6 * TIME_EMBED_DIM + POOLED_DIM,
    )


def tiny_sdxl_vae(seed: int = 0):
    """`AutoencoderKL` with 4 latent channels, 8x downsampling (4 levels) and SDXL's scaling factor."""
    from diffusers import AutoencoderKL

    from difftune.testing.vae import make_colour_vae

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=1,  # one group: see difftune.testing.vae
        sample_size=64,
        scaling_factor=VAE_SCALING_FACTOR,
    )
    return make_colour_vae(vae, seed)


def clip_text_config(**extra):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=TEXT_HIDDEN,
        intermediate_size=37,
        num_hidden_layers=3,  # SDXL reads the penultimate layer
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="gelu",
        # the ids SDXL base's configs carry; eos 2 makes CLIP pool at the argmax id (49407), as there
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
        **extra,
    )


def tiny_sdxl_text_encoders(seed: int = 0):
    """(`CLIPTextModel`, `CLIPTextModelWithProjection`), hidden size 32, CLIP's 49408-token vocabulary."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    first = CLIPTextModel(clip_text_config())
    torch.manual_seed(seed + 1)
    second = CLIPTextModelWithProjection(clip_text_config(projection_dim=POOLED_DIM))
    return first.eval(), second.eval()


def build_tiny_sdxl(path: Path, seed: int = 0) -> Path:
    """Save a tiny random SDXL pipeline folder (model_index.json and subfolders) at `path`; returns it.

    Random weights come from `seed` alone, so two calls with one seed write equal weights.
    """
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    from difftune.testing.tokenizers import clip_tokenizer, write_clip_tokenizer_files

    path = Path(path)
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = clip_tokenizer(Path(scratch) / "tokenizer")
        tokenizer_2 = clip_tokenizer(Path(scratch) / "tokenizer_2", pad_token="!")  # as SDXL base
    text_encoder, text_encoder_2 = tiny_sdxl_text_encoders(seed)
    pipeline = StableDiffusionXLPipeline(
        vae=tiny_sdxl_vae(seed),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=tiny_sdxl_unet(seed),
        scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER_CONFIG),
    )
    pipeline.save_pretrained(path)
    write_clip_tokenizer_files(path / "tokenizer")  # in place of the tokenizer.json files: faster to load
    write_clip_tokenizer_files(path / "tokenizer_2", pad_token="!")
    return path
