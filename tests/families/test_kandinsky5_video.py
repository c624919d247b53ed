import re

import pytest
import torch

from difftune.config.schema import TrainConfig
from difftune.errors import ConfigError
from difftune.families import family_class
from difftune.families.base import GenerationRequest
from difftune.families.kandinsky5_video import Kandinsky5VideoFamily

PROMPTS = ["a red ball rolls", "a much longer prompt about a small brown dog running across a sunny garden"]
FRAMES, WIDTH, HEIGHT = 9, 48, 32  # 9 frames -> 3 latent frames; 48x32 -> 6x4 latents


@pytest.fixture(scope="module")
def t2v_folder(tiny_model):
    return tiny_model("kandinsky5-video")


@pytest.fixture(scope="module")
def i2v_folder(tiny_model):
    return tiny_model("kandinsky5-video", i2v=True)


def make_family(folder, **overrides) -> Kandinsky5VideoFamily:
    settings = {
        "model_family": "kandinsky5-video",
        "model_type": "lora",
        "pretrained_model_name_or_path": str(folder),
        "flow_schedule_shift": 1.0,
        "validation_guidance": 5.0,
        **overrides,
    }
    return Kandinsky5VideoFamily(TrainConfig(**settings))


@pytest.fixture(scope="module")
def loaded(t2v_folder, tiny_components):
    """The family and the session's components of the folder, loaded by `family.load`."""
    return make_family(t2v_folder), tiny_components("kandinsky5-video")


@pytest.fixture(scope="module")
def video_pixels(tmp_path_factory):
    """Two synthetic clips decoded from files: (2, 3, 9, 32, 48) in [-1, 1]."""
    from difftune.data.video import load_video_frames
    from difftune.testing.videos import make_video

    folder = tmp_path_factory.mktemp("clips")
    clips = [
        load_video_frames(
            make_video(folder / f"clip{i}.mp4", frames=FRAMES, size=(WIDTH, HEIGHT), seed=i), FRAMES
        )
        for i in range(2)
    ]
    return torch.stack(clips)


def make_batch(family, components, latents):
    batch = family.collate_prompts(family.encode_prompts(components, PROMPTS))
    batch["latents"] = latents
    return batch


def test_registry_flavours_and_defaults():
    assert family_class("kandinsky5_video") is Kandinsky5VideoFamily
    family = Kandinsky5VideoFamily(TrainConfig(model_family="kandinsky5-video"))
    assert family.model_id() == "kandinskylab/Kandinsky-5.0-T2V-Lite-sft-5s-Diffusers" and not family.is_i2v
    pro = Kandinsky5VideoFamily(
        TrainConfig(model_family="kandinsky5-video", model_flavour="t2v-pro-sft-10s-hd")
    )
    assert pro.model_id() == "kandinskylab/Kandinsky-5.0-T2V-Pro-sft-10s-Diffusers"
    i2v = Kandinsky5VideoFamily(TrainConfig(model_family="kandinsky5-video", model_flavour="i2v-pro-sft-5s"))
    assert i2v.model_id() == "kandinskylab/Kandinsky-5.0-I2V-Pro-sft-5s-Diffusers" and i2v.is_i2v
    assert Kandinsky5VideoFamily.spec.frames_per_latent == 4 and family.is_video


def test_load_from_folder(loaded):
    from diffusers import AutoencoderKLHunyuanVideo, Kandinsky5Transformer3DModel

    family, components = loaded
    assert isinstance(components.denoiser, Kandinsky5Transformer3DModel)
    vae = components.vae
    assert isinstance(vae, AutoencoderKLHunyuanVideo)
    assert not any(p.requires_grad for p in vae.parameters())
    assert [type(t).__name__ for t in components.text_encoders] == [
        "Qwen2_5_VLForConditionalGeneration",
        "CLIPTextModel",
    ]


