"""SDXL family on the tiny random SDXL: loading, prompts, latents, forward, pipeline."""

import json

import pytest
import torch

from difftune.config.schema import TrainConfig
from difftune.families import family_class
from difftune.families.base import GenerationRequest
from difftune.families.objectives import EpsilonObjective
from difftune.families.sdxl import SDXLFamily

CPU = torch.device("cpu")


def make_config(model_dir, **overrides) -> TrainConfig:
    return TrainConfig(model_family="sdxl", pretrained_model_name_or_path=str(model_dir), **overrides)


@pytest.fixture(scope="module")
def loaded(tiny_sdxl, tiny_components):
    """The family and the session's components of the tiny model, loaded by `family.load`."""
    return SDXLFamily(make_config(tiny_sdxl, seed=3)), tiny_components("sdxl")


def micro_conditioning(batch_size, height=64, width=64, top=0, left=0):
    return {
        "original_sizes": torch.tensor([[height, width]] * batch_size),
        "crop_coords": [(top, left)] * batch_size,
        "target_sizes": torch.tensor([[height, width]] * batch_size),
    }


def test_clip_tokenizer_gives_the_real_clip_ids(tmp_path):
    from difftune.testing.tokenizers import clip_tokenizer

    tokenizer = clip_tokenizer(tmp_path / "tok")
    assert len(tokenizer) == 49408
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tokenizer("Hello, world!").input_ids == [49406, 3306, 267, 1002, 256, 49407]
    padded = clip_tokenizer(tmp_path / "tok2", pad_token="!")("a cat", padding="max_length", max_length=6)
    assert padded.input_ids == [49406, 320, 2368, 49407, 0, 0]
    assert (tmp_path / "tok" / "vocab.json").is_file() and (tmp_path / "tok" / "merges.txt").is_file()


