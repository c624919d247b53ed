import pytest
import torch
from PIL import Image

from difftune.testing.tokenizers import clip_tokenizer
from difftune.validation.previews import preview_callback, save_preview


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory):
    """A tiny random StableDiffusionXLPipeline (64 px images, 8 px latents)."""
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=80,
        cross_attention_dim=64,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        block_out_channels=(16, 32, 32, 32),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
    )
    text_config = CLIPTextConfig(
        bos_token_id=0,
        eos_token_id=2,
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=49408,
        projection_dim=32,
        hidden_act="gelu",
    )
    tokenizer_dir = tmp_path_factory.mktemp("clip-tokenizer")
    tokenizer = clip_tokenizer(tokenizer_dir)
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=CLIPTextModel(text_config),
        text_encoder_2=CLIPTextModelWithProjection(text_config),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=EulerDiscreteScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            timestep_spacing="leading",
            steps_offset=1,
        ),
    )


def _vae_decode(pipeline):
    def decode(latents: torch.Tensor) -> torch.Tensor:
        return pipeline.vae.decode(latents / pipeline.vae.config.scaling_factor).sample

    return decode


def test_previews_fire_every_n_inference_steps(tiny_sdxl, tmp_path):
    events = []
    callback = preview_callback(
        tiny_sdxl,
        _vae_decode(tiny_sdxl),
        5,
        lambda t, d: events.append((t, d)),
        out_dir=tmp_path / "previews",
        step=300,
        name="cat",
    )
    tiny_sdxl(
        prompt="a cat",
        num_inference_steps=20,
        height=64,
        width=64,
        guidance_scale=1.0,
        generator=torch.Generator().manual_seed(0),
        output_type="pil",
        callback_on_step_end=callback,
    )
    assert [t for t, _ in events] == ["validation_preview"] * 4
    assert [d["inference_step"] for _, d in events] == [5, 10, 15, 20]
    assert [d["preview_index"] for _, d in events] == [1, 2, 3, 4]
    assert {d["step"] for _, d in events} == {300}
    paths = [d["path"] for _, d in events]
    assert paths == [str(tmp_path / "previews" / f"cat_{i:03d}.png") for i in (5, 10, 15, 20)]
    pixels = []
    for path in paths:
        with Image.open(path) as image:
            assert image.size == (64, 64)
            pixels.append(image.tobytes())
    assert len(set(pixels)) == 4  # each preview shows a different stage of the denoising


def test_save_preview_takes_the_first_frame_and_maps_the_range(tmp_path):
    video = torch.full((1, 3, 2, 4, 4), -1.0)
    video[:, :, 0] = 1.0  # first frame white, second black
    with Image.open(save_preview(video, tmp_path / "frame.png")) as image:
        assert image.getpixel((0, 0)) == (255, 255, 255)
    with pytest.raises(ValueError, match="validation_preview_steps must be >= 1"):
        preview_callback(None, lambda x: x, 0, print, out_dir=tmp_path)
