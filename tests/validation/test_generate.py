"""run_validation on the tiny SDXL: files per prompt and size, events, the denoiser left as it was."""

import json

import pytest
import torch
from PIL import Image

from difftune.config import ConfigError
from difftune.config.schema import TrainConfig
from difftune.families import family_class, registry
from difftune.families.sdxl import SDXLFamily
from difftune.training.adapters import attach_lora
from difftune.validation.generate import file_stem, run_validation


def test_every_prompt_at_every_size_and_the_denoiser_unchanged(tiny_sdxl, tiny_components, tmp_path):
    library = tmp_path / "library.json"
    library.write_text(json.dumps({"blue square": "a blue square"}))
    config = TrainConfig(
        model_family="sdxl",
        pretrained_model_name_or_path=str(tiny_sdxl),
        validation_prompt="a red circle",
        user_prompt_library=str(library),
        validation_resolution="64x64,96x64",
        validation_num_inference_steps=2,
        validation_guidance=3.0,
        lora_rank=2,
        seed=5,
    )
    family = SDXLFamily(config)
    components = tiny_components("sdxl", fresh_denoiser=True)
    unet = components.denoiser.requires_grad_(False)
    attach_lora(unet, family, config)
    unet.train()
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    trainable = {n for n, p in unet.named_parameters() if p.requires_grad}
    events = []
    torch.manual_seed(11)
    paths = run_validation(
        family, components, unet, config, 7, tmp_path / "out", lambda kind, data: events.append((kind, data))
    )
    rng_after = torch.rand(1)
    torch.manual_seed(11)
    assert torch.equal(rng_after, torch.rand(1))  # global RNG untouched

    folder = tmp_path / "out" / "validation" / "7"
    expected = [
        "validation-64x64.png",
        "validation-96x64.png",
        "blue_square-64x64.png",
        "blue_square-96x64.png",
    ]
    assert [p.name for p in paths] == expected and all(p.parent == folder for p in paths)
    assert [Image.open(p).size for p in paths] == [(64, 64), (96, 64)] * 2
    assert events == [
        ("validation_start", {"step": 7, "prompts": 2, "message": "validating at step 7"}),
        ("validation", {"step": 7, "paths": [str(p) for p in paths]}),
    ]

    assert unet.training and not components.vae.training
    assert {n for n, p in unet.named_parameters() if p.requires_grad} == trainable
    assert all(torch.equal(before[k], v) for k, v in unet.state_dict().items())

    again = run_validation(family, components, unet, config, 8, tmp_path / "out", lambda *_: None)
    first, second = Image.open(paths[0]), Image.open(again[0])
    assert list(first.getdata()) == list(second.getdata())  # same seed -> same image at every step


def test_more_images_per_prompt_get_numbered_files(tiny_sdxl, tiny_components, tmp_path):
    config = TrainConfig(
        model_family="sdxl",
        pretrained_model_name_or_path=str(tiny_sdxl),
        validation_prompt="a cat",
        validation_resolution="64x64",
        validation_num_inference_steps=1,
        num_validation_images=2,
    )
    family = SDXLFamily(config)
    components = tiny_components("sdxl", fresh_denoiser=True)
    paths = run_validation(family, components, components.denoiser, config, 1, tmp_path, lambda *_: None)
    assert [p.name for p in paths] == ["validation-64x64-0.png", "validation-64x64-1.png"]
    assert list(Image.open(paths[0]).getdata()) != list(Image.open(paths[1]).getdata())


def test_file_stem_makes_names_safe():
    assert file_stem("my prompt/1") == "my_prompt_1"
    assert file_stem("../..") == "prompt"


def test_previews_of_each_prompt_and_size_get_their_own_files(tiny_sdxl, tiny_components, tmp_path):
    config = TrainConfig(
        model_family="sdxl",
        pretrained_model_name_or_path=str(tiny_sdxl),
        validation_prompt="a red circle",
        validation_resolution="64x64,96x64",
        validation_num_inference_steps=2,
        validation_preview=True,
        validation_preview_steps=1,
        lora_rank=2,
    )
    family = SDXLFamily(config)
    components = tiny_components("sdxl", fresh_denoiser=True)
    events = []
    run_validation(
        family, components, components.denoiser, config, 3, tmp_path, lambda k, d: events.append((k, d))
    )
    previews = [d["path"] for k, d in events if k == "validation_preview"]
    folder = tmp_path / "validation" / "3" / "previews"
    assert sorted(p.name for p in folder.iterdir()) == [
        "validation-64x64_001.png",
        "validation-64x64_002.png",
        "validation-96x64_001.png",
        "validation-96x64_002.png",
    ]
    assert len(set(previews)) == 4
    assert Image.open(folder / "validation-96x64_002.png").size == (96, 64)


# Every validation setting at a value other than its default; the family's pipeline must honour each
# one, or the family refuses it when the config loads.
NON_DEFAULT_VALIDATION = {
    "validation_prompt": "a red circle",
    "validation_negative_prompt": "a green square",
    "validation_resolution": "64x64,32x64",
    "validation_guidance": 3.0,
    "validation_guidance_rescale": 0.7,
    "validation_num_inference_steps": 2,
    "validation_seed": 3,
    "validation_num_video_frames": 5,
    "validation_preview": True,
    "validation_preview_steps": 2,
    "num_validation_images": 2,
    "framerate": 8,
}


@pytest.mark.parametrize("name", list(registry.FAMILIES))
def test_every_validation_setting_is_honoured_or_refused_by_each_family(
    name, tiny_model, tiny_components, tmp_path
):
    from difftune.data.video import probe_video

    settings = dict(model_family=name, pretrained_model_name_or_path=str(tiny_model(name)), seed=1)
    family = family_class(name)(TrainConfig(**settings, **NON_DEFAULT_VALIDATION))
    refused = family.validation_settings_refused()
    if refused:
        with pytest.raises(ConfigError) as error:
            family.check([])
        assert all(f"'{key}'" in str(error.value) for key in refused)
    honoured = {key: value for key, value in NON_DEFAULT_VALIDATION.items() if key not in refused}
    config = TrainConfig(**settings, **honoured)
    family = family_class(name)(config)
    assert family.check([]) is not None
    components = tiny_components(name, fresh_denoiser=True)
    events = []
    paths = run_validation(
        family, components, components.denoiser, config, 1, tmp_path, lambda kind, data: events.append(data)
    )
    assert [p.stem for p in paths] == [
        f"validation-{size}-{index}" for size in ("64x64", "32x64") for index in (0, 1)
    ]
    previews = [e for e in events if "inference_step" in e]
    assert [e["inference_step"] for e in previews] == [2] * 4  # every 2nd of 2 steps, for each sample
    if family.is_video:
        infos = [probe_video(p) for p in paths]
        assert [(i.width, i.height, i.num_frames) for i in infos] == [(64, 64, 5)] * 2 + [(32, 64, 5)] * 2
        assert infos[0].fps == pytest.approx(8)
    else:
        assert [Image.open(p).size for p in paths] == [(64, 64)] * 2 + [(32, 64)] * 2