def test_registry_and_tiny_model_load_small_and_frozen(tiny_sdxl, loaded):
    family, components = loaded
    assert family_class("SDXL") is SDXLFamily
    index = json.loads((tiny_sdxl / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline" and index["unet"] == [
        "diffusers",
        "UNet2DConditionModel",
    ]
    modules = [components.denoiser, components.vae, *components.text_encoders]
    total = sum(p.numel() for m in modules for p in m.parameters())
    assert 1_000_000 < total < 6_000_000
    assert family.vae_scale_factor(components) == 8
    assert components.vae.config.scaling_factor == pytest.approx(0.13025)
    assert all(not p.requires_grad for m in modules[1:] for p in m.parameters())
    assert not any(m.training for m in modules[1:])
    unet = components.denoiser.config
    pooled_dim = components.text_encoders[1].config.projection_dim
    assert unet.projection_class_embeddings_input_dim == 6 * unet.addition_time_embed_dim + pooled_dim
    scheduler = components.scheduler.config
    assert (scheduler.beta_schedule, scheduler.timestep_spacing, scheduler.steps_offset) == (
        "scaled_linear",
        "leading",
        1,
    )


def test_encode_prompts_equal_the_pipelines_encode_prompt(loaded):
    family, components = loaded
    texts = ["a red circle on a blue background", "", "a very long prompt " * 30]
    embeds = family.encode_prompts(components, texts)
    assert [sorted(e) for e in embeds] == [["pooled_prompt_embeds", "prompt_embeds"]] * 3
    assert embeds[0]["prompt_embeds"].shape == (77, 64) and embeds[0]["pooled_prompt_embeds"].shape == (32,)
    pipeline = family.pipeline(components, components.denoiser)
    prompt_embeds, _, pooled, _ = pipeline.encode_prompt(
        prompt=texts, device=CPU, num_images_per_prompt=1, do_classifier_free_guidance=False
    )
    batch = family.collate_prompts(embeds)
    assert torch.equal(batch["prompt_embeds"], prompt_embeds)
    assert torch.equal(batch["pooled_prompt_embeds"], pooled)
    assert not torch.equal(embeds[0]["prompt_embeds"], embeds[1]["prompt_embeds"])


def test_encode_and_decode_pixels_use_the_vae_factor_and_the_seed(tiny_sdxl, loaded):
    _, components = loaded
    pixels = torch.rand(2, 3, 64, 96, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latents = SDXLFamily(make_config(tiny_sdxl, seed=3)).encode_pixels(components, pixels)
    assert latents.shape == (2, 4, 8, 12)
    posterior = components.vae.encode(pixels).latent_dist
    expected = posterior.sample(generator=torch.Generator().manual_seed(3)) * 0.13025
    torch.testing.assert_close(latents, expected)
    other_seed = SDXLFamily(make_config(tiny_sdxl, seed=4)).encode_pixels(components, pixels)
    assert not torch.equal(latents, other_seed)
    assert SDXLFamily(make_config(tiny_sdxl)).decode_latents(components, latents).shape == (2, 3, 64, 96)


def test_model_forward_uses_prompts_and_micro_conditioning(loaded):
    family, components = loaded
    batch = family.collate_prompts(family.encode_prompts(components, ["a cat", "a dog"]))
    noisy = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    timesteps = torch.tensor([10, 900])
    with torch.no_grad():
        out = family.model_forward(
            components, components.denoiser, noisy, timesteps, {**batch, **micro_conditioning(2)}
        )
        cropped = family.model_forward(
            components,
            components.denoiser,
            noisy,
            timesteps,
            {**batch, **micro_conditioning(2, top=32, left=16)},
        )
    assert out.shape == noisy.shape and torch.isfinite(out).all()
    assert not torch.allclose(out, cropped)
    with pytest.raises(KeyError, match="crop_coords"):
        family.model_forward(
            components,
            components.denoiser,
            noisy,
            timesteps,
            {**batch, "original_sizes": [(64, 64)] * 2, "target_sizes": [(64, 64)] * 2},
        )
    with pytest.raises(ValueError, match="original_sizes"):
        family.model_forward(
            components,
            components.denoiser,
            noisy,
            timesteps,
            {**batch, **micro_conditioning(2), "original_sizes": [(64, 64)]},
        )


def test_model_forward_time_ids_follow_the_pipeline_order(loaded):
    family, components = loaded
    pipeline = family.pipeline(components, components.denoiser)
    expected = pipeline._get_add_time_ids(
        (96, 64), (8, 4), (64, 48), dtype=torch.float32, text_encoder_projection_dim=32
    )
    batch = {"original_sizes": [(96, 64)], "crop_coords": [(8, 4)], "target_sizes": [(64, 48)]}
    assert torch.equal(family.add_time_ids(batch, 1), expected)


def test_objective_follows_config_and_scheduler(tiny_sdxl, loaded):
    _, components = loaded
    default = SDXLFamily(make_config(tiny_sdxl)).objective(components)
    assert isinstance(default, EpsilonObjective) and default.prediction_type == "epsilon"
    assert default.loss_weights(torch.tensor([5])) is None
    v = SDXLFamily(make_config(tiny_sdxl, prediction_type="v_prediction", snr_gamma=5.0)).objective(
        components
    )
    assert v.prediction_type == "v_prediction" and v.snr_gamma == 5.0
    with pytest.raises(ValueError, match="flow_matching"):
        SDXLFamily(make_config(tiny_sdxl, prediction_type="flow_matching")).objective(components)


def test_lora_targets_exist_in_the_unet(loaded):
    family, components = loaded
    names = [n for n, _ in components.denoiser.named_modules()]
    for target in family.lora_targets():
        assert any(n.endswith("." + target) for n in names), target


def test_bf16_weights_keep_the_vae_in_fp32_and_generate_images_of_the_asked_size(tiny_sdxl):
    family = SDXLFamily(make_config(tiny_sdxl))
    components = family.load(CPU, torch.bfloat16)
    assert components.vae.dtype == torch.float32
    assert components.denoiser.dtype == torch.bfloat16 and components.text_encoders[1].dtype == torch.bfloat16
    pipeline = family.pipeline(components, components.denoiser)
    request = GenerationRequest("a red circle", 64, 128, 2, 5.0, torch.Generator().manual_seed(0), "blurry")
    images = family.generate(pipeline, request)
    assert len(images) == 1 and images[0].size == (64, 128)


def test_validate_config_rejects_off_grid_sizes():
    with pytest.raises(ValueError, match="multiples of 8"):
        SDXLFamily(TrainConfig(model_family="sdxl", validation_resolution="1020x1024")).check([])
    assert (
        SDXLFamily(TrainConfig(model_family="sdxl")).model_id() == "stabilityai/stable-diffusion-xl-base-1.0"
    )


@pytest.mark.parametrize("strategy", ["textfile", "filename", "jsonl", "instanceprompt"])
def test_image_dataset_writes_images_and_captions(tmp_path, strategy):
    from PIL import Image

    from difftune.testing.images import make_image_dataset

    paths = make_image_dataset(tmp_path, n=4, sizes=[(64, 64), (96, 64)], seed=1, caption_strategy=strategy)
    assert sorted(p.suffix for p in paths) == [".jpg", ".jpg", ".png", ".png"]
    assert sorted(Image.open(p).size for p in paths) == [(64, 64), (64, 64), (96, 64), (96, 64)]
    captions = sorted(tmp_path.glob("*.txt"))
    assert len(captions) == (4 if strategy == "textfile" else 0)
    if strategy == "textfile":
        assert all(c.read_text().startswith("a ") and " on a " in c.read_text() for c in captions)
    if strategy == "jsonl":
        records = [json.loads(line) for line in (tmp_path / "metadata.jsonl").read_text().splitlines()]
        assert sorted(r["file_name"] for r in records) == sorted(p.name for p in paths)
    if strategy == "filename":
        assert all(p.stem.startswith("a_") and "_background_" in p.stem for p in paths)
    again = make_image_dataset(
        tmp_path / "again", n=4, sizes=[(64, 64), (96, 64)], seed=1, caption_strategy=strategy
    )
    assert [p.read_bytes() for p in again] == [p.read_bytes() for p in paths]


def test_image_dataset_rejects_unknown_caption_strategy(tmp_path):
    from difftune.testing.images import make_image_dataset

    with pytest.raises(ValueError, match="textfile"):
        make_image_dataset(tmp_path, caption_strategy="parquet")
