"""Loss masks: a conditioning dataset with conditioning_type mask weights the loss on the latent grid."""

from pathlib import Path

import pytest
import torch

from difftune.config.schema import DatasetConfig, TrainConfig
from difftune.data.pipeline import prepare_training_data
from difftune.training.losses import loss_mask, per_sample_loss
from tests.data.fakes import FakeFamily, fake_components


def _half_image(path: Path, left, right, size=(64, 64)) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", size, right)
    image.paste(Image.new("RGB", (size[0] // 2, size[1]), left), (0, 0))
    image.save(path)


def _folders(root: Path, left_colour, names=("a", "b"), masked=("a", "b")) -> list[DatasetConfig]:
    """Images whose left half is left_colour; masks black on the left half, white on the right."""
    for name in names:
        _half_image(root / "images" / f"{name}.png", left_colour, (20, 200, 90))
        if name in masked:
            _half_image(root / "masks" / f"{name}.png", (0, 0, 0), (255, 255, 255))
    return [
        DatasetConfig(
            id="images",
            instance_data_dir=str(root / "images"),
            resolution=64,
            resolution_type="pixel",
            cache_dir_vae=str(root / "vae"),
            conditioning_data="masks",
        ),
        DatasetConfig(
            id="masks",
            dataset_type="conditioning",
            conditioning_type="mask",
            instance_data_dir=str(root / "masks"),
        ),
    ]


def _prepare(root: Path, datasets, events=None, **train):
    config = TrainConfig(model_family="fake", **{"train_batch_size": 2, "seed": 1, **train})
    family = FakeFamily(config)
    sink = events if events is not None else []
    data = prepare_training_data(
        config, datasets, root / "text", family, fake_components(), "cpu", lambda k, p: sink.append((k, p))
    )
    return data, family


def _loss(data, family, masked=True) -> torch.Tensor:
    batch = data.load_batch([0, 1], position=(0, 0))
    latents = batch["latents"]
    mask = loss_mask(family, batch, latents) if masked else None
    return per_sample_loss(torch.zeros_like(latents), latents, mask)


def test_the_masked_region_does_not_move_the_loss(tmp_path):
    red, _ = _prepare(tmp_path / "red", _folders(tmp_path / "red", (250, 0, 0)))
    blue, family = _prepare(tmp_path / "blue", _folders(tmp_path / "blue", (90, 30, 0)))
    batch = red.load_batch([0, 1], position=(0, 0))
    # the mask reaches the loss on the latent grid: 8x8 latents, the left 4 columns masked out
    assert batch["loss_mask"].shape == (2, 1, 8, 8)
    assert batch["loss_mask"][:, :, :, :4].sum() == 0 and batch["loss_mask"][:, :, :, 4:].min() == 1
    torch.testing.assert_close(_loss(red, family), _loss(blue, family))
    assert not torch.allclose(_loss(red, family, masked=False), _loss(blue, family, masked=False))


def test_masked_loss_probability_is_the_share_of_batches_with_masks(tmp_path):
    datasets = _folders(tmp_path, (250, 0, 0))
    never, _ = _prepare(tmp_path, datasets, masked_loss_probability=0.0)
    assert "loss_mask" not in never.load_batch([0, 1], position=(0, 0))
    half, _ = _prepare(tmp_path, datasets, masked_loss_probability=0.5)
    drawn = [("loss_mask" in half.load_batch([0, 1], position=(0, k))) for k in range(200)]
    assert 0.35 < sum(drawn) / len(drawn) < 0.65  # 200 fair draws: over 4 standard deviations either side
    assert drawn == [("loss_mask" in half.load_batch([0, 1], position=(0, k))) for k in range(200)]


def test_an_image_without_a_mask_is_left_out_with_the_reason(tmp_path):
    events: list = []
    datasets = _folders(tmp_path, (250, 0, 0), names=("a", "b", "c"), masked=("a", "b"))
    data, _ = _prepare(tmp_path, datasets, events=events)
    assert sorted(Path(p.path).name for p in data.plans) == ["a.png", "b.png"]
    skipped = [p for kind, p in events if kind == "skipped"]
    assert Path(skipped[0]["path"]).name == "c.png" and "no conditioning image" in skipped[0]["reason"]
    # masks are not encoded with the VAE: only the two images were
    assert not data.conditioning_plans


def test_a_controlnet_conditioning_type_is_refused_with_what_to_use():
    with pytest.raises(ValueError, match="use conditioning_type mask"):
        DatasetConfig(
            id="c", dataset_type="conditioning", conditioning_type="controlnet", instance_data_dir="x"
        )