def test_encode_pixels_compresses_time_4x(loaded, video_pixels):
    family, components = loaded
    torch.manual_seed(0)
    latents = family.encode_pixels(components, video_pixels)
    assert latents.shape == (2, 16, (FRAMES - 1) // 4 + 1, HEIGHT // 8, WIDTH // 8)
    torch.manual_seed(0)
    raw = components.vae.encode(video_pixels).latent_dist.sample()
    # two calls of the 3D VAE may sum its convolutions in another order when several threads share
    # them (oneDNN picks its blocking per call): a few float32 ulps of sums over ~10^3 terms
    torch.testing.assert_close(latents, raw * components.vae.config.scaling_factor, rtol=1e-4, atol=1e-4)
    decoded = family.decode_latents(components, latents)
    assert decoded.shape == video_pixels.shape
    torch.testing.assert_close(decoded, components.vae.decode(raw).sample, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="8 frames cannot be encoded.*use 5 or 9"):
        family.encode_pixels(components, video_pixels[:, :, :8])
    assert family.encode_condition(components, video_pixels).shape == (2, 16, 1, 4, 6)


def test_chunked_conv3d_gives_the_video_vae_the_same_latents_and_frames():
    from difftune.testing.kandinsky5_video import tiny_hunyuan_video_vae
    from difftune.training.memory import patch_conv3d

    vae = tiny_hunyuan_video_vae(seed=3)
    pixels = torch.rand(1, 3, 13, 16, 16) * 2 - 1
    with torch.no_grad():
        before = vae.encode(pixels).latent_dist.mode()
        decoded_before = vae.decode(before).sample
        assert patch_conv3d(vae, chunk_frames=2) > 10
        after = vae.encode(pixels).latent_dist.mode()
        decoded_after = vae.decode(before).sample
    # Chunks change only the order of fp32 sums inside each convolution (eps 1.2e-7 per add, a few
    # hundred adds per output, compounded through the VAE's layers).
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(decoded_after, decoded_before, atol=3e-4, rtol=1e-4)


def test_model_forward_matches_pipeline_style_calls(loaded):
    family, components = loaded
    latents = torch.randn(2, 16, 3, 4, 6, generator=torch.Generator().manual_seed(0))
    batch = make_batch(family, components, latents)
    sigmas = torch.tensor([0.3, 0.8])
    noisy = family.objective(components).add_noise(latents, torch.randn_like(latents), sigmas)
    with torch.no_grad():
        prediction = family.model_forward(components, components.denoiser, noisy, sigmas, batch)
    assert prediction.shape == latents.shape
    assert family.loss_mask(batch, latents) is None
    cu = batch["prompt_cu_seqlens"]
    for i in range(2):
        length = int(cu[i + 1] - cu[i])
        with torch.no_grad():
            single = components.denoiser(
                hidden_states=noisy[i : i + 1].permute(0, 2, 3, 4, 1),
                encoder_hidden_states=batch["prompt_embeds_qwen"][i : i + 1, :length],
                pooled_projections=batch["prompt_embeds_clip"][i : i + 1],
                timestep=sigmas[i : i + 1] * 1000,
                visual_rope_pos=[torch.arange(3), torch.arange(2), torch.arange(3)],
                text_rope_pos=torch.arange(length),
                scale_factor=(1, 3.16, 3.16),  # the pipelines' RoPE scale below 480p
                sparse_params=None,
            ).sample
        torch.testing.assert_close(prediction[i], single[0].permute(3, 0, 1, 2))


def add_lora(family, transformer):
    """The trainer's LoRA (family.config's lora_rank / lora_alpha) on the transformer; its parameters."""
    from difftune.training.adapters import attach_lora

    attach_lora(transformer, family, family.config)
    return [p for n, p in transformer.named_parameters() if "lora_" in n]


def test_t2v_lora_trains_and_loads_in_stock_pipeline(t2v_folder, tiny_components, video_pixels, tmp_path):
    """lora_alpha != lora_rank: the stock pipeline must scale the loaded adapter as the trainer did."""
    from diffusers import Kandinsky5T2VPipeline
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file

    family = make_family(t2v_folder, lora_rank=4, lora_alpha=16)
    components = tiny_components("kandinsky5-video", fresh_denoiser=True)
    transformer = components.denoiser
    transformer.requires_grad_(False)
    optimizer = torch.optim.AdamW(add_lora(family, transformer), lr=1e-2)
    torch.manual_seed(0)
    latents = family.encode_pixels(components, video_pixels)
    batch = make_batch(family, components, latents)
    objective = family.objective(components)
    gen = torch.Generator().manual_seed(2)
    noise = torch.randn(latents.shape, generator=gen)
    sigmas = torch.tensor([0.5, 0.7])
    losses = []
    for _ in range(5):
        noisy = objective.add_noise(latents, noise, sigmas)
        loss = torch.nn.functional.mse_loss(
            family.model_forward(components, transformer, noisy, sigmas, batch),
            objective.target(latents, noise, sigmas),
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]

    path = family.save_lora(tmp_path / "lora", get_peft_model_state_dict(transformer))
    assert path.name == "pytorch_lora_weights.safetensors"
    assert all(key.startswith("transformer.") for key in load_file(path))
    stock = Kandinsky5T2VPipeline.from_pretrained(t2v_folder)
    noisy = objective.add_noise(latents, noise, torch.tensor([0.4, 0.6]))
    with torch.no_grad():
        before = family.model_forward(components, stock.transformer, noisy, torch.tensor([0.4, 0.6]), batch)
        stock.load_lora_weights(tmp_path / "lora")
        trained = family.model_forward(components, transformer, noisy, torch.tensor([0.4, 0.6]), batch)
        reloaded = family.model_forward(components, stock.transformer, noisy, torch.tensor([0.4, 0.6]), batch)
    torch.testing.assert_close(reloaded, trained)
    assert (before - trained).abs().max() > 1e-3


def test_i2v_conditions_on_the_first_frame_and_masks_it(i2v_folder, tiny_components, video_pixels):
    family = make_family(i2v_folder)
    assert family.is_i2v
    components = tiny_components("kandinsky5-video", fresh_denoiser=True, i2v=True)  # gets gradients
    transformer = components.denoiser
    latents = family.encode_pixels(components, video_pixels)
    batch = make_batch(family, components, latents)
    batch["conditioning_latents"] = family.encode_condition(components, video_pixels)
    sigmas = torch.tensor([0.5, 0.5])
    noisy = family.objective(components).add_noise(latents, torch.randn_like(latents), sigmas)

    # The noisy first frame is replaced by the condition, as the I2V pipeline does.
    with torch.no_grad():
        prediction = family.model_forward(components, transformer, noisy, sigmas, batch)
        scrambled = noisy.clone()
        scrambled[:, :, 0] = torch.randn_like(scrambled[:, :, 0])
        same = family.model_forward(components, transformer, scrambled, sigmas, batch)
        other = family.model_forward(
            components,
            transformer,
            noisy,
            sigmas,
            {**batch, "conditioning_latents": torch.zeros(2, 16, 1, 4, 6)},
        )
    torch.testing.assert_close(same, prediction)
    assert (other - prediction).abs().max() > 1e-4
    # Built as the pipeline builds it: [latents with clean frame 0, zero condition, mask on frame 0].
    hidden = noisy.permute(0, 2, 3, 4, 1).clone()
    hidden[:, :1] = batch["conditioning_latents"].permute(0, 2, 3, 4, 1)
    mask = torch.zeros(*hidden.shape[:-1], 1)
    mask[:, 0] = 1
    hidden = torch.cat([hidden, torch.zeros_like(hidden), mask], dim=-1)
    length = int(batch["prompt_cu_seqlens"][1])
    with torch.no_grad():
        direct = transformer(
            hidden_states=hidden[:1],
            encoder_hidden_states=batch["prompt_embeds_qwen"][:1, :length],
            pooled_projections=batch["prompt_embeds_clip"][:1],
            timestep=sigmas[:1] * 1000,
            visual_rope_pos=[torch.arange(3), torch.arange(2), torch.arange(3)],
            text_rope_pos=torch.arange(length),
            scale_factor=(1, 3.16, 3.16),
        ).sample
    torch.testing.assert_close(prediction[0], direct[0].permute(3, 0, 1, 2))

    # The masked first frame contributes nothing to the gradient.
    from difftune.training.losses import per_sample_loss

    mask = family.loss_mask(batch, latents)
    assert mask.shape == (2, 1, 3, 1, 1) and mask[:, :, 0].sum() == 0 and mask[:, :, 1:].min() == 1
    prediction = family.model_forward(components, transformer, noisy, sigmas, batch)
    prediction.retain_grad()
    per_sample_loss(prediction, torch.randn_like(prediction), mask).mean().backward()
    assert prediction.grad[:, :, 0].abs().max() == 0
    assert prediction.grad[:, :, 1:].abs().min() > 0


def test_i2v_without_conditioning_latents_uses_the_first_latent_frame(i2v_folder, tiny_components):
    events = []
    family = Kandinsky5VideoFamily(make_family(i2v_folder).config, lambda kind, data: events.append(data))
    components = tiny_components("kandinsky5-video", i2v=True)
    latents = torch.randn(2, 16, 3, 4, 6)
    batch = make_batch(family, components, latents)
    sigmas = torch.tensor([0.5, 0.5])
    with torch.no_grad():
        fallback = family.model_forward(
            components, components.denoiser, torch.randn_like(latents), sigmas, batch
        )
        noisy = torch.randn_like(latents)
        explicit = family.model_forward(
            components,
            components.denoiser,
            noisy,
            sigmas,
            {**batch, "conditioning_latents": latents[:, :, :1]},
        )
        again = family.model_forward(components, components.denoiser, noisy, sigmas, batch)
    assert fallback.shape == latents.shape
    torch.testing.assert_close(again, explicit)
    assert sum("conditioning_latents" in e["message"] for e in events) == 1
    del batch["latents"]
    with pytest.raises(ValueError, match="conditioning_latents"):
        family.model_forward(components, components.denoiser, noisy, sigmas, batch)


def test_check_i2v_frame_counts_and_guidance(t2v_folder):
    assert make_family(t2v_folder, validation_num_video_frames=61).check([]) == []
    high = make_family(t2v_folder, validation_guidance=7.0).check([])
    assert len(high) == 1 and "validation_guidance 7.0 is high" in high[0] and "black or noisy" in high[0]
    low = make_family(t2v_folder, validation_guidance=1.5).check([])
    assert len(low) == 1 and "validation_guidance 1.5 is low" in low[0]
    with pytest.raises(ValueError, match="'validation_num_video_frames' is 9, too short for image-to-video"):
        Kandinsky5VideoFamily(
            TrainConfig(
                model_family="kandinsky5-video", model_flavour="i2v-lite-5s", validation_num_video_frames=9
            )
        ).check([])


def test_generate_and_save_validation_writes_an_mp4(loaded, tmp_path):
    from difftune.data.video import probe_video

    family, components = loaded
    pipeline = family.pipeline(components, components.denoiser)
    request = GenerationRequest(
        prompt="a red ball rolls",
        negative_prompt="static",
        width=WIDTH,
        height=HEIGHT,
        num_inference_steps=2,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(0),
        num_frames=5,
    )
    video = family.generate(pipeline, request)
    assert len(video) == 1 and len(video[0]) == 5 and video[0][0].size == (WIDTH, HEIGHT)
    (tmp_path / "validation").mkdir()
    path = family.save_sample(video, tmp_path / "validation" / "red-ball")
    assert path.suffix == ".mp4"
    info = probe_video(path)
    assert (info.width, info.height, info.num_frames) == (WIDTH, HEIGHT, 5)
    assert info.fps == pytest.approx(24)
    with pytest.raises(ValueError, match="num_frames 6: .*use 5 or 9"):
        family.generate(
            pipeline, GenerationRequest("x", WIDTH, HEIGHT, 1, 1.0, torch.Generator(), num_frames=6)
        )


def test_i2v_generate_without_an_image_makes_its_own_first_frame(i2v_folder, tiny_components):
    import numpy as np
    from PIL import Image

    family = make_family(i2v_folder, validation_num_video_frames=17)
    components = tiny_components("kandinsky5-video", i2v=True)
    pipeline = family.pipeline(components, components.denoiser)
    settings = dict(
        prompt="a dog runs", width=WIDTH, height=HEIGHT, num_inference_steps=2, guidance_scale=1.0
    )
    video = family.generate(
        pipeline, GenerationRequest(generator=torch.Generator().manual_seed(0), **settings)
    )
    assert len(video[0]) == 17 and video[0][0].size == (WIDTH, HEIGHT)
    assert np.asarray(video[0][-1]).std() > 0  # real pixels, not NaN cast to black
    red = Image.new("RGB", (WIDTH, HEIGHT), (250, 10, 10))
    request = GenerationRequest(generator=torch.Generator().manual_seed(0), image=red, **settings)
    given = family.generate(pipeline, request)
    assert len(given[0]) == 17
    with pytest.raises(
        ValueError, match="validation_num_video_frames=5: Kandinsky5I2VPipeline needs at least 17"
    ):
        family.generate(
            pipeline, GenerationRequest(generator=torch.Generator(), image=red, num_frames=5, **settings)
        )


def test_i2v_folder_refuses_image_datasets_before_training(i2v_folder):
    from difftune.config.schema import DatasetConfig

    family = make_family(i2v_folder)  # the default t2v flavour, but an I2V pipeline folder
    stills = DatasetConfig(id="stills", dataset_type="image", instance_data_dir="i")
    refusal = f"dataset 'stills' is an image dataset, but the model '{re.escape(str(i2v_folder))}'"
    with pytest.raises(ConfigError, match=refusal):
        family.check([stills])
    make_family(i2v_folder, model_flavour="t2v-lite-sft-5s", pretrained_model_name_or_path=None).check(
        [stills]
    )
