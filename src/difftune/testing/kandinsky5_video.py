"""A tiny random Kandinsky 5.0 Video model saved as a diffusers folder (about 7M parameters).

The folder loads with `Kandinsky5T2VPipeline.from_pretrained` (or `Kandinsky5I2VPipeline` when built
with `i2v=True`) and with `Kandinsky5VideoFamily.load`. The text encoders and tokenizers are those of
the tiny image model (`difftune.testing.kandinsky5`), and so is the transformer (2 visual blocks,
patch (1, 2, 2), visual_cond for I2V); the VAE is a small `AutoencoderKLHunyuanVideo`
with the real compression: 4x in time (clips of T frames, (T - 1) % 4 == 0, give (T - 1) / 4 + 1
latent frames) and 8x in space, 16 latent channels.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from difftune.families.registry import KANDINSKY5_VIDEO
from difftune.testing.kandinsky5 import (
    LATENT_CHANNELS,
    name_tokenizer_class,
    save_without_tokenizer,
    tiny_clip_text_model,
    tiny_kandinsky5_transformer,
    tiny_qwen25_vl,
)

# The real HunyuanVideo VAE's scaling factor (what the pipelines multiply latents by).
HUNYUAN_VAE_SCALING_FACTOR = 0.476986


def tiny_hunyuan_video_vae(seed: int = 0):
    """An `AutoencoderKLHunyuanVideo` with 4x temporal and 8x spatial compression and 16 latent channels."""
    from diffusers import AutoencoderKLHunyuanVideo

    from difftune.testing.vae import make_colour_vae

    torch.manual_seed(seed)
    vae = AutoencoderKLHunyuanVideo(
        in_channels=3,
        out_channels=3,
        latent_channels=LATENT_CHANNELS,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        norm_num_groups=1,  # one group: see difftune.testing.vae
        scaling_factor=HUNYUAN_VAE_SCALING_FACTOR,
        spatial_compression_ratio=8,
        temporal_compression_ratio=KANDINSKY5_VIDEO.frames_per_latent,  # what the family row says
        mid_block_add_attention=True,
    )
    return make_colour_vae(vae, seed).eval()


def build_tiny_kandinsky5_video(path: str | Path, seed: int = 0, i2v: bool = False) -> Path:
    """Save a tiny random Kandinsky 5.0 Video pipeline folder under `path`; returns the folder.

    T2V folders load with `Kandinsky5T2VPipeline`, `i2v=True` folders (transformer with visual_cond)
    with `Kandinsky5I2VPipeline`. The Qwen tokenizer is a plain `Qwen2Tokenizer` (the Hub folders
    hold a `Qwen2VLProcessor`, whose loading needs torchvision).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, Kandinsky5I2VPipeline, Kandinsky5T2VPipeline

    from difftune.testing.qwen import write_qwen2_tokenizer_files
    from difftune.testing.tokenizers import clip_tokenizer, write_clip_tokenizer_files

    path = Path(path)
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer_2 = clip_tokenizer(Path(scratch))
    pipeline_cls = Kandinsky5I2VPipeline if i2v else Kandinsky5T2VPipeline
    pipeline = pipeline_cls(
        transformer=tiny_kandinsky5_transformer(seed, i2i=i2v),
        vae=tiny_hunyuan_video_vae(seed),
        text_encoder=tiny_qwen25_vl(seed),
        tokenizer=None,  # written below, in the form that loads fast (see difftune.testing.qwen)
        text_encoder_2=tiny_clip_text_model(seed),
        tokenizer_2=tokenizer_2,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0),
    )
    save_without_tokenizer(pipeline, path)
    write_qwen2_tokenizer_files(path / "tokenizer")
    write_clip_tokenizer_files(path / "tokenizer_2")  # in place of its tokenizer.json: faster to load
    name_tokenizer_class(path, "Qwen2Tokenizer")
    return path
