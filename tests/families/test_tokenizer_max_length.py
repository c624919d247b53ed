"""tokenizer_max_length sets the prompt tokens the text encoders see, in training and in validation."""

import pytest
import torch

from difftune.config.schema import TrainConfig
from difftune.families.base import GenerationRequest
from difftune.families.kandinsky5_image import Kandinsky5ImageFamily
from difftune.families.sdxl import SDXLFamily

CPU = torch.device("cpu")
LONG_PROMPT = " ".join(["a small red wooden house beside a wide blue river under a cloudy sky"] * 6)


@pytest.fixture
def sdxl_components(tiny_components):
    return tiny_components("sdxl", fresh_denoiser=True)  # a hook goes on the denoiser


@pytest.mark.parametrize(("asked", "length"), [(None, 77), (16, 16), (77, 77)])
def test_sdxl_prompts_have_the_asked_length(tiny_sdxl, sdxl_components, asked, length):
    config = TrainConfig(
        model_family="sdxl", pretrained_model_name_or_path=str(tiny_sdxl), tokenizer_max_length=asked
    )
    [embeds] = SDXLFamily(config).encode_prompts(sdxl_components, [LONG_PROMPT])
    assert embeds["prompt_embeds"].shape[0] == length


def test_sdxl_validation_gives_the_unet_prompts_of_the_trained_length(tiny_sdxl, sdxl_components):
    config = TrainConfig(
        model_family="sdxl", pretrained_model_name_or_path=str(tiny_sdxl), tokenizer_max_length=16
    )
    family = SDXLFamily(config)
    pipeline = family.pipeline(sdxl_components, sdxl_components.denoiser)
    seen = []
    hook = sdxl_components.denoiser.register_forward_pre_hook(
        lambda _module, args, kwargs: seen.append(kwargs["encoder_hidden_states"].shape[1]), with_kwargs=True
    )
    try:
        request = GenerationRequest(LONG_PROMPT, 64, 64, 2, 5.0, torch.Generator().manual_seed(0), "blurry")
        images = family.generate(pipeline, request)
    finally:
        hook.remove()
    assert images[0].size == (64, 64) and seen and set(seen) == {16}


def test_sdxl_refuses_a_prompt_longer_than_clip_takes_when_the_config_loads(tmp_path):
    from difftune.config import ConfigError

    def family(length):
        return SDXLFamily(
            TrainConfig(
                model_family="sdxl", pretrained_model_name_or_path=str(tmp_path), tokenizer_max_length=length
            )
        )

    family(77).check([])
    with pytest.raises(ConfigError, match="'tokenizer_max_length' is 78, but .*at most 77 tokens; use 77"):
        family(78).check([])


@pytest.fixture(scope="module")
def k5_folder(tiny_model):
    return tiny_model("kandinsky5-image")


def _k5(folder, **overrides) -> Kandinsky5ImageFamily:
    return Kandinsky5ImageFamily(
        TrainConfig(model_family="kandinsky5-image", pretrained_model_name_or_path=str(folder), **overrides)
    )


def test_kandinsky5_qwen_prompt_follows_tokenizer_max_length(k5_folder, tiny_components):
    components = tiny_components("kandinsky5-image")
    [full] = _k5(k5_folder).encode_prompts(components, [LONG_PROMPT])
    [short] = _k5(k5_folder, tokenizer_max_length=24).encode_prompts(components, [LONG_PROMPT])
    assert full["prompt_embeds_qwen"].shape[0] > 24
    assert short["prompt_embeds_qwen"].shape[0] == 24


def test_kandinsky5_refuses_a_prompt_longer_than_its_pipelines_take_when_the_config_loads(tmp_path):
    from difftune.config import ConfigError

    _k5(tmp_path, tokenizer_max_length=1024).check([])
    with pytest.raises(
        ConfigError, match="'tokenizer_max_length' is 1025, but .*at most 1024 tokens; use 1024"
    ):
        _k5(tmp_path, tokenizer_max_length=1025).check([])
