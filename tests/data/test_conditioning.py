from pathlib import Path

import pytest
import torch

from difftune.config.schema import DatasetConfig, TrainConfig
from difftune.data.conditioning import pair_conditioning, prompt_key
from difftune.data.discovery import discover
from difftune.data.errors import DataError
from difftune.data.pipeline import prepare_training_data
from difftune.testing.videos import make_video
from tests.data.fakes import FakeFamily, fake_components, save_image
from tests.data.video_fakes import FakeI2IFamily, FakeVideoFamily

TARGET = (250, 0, 0)
SOURCE = (0, 0, 250)


def _pairs(tmp_path: Path, names=("a", "b", "c", "d"), missing=("d",), source_size=(64, 48)) -> None:
    """Red 64x48 targets with captions; blue sources of the same names (PNG or JPEG), some missing."""
    for index, name in enumerate(names):
        save_image(tmp_path / "targets" / f"{name}.png", (64, 48), TARGET)
        (tmp_path / "targets" / f"{name}.txt").write_text(f"make {name} red")
        if name not in missing:
            extension = ".jpg" if index % 2 else ".png"
            save_image(tmp_path / "sources" / f"{name}{extension}", source_size, SOURCE)


def _datasets(tmp_path: Path, **target) -> list[DatasetConfig]:
    return [
        DatasetConfig(
            **{
                "id": "targets",
                "instance_data_dir": str(tmp_path / "targets"),
                "caption_strategy": "textfile",
                "resolution": 32,
                "resolution_type": "pixel",
                "crop": True,
                "crop_style": "random",
                "cache_dir_vae": str(tmp_path / "vae" / "targets"),
                "conditioning_data": "sources",
                **target,
            }
        ),
        DatasetConfig(
            id="sources",
            dataset_type="conditioning",
            instance_data_dir=str(tmp_path / "sources"),
            cache_dir_vae=str(tmp_path / "vae" / "sources"),
        ),
    ]


def _prepare(tmp_path, datasets, family=None, events=None, **train):
    config = TrainConfig(model_family="fake", **{"train_batch_size": 2, "seed": 3, **train})
    family = family or FakeFamily(config)
    sink = events if events is not None else []
    data = prepare_training_data(
        config,
        datasets,
        tmp_path / "text",
        family,
        fake_components(),
        "cpu",
        lambda kind, payload: sink.append((kind, payload)),
        extra_prompts=["a validation prompt"],
    )
    return data, family


def test_pairs_by_relative_name_and_delivers_conditioning_latents(tmp_path):
    _pairs(tmp_path)
    events: list = []
    data, family = _prepare(tmp_path, _datasets(tmp_path), events=events)
    skipped = [p for kind, p in events if kind == "skipped"]
    assert [Path(p["path"]).name for p in skipped] == ["d.png"] and "no conditioning image" in skipped[0][
        "reason"
    ]
    assert sorted(Path(p.path).name for p in data.plans) == ["a.png", "b.png", "c.png"]
    paired = {Path(data.plans[i].path).name: Path(p.path).name for i, p in data.conditioning_plans.items()}
    assert paired == {"a.png": "a.png", "b.png": "b.jpg", "c.png": "c.png"}
    # the conditioning image is resized and cropped with its target's plan (random crop included)
    for index, source in data.conditioning_plans.items():
        plan = data.plans[index]
        assert (source.resize_to, source.crop_box, source.bucket) == (
            plan.resize_to,
            plan.crop_box,
            plan.bucket,
        )
    assert family.encoded_images == 6  # 3 targets + 3 sources
    batch = data.load_batch(data.sampler.epoch_batches(0)[0])
    assert batch["conditioning_latents"].shape == batch["latents"].shape == (2, 4, 4, 4)
    blue = torch.tensor(SOURCE) / 127.5 - 1
    red = torch.tensor(TARGET) / 127.5 - 1
    assert torch.allclose(batch["conditioning_latents"][:, :3].mean(dim=(2, 3)), blue.expand(2, 3), atol=0.03)
    assert torch.allclose(batch["latents"][:, :3].mean(dim=(2, 3)), red.expand(2, 3), atol=0.03)
    # cached: a second run encodes nothing
    _, again = _prepare(tmp_path, _datasets(tmp_path))
    assert again.encoded_images == 0


def test_conditioning_images_of_another_size_follow_the_target_plan(tmp_path):
    _pairs(tmp_path, names=("a", "b"), missing=(), source_size=(128, 128))
    data, _ = _prepare(tmp_path, _datasets(tmp_path))
    batch = data.load_batch([0, 1])
    assert batch["conditioning_latents"].shape == batch["latents"].shape


def test_a_changed_conditioning_image_is_encoded_again_with_its_cache_group_only(tmp_path):
    import os

    _pairs(tmp_path, missing=())
    _prepare(tmp_path, _datasets(tmp_path), vae_batch_size=2)
    save_image(tmp_path / "sources" / "a.png", (64, 48), (0, 250, 0))
    os.utime(tmp_path / "sources" / "a.png", ns=(10, 10))
    data, family = _prepare(tmp_path, _datasets(tmp_path), vae_batch_size=2)
    assert family.encoded_images == 2  # the sources of a's group of vae_batch_size samples, not all four
    index = next(i for i, p in enumerate(data.plans) if Path(p.path).name == "a.png")
    green = data.load_batch([index])["conditioning_latents"][0, :3].mean(dim=(1, 2))
    assert torch.allclose(green, torch.tensor([-1.0, 250 / 127.5 - 1, -1.0]), atol=0.03)


def test_bad_links_name_the_dataset_and_the_fix(tmp_path):
    _pairs(tmp_path)
    datasets = _datasets(tmp_path, conditioning_data="nope")
    with pytest.raises(DataError, match="'targets': conditioning_data 'nope' names no dataset"):
        _prepare(tmp_path, datasets)
    datasets = _datasets(tmp_path)
    datasets[1] = datasets[1].model_copy(update={"dataset_type": "image"})
    with pytest.raises(
        DataError, match="dataset_type image; set that dataset's dataset_type to conditioning"
    ):
        _prepare(tmp_path, datasets)


def test_image_conditioned_prompts_are_cached_per_caption_and_image(tmp_path):
    _pairs(tmp_path, missing=())
    config = TrainConfig(model_family="fake", train_batch_size=2)
    data, family = _prepare(tmp_path, _datasets(tmp_path), family=FakeI2IFamily(config))
    # every caption once, with its conditioning image at the bucket size; no bare validation prompts
    assert sorted(text for text, _ in family.prompt_images) == [f"make {n} red" for n in "abcd"]
    assert {size for _, size in family.prompt_images} == {(32, 32)}
    assert "a validation prompt" not in family.encoded_prompts
    batch = data.load_batch([0, 1])
    assert torch.allclose(
        batch["pooled_prompt_embeds"][0],
        FakeFamily.encode_prompts(family, None, [batch["captions"][0]])[0]["pooled_prompt_embeds"]
        + torch.tensor(SOURCE, dtype=torch.float32).mean() / 255,
    )
    source = data.conditioning_plans[0]
    key = prompt_key(data.captions[0][0], data.conditioning_caches["sources"].key(source))
    assert data.text_cache.missing([key]) == []
    _, again = _prepare(tmp_path, _datasets(tmp_path), family=FakeI2IFamily(config))
    assert again.prompt_images == [] and again.encoded_images == 0


def test_image_conditioned_prompts_with_caption_dropout_cache_the_empty_caption_per_image(tmp_path):
    _pairs(tmp_path, names=("a", "b"), missing=())
    config = TrainConfig(model_family="fake", train_batch_size=2)
    _, family = _prepare(
        tmp_path, _datasets(tmp_path), family=FakeI2IFamily(config), caption_dropout_probability=0.5
    )
    assert sorted(text for text, _ in family.prompt_images) == ["", "", "make a red", "make b red"]


def test_video_family_gets_paired_images_as_one_frame_conditioning(tmp_path):
    for index, name in enumerate(("a", "b")):
        make_video(tmp_path / "targets" / f"{name}.mp4", frames=9, size=(32, 32), fps=24, seed=index)
        save_image(tmp_path / "sources" / f"{name}.png", (32, 32), SOURCE)
    datasets = _datasets(tmp_path, dataset_type="video", video={"num_frames": 5}, crop=False)
    config = TrainConfig(model_family="fake", train_batch_size=2)
    data, family = _prepare(tmp_path, datasets, family=FakeVideoFamily(config, i2v=True))
    batch = data.load_batch([0, 1])
    assert batch["latents"].shape == (2, 4, 2, 4, 4) and batch["conditioning_latents"].shape == (
        2,
        4,
        1,
        4,
        4,
    )
    assert family.first_frames_encoded == 0  # the linked images, not the first frames
    blue = torch.tensor(SOURCE) / 127.5 - 1
    assert torch.allclose(
        batch["conditioning_latents"][:, :3, 0].mean(dim=(2, 3)), blue.expand(2, 3), atol=0.03
    )


def test_pair_conditioning_reports_unreadable_sources(tmp_path):
    _pairs(tmp_path, names=("a",), missing=())
    (tmp_path / "sources" / "a.png").write_bytes(b"not an image")
    datasets = _datasets(tmp_path)
    from difftune.data.buckets import plan_samples

    found = discover(datasets[0], tmp_path / "meta")
    plans, _ = plan_samples(found.samples, datasets[0], 16, 0)
    pairs, unpaired = pair_conditioning(plans, [(datasets[1], discover(datasets[1], tmp_path / "meta"))])
    assert pairs == {} and len(unpaired) == 1 and "unreadable" in unpaired[0][1]
